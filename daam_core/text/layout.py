"""Token layouts: which positions of a prompt's conditioning belong to which word.

A :class:`TokenLayout` describes the token axis of one prompt's conditioning (all chunks concatenated): the id,
weight and readable piece at every position, and the prompt's words with their positions. Builders live in
:mod:`daam_core.text.tokenize` (re-doing a host's tokenization) and in each host adapter (from what the host
really encoded). :meth:`TokenLayout.positions` finds words and phrases by matching the query's token ids
(tokenized with the same tokenizer) against the prompt's, so case, punctuation and BPE splits behave as in CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from .embeddings import EMBEDDING_PREFIX, embedding_key, embedding_piece, same_embedding, split_embeddings, strip_prefix
from .pieces import END_OF_WORD, decode_pieces, encode, pieces_of, piece_units, pretokens, word_keys
from .query import WordNotFoundError, parse_query

SCHEMES = ("bpe", "sentencepiece")
SEGMENT_CHOICES = ("clip", "t5", "both", "llama")


@dataclass(frozen=True)
class Segment:
    """A stretch of the token axis made by one text encoder (SD3: CLIP-L/G positions, then T5 positions).

    Attributes
    ----------
    name : str
        The encoder: ``"clip"``, ``"t5"``, ``"llama"`` (HiDream), or a family's one encoder (``"qwen"``,
        ``"mistral"``).
    start, stop : int
        ``[start, stop)`` on the token axis.
    scheme : str
        ``"bpe"`` (CLIP: ``"</w>"`` ends a word piece) or ``"sentencepiece"`` (T5: ``"▁"`` starts a word).
    """

    name: str
    start: int
    stop: int
    scheme: str = "bpe"

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"segment scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if not 0 <= self.start <= self.stop:
            raise ValueError(f"segment range [{self.start}, {self.stop}) is invalid")


@dataclass(frozen=True)
class Word:
    """One word of the prompt (whitespace-separated, as written; an embedding is one word).

    Attributes
    ----------
    text : str
        Surface form as written, after weight syntax and escapes are removed (``"dog,"``, ``"embedding:foo"``).
    index : int
        Order among the prompt's words.
    positions : tuple of int
        Its indices on the conditioning tensor's token axis (all chunks concatenated).
    weight : float
        The weight of its segment.
    """

    text: str
    index: int
    positions: tuple[int, ...]
    weight: float


@dataclass(frozen=True)
class TokenLayout:
    """Per-position token metadata of one prompt's conditioning.

    Attributes
    ----------
    ids : tuple of int, length L
        Token id per position; -1 where an embedding vector sits.
    weights : tuple of float, length L
        Prompt weight per position (1.0 for BOS/EOS/padding).
    pieces : tuple of str, length L
        Readable token per position (``"<|startoftext|>"``, ``"dog</w>"``, ``"<embedding:name:0>"``).
    word_of : tuple of int, length L
        Index into ``words`` per position; -1 for BOS, EOS and padding.
    words : tuple of Word
        The prompt's words in order.
    chunk_length : int
        Positions per chunk (77 for CLIP); ``L`` is a multiple of it.
    overflow_ids, overflow_pieces : tuple
        Tokens cut off by truncation (``chunked=False``), kept only to explain why a word is missing.
    tokenizer : object, optional
        The tokenizer that made the layout, used to tokenize queries. Not compared or serialized; a layout
        without one (e.g. from :meth:`from_dict`) matches queries on decoded word pieces instead.
        SentencePiece segments always match on decoded text (case-insensitive), so for a CLIP + T5 layout
        this is the CLIP tokenizer.
    segments : tuple of Segment
        Which encoder made which positions, in order and covering the axis; empty (every CLIP layout made
        before segments existed) means one CLIP segment over all positions.
    """

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    pieces: tuple[str, ...]
    word_of: tuple[int, ...]
    words: tuple[Word, ...]
    chunk_length: int
    overflow_ids: tuple[int, ...] = ()
    overflow_pieces: tuple[str, ...] = ()
    tokenizer: Any = field(default=None, compare=False, repr=False)
    segments: tuple[Segment, ...] = ()

    def __post_init__(self):
        n = len(self.ids)
        if not (len(self.weights) == len(self.pieces) == len(self.word_of) == n):
            raise ValueError("ids, weights, pieces and word_of must have one entry per position")
        if len(self.overflow_ids) != len(self.overflow_pieces):
            raise ValueError("overflow_ids and overflow_pieces differ in length")
        if self.chunk_length <= 0:
            raise ValueError("chunk_length must be positive")
        if self.segments:
            edges = [self.segments[0].start] + [g.stop for g in self.segments]
            if (edges[0] != 0 or edges[-1] != n
                    or any(a.stop != b.start for a, b in zip(self.segments, self.segments[1:]))):
                raise ValueError(f"segments {[(g.name, g.start, g.stop) for g in self.segments]} must cover the "
                                 f"{n} positions in order")

    @property
    def length(self) -> int:
        """Number of positions ``L`` on the token axis."""
        return len(self.ids)

    @property
    def num_chunks(self) -> int:
        """Number of chunks (``length / chunk_length``, rounded up)."""
        return -(-self.length // self.chunk_length)

    def content_positions(self) -> tuple[int, ...]:
        """Every position that belongs to a word (not BOS, EOS or padding)."""
        return tuple(p for p, w in enumerate(self.word_of) if w >= 0)

    def bind(self, tokenizer) -> "TokenLayout":
        """The same layout, with ``tokenizer`` used to tokenize queries."""
        return TokenLayout(self.ids, self.weights, self.pieces, self.word_of, self.words, self.chunk_length,
                           self.overflow_ids, self.overflow_pieces, tokenizer, self.segments)

    def with_segments(self, segments) -> "TokenLayout":
        """The same layout with its segments named."""
        return TokenLayout(self.ids, self.weights, self.pieces, self.word_of, self.words, self.chunk_length,
                           self.overflow_ids, self.overflow_pieces, self.tokenizer, tuple(segments))

    @property
    def segment_list(self) -> tuple[Segment, ...]:
        """The segments, with the implicit single CLIP segment of a layout that names none."""
        return self.segments or (Segment("clip", 0, self.length, "bpe"),)

    def segment_of(self, position: int) -> str:
        """Name of the segment a position belongs to."""
        for g in self.segment_list:
            if g.start <= position < g.stop:
                return g.name
        raise ValueError(f"position {position} is outside the layout's {self.length} positions")

    def _segments_for(self, segments: str | None) -> tuple[Segment, ...]:
        if segments is None or segments == "both":
            return self.segment_list
        if segments not in SEGMENT_CHOICES:
            raise ValueError(f"segments must be one of {SEGMENT_CHOICES}, got {segments!r}")
        picked = tuple(g for g in self.segment_list if g.name == segments)
        if not picked:
            raise ValueError(f"this prompt has no {segments!r} positions; its segments are "
                             f"{[g.name for g in self.segment_list]}")
        return picked

    # -- lookup ---------------------------------------------------------------------------------------------

    def positions(self, query: str, occurrence: int | None = None, segments: str | None = None) -> tuple[int, ...]:
        """Token positions of a word or phrase.

        Parameters
        ----------
        query : str
            A word or phrase of the prompt (``"dog"``, ``"red car"``, ``"Dog,"``), an embedding
            (``"embedding:foo"`` or ``"foo"``), optionally with a ``#n`` suffix (n-th occurrence, from 1).
            The match starts at the beginning of a word piece: ``"dog"`` does not match inside ``"sheepdog"``.
            When the query as written is absent, it is retried without leading/trailing punctuation.
        occurrence : int, optional
            0-based occurrence to return; None gives the positions of all occurrences.
        segments : {"both", "clip", "t5", "llama"}, optional
            Which encoders' positions to return (SD3: a word has positions in the CLIP and the T5 segment;
            HiDream: in the T5 and the Llama segments); default both (all). The n-th occurrence is the n-th in
            each segment.

        Returns
        -------
        tuple of int
            Sorted positions on the token axis; a match may cross a chunk boundary.

        Raises
        ------
        ValueError
            Empty query, or an occurrence that does not exist.
        WordNotFoundError
            The query is not in the (encoded part of the) prompt.
        """
        if occurrence is None:
            query, occurrence = parse_query(query)
        text = query.strip()
        if not text:
            raise ValueError("empty word query")
        matches = self._find(text, segments)
        if not matches:
            self._raise_missing(query)
        if occurrence is None:
            return tuple(sorted({p for m in matches for p in m}))
        if not 0 <= occurrence < len(matches):
            raise ValueError(f"{text!r} occurs {len(matches)} time(s) in the prompt; occurrence "
                             f"#{occurrence + 1} does not exist")
        return matches[occurrence]

    def _find(self, text: str, segments: str | None = None) -> list[tuple[int, ...]]:
        per_segment = []
        for seg in self._segments_for(segments):
            units = self._units(segment=seg)
            found: list = []
            for query_keys in self._query_keys(text, seg.scheme):
                found = _match(units, query_keys)
                if found:
                    break
            if not found and seg.scheme == "sentencepiece":
                # pieces that do not decode to the text (<unk>, normalised characters): the words as written
                found = _match(self._word_units(seg), [_bare(w) for w in text.split()])
            if found:
                per_segment.append([tuple(p for u in m for p in u.positions) for m in found])
        if per_segment:
            # occurrence i: the i-th match of every segment that has one
            depth = max(len(m) for m in per_segment)
            return [tuple(sorted(p for m in per_segment if i < len(m) for p in m[i])) for i in range(depth)]
        # a bare embedding name: "foo" for "embedding:foo"
        name = strip_prefix(text)
        return [w.positions for w in self._embedding_words() if same_embedding(w.text, name)]

    def _word_units(self, seg: Segment) -> list["_Unit"]:
        units = []
        for w in self.words:
            pos = tuple(p for p in w.positions if seg.start <= p < seg.stop)
            if pos:
                units.append(_Unit(_bare(w.text), pos, True))
        return units

    def _embedding_words(self) -> list[Word]:
        """Words that are embedding vectors (not the literal text "embedding:...")."""
        return [w for w in self.words if embedding_piece(self.pieces[w.positions[0]]) is not None]

    def _raise_missing(self, query: str):
        words = [w.text for w in self.words]
        if self.overflow_ids:
            last = self.segment_list[-1]
            if last.scheme == "sentencepiece":  # the overflow continues the last segment
                keep = [p for p in range(last.start, last.stop) if self.word_of[p] >= 0]
                cut = [-1 - i for i in range(len(self.overflow_pieces))]
                end = self.word_of[keep[-1]] if keep else -1
                raw = piece_units([self.pieces[p] for p in keep] + list(self.overflow_pieces), keep + cut,
                                  [self.word_of[p] for p in keep] + [end] * len(cut))
                units = [_Unit(k, tuple(p for p in pos if p >= 0), True, any(p < 0 for p in pos)) for k, pos in raw]
            else:
                units = self._units(with_overflow=True)
            for query_keys in self._query_keys(query.strip(), last.scheme):
                # found once the cut-off tokens are included: it was truncated
                if any(any(u.cut for u in m) for _, m in _match_spans(units, query_keys)):
                    raise WordNotFoundError(query, words, truncated=True, limit=self.chunk_length)
        raise WordNotFoundError(query, words)

    # -- matching machinery ---------------------------------------------------------------------------------

    def _units(self, with_overflow: bool = False, segment: Segment | None = None) -> list["_Unit"]:
        """Matching units in order: single tokens when a tokenizer is bound, else whole word pieces (text keys).

        With ``with_overflow`` the tokens cut off by truncation follow, flagged ``cut``. ``segment`` limits them
        to one segment; a SentencePiece segment gives text keys (:func:`~daam_core.text.sentencepiece.piece_units`).
        """
        lo, hi = (segment.start, segment.stop) if segment is not None else (0, self.length)
        if segment is not None and segment.scheme == "sentencepiece":
            keep = [p for p in range(lo, hi) if self.word_of[p] >= 0]
            return [_Unit(key, pos, True) for key, pos in
                    piece_units([self.pieces[p] for p in keep], keep, [self.word_of[p] for p in keep])]
        content = [(p, self.ids[p], self.pieces[p], self.word_of[p]) for p in range(lo, hi)
                   if self.word_of[p] >= 0]
        last_word = content[-1][3] if content else -1
        if with_overflow:  # the overflow continues the last kept word
            content += [(-1, i, s, last_word) for i, s in zip(self.overflow_ids, self.overflow_pieces)]
        units: list[_Unit] = []
        prev_piece, prev_word = None, None
        for pos, tid, piece, word in content:
            emb = embedding_piece(piece)
            # a unit starts a word piece after an end-of-word marker, at an embedding or at a new word
            start = (prev_piece is None or prev_piece.endswith(END_OF_WORD) or word != prev_word
                     or emb is not None or embedding_piece(prev_piece) is not None)
            if emb is not None:
                key: Any = embedding_key(piece)
            else:
                key = tid if self.tokenizer is not None else piece
            units.append(_Unit(key, (pos,) if pos >= 0 else (), start, pos < 0))
            prev_piece, prev_word = piece, word
        if self.tokenizer is None:
            units = _merge_pretokens(units)
        return units

    def _query_keys(self, text: str, scheme: str = "bpe") -> list[list[Any]]:
        """Key sequences to look for: the query as written, then without edge punctuation."""
        keys = word_keys(text) if scheme == "sentencepiece" else self._keys_for(text)
        if not keys:
            return []
        punct = [self._is_punctuation(k) for k in keys]
        lo, hi = 0, len(keys)
        while lo < hi and punct[lo]:
            lo += 1
        while hi > lo and punct[hi - 1]:
            hi -= 1
        out = [keys]
        if 0 < hi - lo < len(keys):
            out.append(keys[lo:hi])
        return out

    def _is_punctuation(self, key: Any) -> bool:
        if isinstance(key, tuple):
            return False
        if isinstance(key, int):
            key = decode_pieces(pieces_of(self.tokenizer, [key]))
        return not any(ch.isalnum() for ch in key.replace(END_OF_WORD, ""))

    def _keys_for(self, text: str) -> list[Any]:
        keys: list[Any] = []
        for part in split_embeddings(text):
            if part.startswith(EMBEDDING_PREFIX):
                name, _, rest = part[len(EMBEDDING_PREFIX):].strip().partition(" ")
                word = next((w for w in self._embedding_words() if same_embedding(w.text, name)), None)
                if word is not None:
                    keys += [embedding_key(self.pieces[p]) for p in word.positions]
                    part = rest
            if not part.strip():
                continue
            if self.tokenizer is not None:
                keys += list(encode([part], self.tokenizer)[0])
            else:
                keys += pretokens(part)
        return keys

    # -- serialization --------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-safe description (the tokenizer is not included)."""
        return {
            "version": 1,
            "ids": list(self.ids),
            "weights": [float(w) for w in self.weights],
            "pieces": list(self.pieces),
            "word_of": list(self.word_of),
            "words": [{"text": w.text, "index": w.index, "positions": list(w.positions), "weight": float(w.weight)}
                      for w in self.words],
            "chunk_length": self.chunk_length,
            "overflow_ids": list(self.overflow_ids),
            "overflow_pieces": list(self.overflow_pieces),
            "segments": [{"name": g.name, "start": g.start, "stop": g.stop, "scheme": g.scheme}
                         for g in self.segments],
        }

    @classmethod
    def from_dict(cls, d: Mapping, tokenizer=None) -> "TokenLayout":
        """Inverse of :meth:`to_dict`; pass ``tokenizer`` to match queries on token ids again."""
        words = tuple(Word(str(w["text"]), int(w["index"]), tuple(int(p) for p in w["positions"]), float(w["weight"]))
                      for w in d["words"])
        return cls(tuple(int(i) for i in d["ids"]), tuple(float(w) for w in d["weights"]),
                   tuple(str(s) for s in d["pieces"]), tuple(int(w) for w in d["word_of"]), words,
                   int(d["chunk_length"]), tuple(int(i) for i in d.get("overflow_ids", ())),
                   tuple(str(s) for s in d.get("overflow_pieces", ())), tokenizer,
                   tuple(Segment(str(g["name"]), int(g["start"]), int(g["stop"]), str(g.get("scheme", "bpe")))
                         for g in d.get("segments", ())))


def _bare(word: str) -> str:
    """A word compared as written: lower case, without edge punctuation (unless it is all punctuation)."""
    core = "".join(ch for ch in word).strip("".join(ch for ch in set(word) if not ch.isalnum()))
    return (core or word).lower()


@dataclass
class _Unit:
    key: Any                    # token id, decoded word piece, or embedding key
    positions: tuple[int, ...]  # positions on the token axis (none for cut-off tokens)
    start: bool                 # begins a word piece
    cut: bool = False           # holds tokens cut off by truncation


def _match_spans(units: list[_Unit], keys: list[Any]) -> Iterator[tuple[int, list[_Unit]]]:
    """Non-overlapping occurrences of ``keys`` that begin at a word-piece start, left to right."""
    m = len(keys)
    i = 0
    while m and i + m <= len(units):
        if units[i].start and all(units[i + k].key == keys[k] for k in range(m)):
            yield i, units[i:i + m]
            i += m
        else:
            i += 1


def _match(units: list[_Unit], keys: list[Any]) -> list[list[_Unit]]:
    return [m for _, m in _match_spans(units, keys) if not any(u.cut for u in m)]


def _merge_pretokens(units: list[_Unit]) -> list[_Unit]:
    """Join BPE pieces into whole word pieces keyed by their decoded, lower-case text."""
    out: list[_Unit] = []
    buf: list[_Unit] = []

    def flush():
        if buf:
            text = decode_pieces([u.key for u in buf])
            out.append(_Unit(text, tuple(p for u in buf for p in u.positions), True, any(u.cut for u in buf)))
            buf.clear()

    for u in units:
        if isinstance(u.key, tuple):  # embedding vector
            flush()
            out.append(_Unit(u.key, u.positions, True, u.cut))
            continue
        if u.start:
            flush()
        buf.append(u)
        if u.key.endswith(END_OF_WORD):
            flush()
    flush()
    return out



def zero_positions(length: int, segment: str, scheme: str = "sentencepiece", piece: str = "<zeros>") -> TokenLayout:
    """``length`` positions that hold no word: what an encoder that is not loaded leaves in the conditioning
    (zero vectors), as one segment named ``segment``."""
    return TokenLayout((0,) * length, (1.0,) * length, (piece,) * length, (-1,) * length, (), length,
                       segments=(Segment(segment, 0, length, scheme),))


def concat_layouts(parts, tokenizer=None) -> TokenLayout:
    """One layout for conditionings concatenated on the token axis (SD3: CLIP-L/G positions, then T5's).

    Parameters
    ----------
    parts : sequence of (str, TokenLayout)
        Segment name and layout, in axis order; each layout is one segment (its scheme is kept).
    tokenizer : object, optional
        Bound for the BPE segments' queries (default: the first BPE part's tokenizer).

    Returns
    -------
    TokenLayout
        Positions offset part after part, ``segments`` naming each part. When every part that has words has the
        same words (the same prompt tokenized by each encoder; a part of an encoder that was not loaded has
        none), a word keeps one index and gets its positions in every segment; otherwise the parts' words are
        listed one after the other.
    """
    parts = list(parts)
    if not parts:
        raise ValueError("no layouts to concatenate")
    for name, lay in parts:
        if len(lay.segment_list) != 1:
            raise ValueError(f"segment {name!r}: a concatenated part must itself be a single segment")
    texts = [tuple(w.text for w in lay.words) for _, lay in parts if lay.words]
    shared = all(t == texts[0] for t in texts)
    ids, weights, pieces, word_of, segments = [], [], [], [], []
    positions: dict[int, list[int]] = {}
    word_info: dict[int, tuple[str, float]] = {}
    offset, word_base = 0, 0
    for name, lay in parts:
        segments.append(Segment(name, offset, offset + lay.length, lay.segment_list[0].scheme))
        ids += lay.ids
        weights += lay.weights
        pieces += lay.pieces
        for p, w in enumerate(lay.word_of):
            if w < 0:
                word_of.append(-1)
                continue
            index = w if shared else word_base + w
            word_of.append(index)
            positions.setdefault(index, []).append(offset + p)
            word_info.setdefault(index, (lay.words[w].text, lay.words[w].weight))
        offset += lay.length
        word_base += len(lay.words)
    words = tuple(Word(word_info[i][0], i, tuple(positions[i]), word_info[i][1]) for i in sorted(positions))
    if tokenizer is None:
        tokenizer = next((lay.tokenizer for _, lay in parts if lay.segment_list[0].scheme == "bpe"), None)
    bpe = [lay for _, lay in parts if lay.segment_list[0].scheme == "bpe"]
    chunk = bpe[0].chunk_length if bpe else offset
    return TokenLayout(tuple(ids), tuple(weights), tuple(pieces), tuple(word_of), words, chunk, (), (), tokenizer,
                       tuple(segments))
