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
from .pieces import END_OF_WORD, decode_pieces, encode, pieces_of, pretokens
from .query import WordNotFoundError, parse_query


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

    def __post_init__(self):
        n = len(self.ids)
        if not (len(self.weights) == len(self.pieces) == len(self.word_of) == n):
            raise ValueError("ids, weights, pieces and word_of must have one entry per position")
        if len(self.overflow_ids) != len(self.overflow_pieces):
            raise ValueError("overflow_ids and overflow_pieces differ in length")
        if self.chunk_length <= 0:
            raise ValueError("chunk_length must be positive")

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
                           self.overflow_ids, self.overflow_pieces, tokenizer)

    # -- lookup ---------------------------------------------------------------------------------------------

    def positions(self, query: str, occurrence: int | None = None) -> tuple[int, ...]:
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
        matches = self._find(text)
        if not matches:
            self._raise_missing(query)
        if occurrence is None:
            return tuple(sorted({p for m in matches for p in m}))
        if not 0 <= occurrence < len(matches):
            raise ValueError(f"{text!r} occurs {len(matches)} time(s) in the prompt; occurrence "
                             f"#{occurrence + 1} does not exist")
        return matches[occurrence]

    def _find(self, text: str) -> list[tuple[int, ...]]:
        units = self._units()
        for query_keys in self._query_keys(text):
            found = _match(units, query_keys)
            if found:
                return [tuple(p for u in m for p in u.positions) for m in found]
        # a bare embedding name: "foo" for "embedding:foo"
        name = strip_prefix(text)
        return [w.positions for w in self._embedding_words() if same_embedding(w.text, name)]

    def _embedding_words(self) -> list[Word]:
        """Words that are embedding vectors (not the literal text "embedding:...")."""
        return [w for w in self.words if embedding_piece(self.pieces[w.positions[0]]) is not None]

    def _raise_missing(self, query: str):
        words = [w.text for w in self.words]
        if self.overflow_ids:
            units = self._units(with_overflow=True)
            for query_keys in self._query_keys(query.strip()):
                # found once the cut-off tokens are included: it was truncated
                if any(any(u.cut for u in m) for _, m in _match_spans(units, query_keys)):
                    raise WordNotFoundError(query, words, truncated=True, limit=self.chunk_length)
        raise WordNotFoundError(query, words)

    # -- matching machinery ---------------------------------------------------------------------------------

    def _units(self, with_overflow: bool = False) -> list["_Unit"]:
        """Matching units in order: single tokens when a tokenizer is bound, else whole word pieces (text keys).

        With ``with_overflow`` the tokens cut off by truncation follow, flagged ``cut``.
        """
        content = [(p, self.ids[p], self.pieces[p], self.word_of[p]) for p in range(self.length)
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

    def _query_keys(self, text: str) -> list[list[Any]]:
        """Key sequences to look for: the query as written, then without edge punctuation."""
        keys = self._keys_for(text)
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
        }

    @classmethod
    def from_dict(cls, d: Mapping, tokenizer=None) -> "TokenLayout":
        """Inverse of :meth:`to_dict`; pass ``tokenizer`` to match queries on token ids again."""
        words = tuple(Word(str(w["text"]), int(w["index"]), tuple(int(p) for p in w["positions"]), float(w["weight"]))
                      for w in d["words"])
        return cls(tuple(int(i) for i in d["ids"]), tuple(float(w) for w in d["weights"]),
                   tuple(str(s) for s in d["pieces"]), tuple(int(w) for w in d["word_of"]), words,
                   int(d["chunk_length"]), tuple(int(i) for i in d.get("overflow_ids", ())),
                   tuple(str(s) for s in d.get("overflow_pieces", ())), tokenizer)


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

