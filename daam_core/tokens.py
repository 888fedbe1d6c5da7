"""Token alignment: which positions of the conditioning tensor belong to which word of the prompt.

A :class:`TokenLayout` describes the token axis of one prompt's conditioning (all chunks concatenated): the id,
weight and readable piece at every position, and the prompt's words with their positions. It is built either by
re-doing a host's tokenization (:func:`tokenize`, for ComfyUI, A1111-style and diffusers layouts) or from exactly
what ComfyUI's tokenizer returned (:func:`layout_from_comfy_tokens`).

Words and phrases are found with :meth:`TokenLayout.positions`, which matches the query's token ids (tokenized
with the same tokenizer) against the prompt's, so case, punctuation and BPE splits behave as they do in CLIP.

Nothing here imports ComfyUI or transformers: the tokenizer is passed in. Anything with ``bos_token_id``,
``eos_token_id``, ``convert_ids_to_tokens`` and ``__call__(texts, add_special_tokens=False)`` returning
``{"input_ids": ...}`` works (``transformers.CLIPTokenizer`` / ``CLIPTokenizerFast``).
"""

from __future__ import annotations

import numbers
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterator, Mapping, Sequence

from .prompt import PromptSegment, parse_prompt

__all__ = [
    "TokenLayout", "Word", "WordNotFoundError", "layout_from_comfy_tokens", "parse_query", "tokenize",
]

# ComfyUI's constants (comfy/sd1_clip.py, SDTokenizer)
EMBEDDING_PREFIX = "embedding:"
_COMFY_MAX_WORD_LENGTH = 8  # a group of at least this many tokens may be split across chunks
_A1111_COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"
_EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")
_END_OF_WORD = "</w>"


class WordNotFoundError(ValueError):
    """A queried word or phrase is not in the prompt.

    Attributes
    ----------
    query : str
        The query as given.
    words : tuple of str
        The prompt's words, for the message.
    truncated : bool
        True when the query is in the prompt but past the token limit (``tokenize(..., chunked=False)``).
    """

    def __init__(self, query: str, words: Sequence[str], *, truncated: bool = False, limit: int | None = None):
        self.query = query
        self.words = tuple(words)
        self.truncated = truncated
        listed = ", ".join(repr(w) for w in self.words) if self.words else "(none)"
        if truncated:
            msg = (f"{query!r} is past the end of the encoded prompt: the prompt was truncated at {limit} tokens "
                   f"(use a chunked / long-prompt encoding to keep it). Words kept: {listed}")
        else:
            msg = f"{query!r} is not in the prompt. The prompt's words are: {listed}"
        super().__init__(msg)


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


def parse_query(query: str) -> tuple[str, int | None]:
    """Split a trailing ``#n`` occurrence suffix off a query.

    Parameters
    ----------
    query : str
        ``"dog"``, ``"red car"`` or ``"dog#2"`` (the second ``dog``; numbering starts at 1).

    Returns
    -------
    text : str
        The query without the suffix, stripped of surrounding whitespace.
    occurrence : int or None
        0-based occurrence, or None for all occurrences.
    """
    m = re.fullmatch(r"(.*?)\s*#(\d+)\s*", query, re.S)
    if m is None or not m.group(1).strip():
        return query.strip(), None
    n = int(m.group(2))
    if n < 1:
        raise ValueError(f"occurrence numbers start at 1: {query!r}")
    return m.group(1).strip(), n - 1


# -- the layout -----------------------------------------------------------------------------------------------------


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
        name = _strip_prefix(text)
        return [w.positions for w in self._embedding_words() if _same_embedding(w.text, name)]

    def _embedding_words(self) -> list[Word]:
        """Words that are embedding vectors (not the literal text "embedding:...")."""
        return [w for w in self.words if _embedding_piece(self.pieces[w.positions[0]]) is not None]

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
            emb = _embedding_piece(piece)
            # a unit starts a word piece after an end-of-word marker, at an embedding or at a new word
            start = (prev_piece is None or prev_piece.endswith(_END_OF_WORD) or word != prev_word
                     or emb is not None or _embedding_piece(prev_piece) is not None)
            if emb is not None:
                key: Any = _embedding_key(piece)
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
            key = _decode_pieces(_pieces(self.tokenizer, [key]))
        return not any(ch.isalnum() for ch in key.replace(_END_OF_WORD, ""))

    def _keys_for(self, text: str) -> list[Any]:
        keys: list[Any] = []
        for part in _split_embeddings(text):
            if part.startswith(EMBEDDING_PREFIX):
                name, _, rest = part[len(EMBEDDING_PREFIX):].strip().partition(" ")
                word = next((w for w in self._embedding_words() if _same_embedding(w.text, name)), None)
                if word is not None:
                    keys += [_embedding_key(self.pieces[p]) for p in word.positions]
                    part = rest
            if not part.strip():
                continue
            if self.tokenizer is not None:
                keys += list(_encode([part], self.tokenizer)[0])
            else:
                keys += _pretokens(part)
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
            text = _decode_pieces([u.key for u in buf])
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
        if u.key.endswith(_END_OF_WORD):
            flush()
    flush()
    return out


# -- embeddings -----------------------------------------------------------------------------------------------------


def _embedding_piece(piece: str | None) -> tuple[str, int] | None:
    """``"<embedding:name:3>"`` -> ``("name", 3)``."""
    if piece and piece.startswith("<" + EMBEDDING_PREFIX) and piece.endswith(">"):
        name, _, k = piece[len(EMBEDDING_PREFIX) + 1:-1].rpartition(":")
        if k.isdigit():
            return name, int(k)
    return None


def _embedding_key(piece: str) -> tuple[str, str, int]:
    """Matching key of an embedding vector: the same file named with or without extension matches."""
    name, k = _embedding_piece(piece)
    return ("emb", _embedding_stem(name), k)


def _strip_prefix(text: str) -> str:
    return text[len(EMBEDDING_PREFIX):].strip() if text.startswith(EMBEDDING_PREFIX) else text


def _embedding_stem(name: str) -> str:
    for ext in _EMBEDDING_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _same_embedding(word_text: str, name: str) -> bool:
    return _embedding_stem(_strip_prefix(word_text)) == _embedding_stem(name)


def _split_embeddings(text: str) -> list[str]:
    """ComfyUI's split before every ``embedding:`` that follows a space or newline; empty parts dropped."""
    parts = re.split(" " + EMBEDDING_PREFIX + "|\n" + EMBEDDING_PREFIX, text)
    parts = [parts[0]] + [EMBEDDING_PREFIX + p for p in parts[1:]]
    return [p for p in parts if p != ""]


def _lookup_embedding(embeddings: Mapping[str, int]) -> Callable[[str], int | None]:
    """Name -> vector count, accepting the name with or without a file extension (as ComfyUI does)."""
    stems = {}
    for key, n in embeddings.items():
        stems.setdefault(_embedding_stem(key), int(n))

    def resolve(name: str) -> int | None:
        if name in embeddings:
            return int(embeddings[name])
        return stems.get(_embedding_stem(name))

    return resolve


# -- tokenizer helpers ----------------------------------------------------------------------------------------------


def _encode(texts: Sequence[str], tokenizer) -> list[list[int]]:
    """Token ids of each text without BOS/EOS."""
    if not texts:
        return []
    out = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(map(int, ids)) for ids in out]


def _special_ids(tokenizer) -> tuple[int, int]:
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    if bos is None or eos is None:
        empty = tokenizer("")["input_ids"]
        bos, eos = int(empty[0]), int(empty[-1])
    return int(bos), int(eos)


def _pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    return [str(s) for s in tokenizer.convert_ids_to_tokens([int(i) for i in ids])]


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2/CLIP byte-to-unicode table used in BPE pieces."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
                 + list(range(ord("\xae"), ord("\xff") + 1)))
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _decode_pieces(pieces: Sequence[str]) -> str:
    """Readable text of consecutive BPE pieces (lower case, no end-of-word markers)."""
    table = _byte_decoder()
    raw = "".join(pieces).replace(_END_OF_WORD, "")
    if all(ch in table for ch in raw):
        return bytes(table[ch] for ch in raw).decode("utf-8", errors="replace")
    return raw


# CLIP's pre-tokenizer, approximated with the standard library (\p{L} ~ [^\W\d_], \p{N} ~ \d)
_PRETOKEN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")


def _pretokens(text: str) -> list[str]:
    text = unicodedata.normalize("NFC", " ".join(text.split())).lower()
    return _PRETOKEN.findall(text)


# -- building layouts -----------------------------------------------------------------------------------------------


@dataclass
class _Group:
    """What ComfyUI calls a word: the tokens of one segment piece, or one embedding's vectors."""

    ids: list[int]                       # -1 per embedding vector
    weight: float
    words: list[tuple[str, int]]         # (surface text, token count), partitioning ids
    embedding: str | None = None
    is_break: bool = False


_LITERAL = object()  # resolver answer: treat "embedding:name" as ordinary text


def _text_group(text: str, weight: float, tokenizer) -> _Group:
    """Tokenize a piece of text as one unit and split its tokens among its whitespace-separated words."""
    ids = _encode([text], tokenizer)[0] if text.strip() else []
    surface = text.split()
    per_word = _encode(surface, tokenizer)
    if [i for w in per_word for i in w] == ids:
        words = [(s, len(w)) for s, w in zip(surface, per_word) if w]
    else:
        # the text does not tokenize word by word (rare normalisation effects): one word per word piece
        words, pieces, run = [], _pieces(tokenizer, ids), []
        for piece in pieces:
            run.append(piece)
            if piece.endswith(_END_OF_WORD):
                words.append((_decode_pieces(run), len(run)))
                run = []
        if run:
            words.append((_decode_pieces(run), len(run)))
    return _Group(ids, weight, words)


def _segment_groups(seg: PromptSegment, tokenizer, resolve: Callable[[str], Any] | None,
                    split: bool) -> Iterator[_Group]:
    """ComfyUI's per-segment grouping (SDTokenizer.tokenize_with_weights), one group at a time.

    ``resolve(name)`` gives an embedding's vector count, None when unknown (dropped, as ComfyUI does when the
    file is missing) or ``_LITERAL`` (kept as text, as ComfyUI does without an embedding directory).
    """
    if seg.is_break:
        yield _Group([], 1.0, [], is_break=True)
        return
    parts = _split_embeddings(seg.text) if split else ([seg.text] if seg.text else [])
    for part in parts:
        if part.startswith(EMBEDDING_PREFIX) and resolve is not None:
            words = part[len(EMBEDDING_PREFIX):].strip("\n").split()
            name = words[0] if words else ""
            leftover = " ".join(words[1:])
            n = resolve(name) if name else _LITERAL
            if n is _LITERAL:
                yield _text_group(part, seg.weight, tokenizer)
                continue
            if n is None:
                stripped = name.strip(",")
                if len(stripped) < len(name):
                    n = resolve(stripped) if stripped else None
                    leftover = f"{name[len(stripped):]} {leftover}"
                    name = stripped
            if n is not None and n is not _LITERAL:
                yield _Group([-1] * int(n), seg.weight, [(EMBEDDING_PREFIX + name, int(n))], embedding=name)
            if leftover == "":
                continue
            part = leftover
        yield _text_group(part, seg.weight, tokenizer)


class _Builder:
    """Accumulates positions chunk by chunk and records which word each belongs to."""

    def __init__(self, tokenizer, bos: int, eos: int, pad: int):
        self.tokenizer = tokenizer
        self.bos, self.eos, self.pad = bos, eos, pad
        self.ids: list[int] = []
        self.weights: list[float] = []
        self.word_of: list[int] = []
        self.names: list[str | None] = []  # embedding name per position
        self.word_texts: list[tuple[str, float]] = []

    def new_word(self, text: str, weight: float) -> int:
        self.word_texts.append((text, weight))
        return len(self.word_texts) - 1

    def special(self, tid: int, count: int = 1):
        for _ in range(count):
            self.ids.append(tid)
            self.weights.append(1.0)
            self.word_of.append(-1)
            self.names.append(None)

    def token(self, tid: int, weight: float, word: int, name: str | None = None):
        self.ids.append(tid)
        self.weights.append(float(weight))
        self.word_of.append(word)
        self.names.append(name)

    def finish(self, chunk_length: int, overflow: Sequence[int] = (), tokenizer=None) -> TokenLayout:
        tokenizer = tokenizer or self.tokenizer
        real_pieces = iter(_pieces(tokenizer, [i for i in self.ids if i >= 0]))
        pieces = [next(real_pieces) if tid >= 0 else f"<{EMBEDDING_PREFIX}{name}:0>"
                  for tid, name in zip(self.ids, self.names)]
        # renumber words that kept at least one position
        positions: dict[int, list[int]] = {}
        for p, w in enumerate(self.word_of):
            if w >= 0:
                positions.setdefault(w, []).append(p)
        renumber = {old: new for new, old in enumerate(sorted(positions))}
        words = tuple(Word(self.word_texts[old][0], new, tuple(positions[old]), self.word_texts[old][1])
                      for old, new in renumber.items())
        word_of = tuple(renumber.get(w, -1) for w in self.word_of)
        # number each embedding's vectors 0..n-1
        pieces = _renumber_embedding_pieces(pieces, word_of)
        overflow_real = [i for i in overflow if i >= 0]
        op = iter(_pieces(tokenizer, overflow_real))
        overflow_pieces = tuple(next(op) if i >= 0 else f"<{EMBEDDING_PREFIX}?:0>" for i in overflow)
        return TokenLayout(tuple(self.ids), tuple(self.weights), tuple(pieces), word_of, words, chunk_length,
                           tuple(overflow), overflow_pieces, tokenizer)


def _renumber_embedding_pieces(pieces: list[str], word_of: Sequence[int]) -> list[str]:
    """Number each embedding word's vectors 0..n-1 (across chunk boundaries too)."""
    out, seen = [], {}
    for piece, w in zip(pieces, word_of):
        emb = _embedding_piece(piece)
        if emb is None:
            out.append(piece)
            continue
        k = seen.get(w, 0)
        seen[w] = k + 1
        out.append(f"<{EMBEDDING_PREFIX}{emb[0]}:{k}>")
    return out


def _flatten(groups: Sequence[_Group], b: _Builder) -> list[tuple[int, float, int, str | None]]:
    """(id, weight, word, embedding name) per content token, registering the words with the builder."""
    out = []
    for g in groups:
        k = 0
        for text, n in g.words:
            w = b.new_word(text, g.weight)
            for tid in g.ids[k:k + n]:
                out.append((tid, g.weight, w, g.embedding))
            k += n
    return out


def _chunk_comfy(groups: Sequence[_Group], b: _Builder, max_length: int):
    """ComfyUI's chunking: a group that does not fit in the current chunk moves to the next one whole, unless it
    has 8 or more tokens, in which case it fills the current chunk and continues in the next."""
    room = max_length - 1  # content + BOS per chunk, before EOS
    chunk = 1
    b.special(b.bos)
    for g in groups:
        if g.is_break:
            raise ValueError("BREAK is not part of the ComfyUI syntax")
        tokens = _flatten([g], b)
        # a group too long for an empty chunk is split even when short (only with a tiny max_length)
        large = len(tokens) >= _COMFY_MAX_WORD_LENGTH or len(tokens) > room - 1
        while tokens:
            if chunk + len(tokens) > room:
                space = room - chunk
                if large:
                    for t in tokens[:space]:
                        b.token(*t)
                    tokens = tokens[space:]
                    b.special(b.eos)
                else:
                    b.special(b.eos)
                    b.special(b.pad, space)
                b.special(b.bos)
                chunk = 1
            else:
                for t in tokens:
                    b.token(*t)
                chunk += len(tokens)
                tokens = []
    b.special(b.eos)
    b.special(b.pad, max_length - chunk - 1)


def _chunk_a1111(groups: Sequence[_Group], b: _Builder, max_length: int, comma_id: int | None):
    """A1111's chunking: 75 tokens per chunk, token by token; when a chunk fills up and a comma sits within its
    last 20 tokens, the tokens after that comma move to the next chunk; embeddings are not split; BREAK closes
    the current chunk (even an empty one)."""
    size = max_length - 2
    chunks: list[list[tuple]] = []
    chunk: list[tuple] = []
    last_comma = -1

    def close():
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = [], -1

    for g in groups:
        if g.is_break:
            close()
            continue
        tokens = _flatten([g], b)
        i = 0
        while i < len(tokens):
            tid = tokens[i][0]
            if g.embedding is not None:  # the whole embedding at once
                if len(chunk) + len(tokens) > size:
                    close()
                chunk.extend(tokens)
                break
            if comma_id is not None and tid == comma_id:
                last_comma = len(chunk)
            elif len(chunk) == size and last_comma != -1 and len(chunk) - last_comma <= _A1111_COMMA_BACKTRACK:
                moved = chunk[last_comma + 1:]
                chunk = chunk[:last_comma + 1]
                close()
                chunk = moved
            if len(chunk) == size:
                close()
            chunk.append(tokens[i])
            i += 1
    if chunk or not chunks:
        close()
    for c in chunks:
        b.special(b.bos)
        for t in c:
            b.token(*t)
        b.special(b.eos)
        b.special(b.pad, size - len(c))


def tokenize(prompt: str, tokenizer, *, syntax: str = "comfy", chunked: bool = True, max_length: int = 77,
             pad_with_end: bool = True, embeddings: Mapping[str, int] | None = None) -> TokenLayout:
    """Token layout of a prompt as a host would encode it.

    Parameters
    ----------
    prompt : str
    tokenizer : CLIPTokenizer-like
        Passed in (never loaded here); the same one the text encoder uses.
    syntax : {"comfy", "a1111", "plain"}
        Weighting dialect (:func:`daam_core.prompt.parse_prompt`). ``"comfy"`` reproduces ComfyUI's grouping and
        chunking exactly; ``"a1111"`` uses A1111's chunking (comma backtracking, ``BREAK``); ``"plain"`` is one
        segment of weight 1, chunked like ComfyUI when ``chunked``.
    chunked : bool
        True: long-prompt layout, chunks of ``max_length`` (BOS + up to ``max_length - 2`` tokens + EOS +
        padding), ``L = n_chunks * max_length``; an empty prompt gives one chunk. False: diffusers' layout, one
        chunk, tokens past ``max_length - 2`` dropped (``L = max_length``).
    max_length : int
        Chunk length (77 for CLIP).
    pad_with_end : bool
        Pad with EOS (SD1 CLIP-L, SDXL clip_l) or with id 0 (SD2 OpenCLIP-H, SDXL clip_g), as ComfyUI does.
    embeddings : mapping of str to int, optional
        Textual-inversion embeddings available, name -> number of vectors. ``embedding:name`` then occupies that
        many positions (id -1); an unknown name is dropped, as ComfyUI drops a missing file. With None,
        ``embedding:name`` is ordinary text (ComfyUI without an embedding folder).

    Returns
    -------
    TokenLayout
        ``length`` L positions, bound to ``tokenizer`` for queries.
    """
    if max_length < 3:
        raise ValueError("max_length must leave room for BOS, EOS and a token")
    bos, eos = _special_ids(tokenizer)
    b = _Builder(tokenizer, bos, eos, eos if pad_with_end else 0)
    resolve = None if embeddings is None else _lookup_embedding(embeddings)
    if resolve is None and syntax == "comfy":
        resolve = lambda name: _LITERAL  # noqa: E731 - ComfyUI still splits groups at "embedding:"
    split = syntax == "comfy" or embeddings is not None
    groups = [g for seg in parse_prompt(prompt, syntax) for g in _segment_groups(seg, tokenizer, resolve, split)]

    if not chunked:
        size = max_length - 2
        tokens = _flatten([g for g in groups if not g.is_break], b)
        b.special(bos)
        for t in tokens[:size]:
            b.token(*t)
        b.special(eos)
        b.special(b.pad, size - min(size, len(tokens)))
        return b.finish(max_length, [t[0] for t in tokens[size:]])
    if syntax == "a1111":
        comma = _encode([","], tokenizer)[0]
        _chunk_a1111(groups, b, max_length, comma[0] if len(comma) == 1 else None)
    else:
        _chunk_comfy(groups, b, max_length)
    return b.finish(max_length)


# -- from what the host encoded ---------------------------------------------------------------------------------------


def _as_id(token) -> int:
    """A host token: a Python/NumPy/0-d tensor integer -> its id; an embedding vector -> -1."""
    if isinstance(token, numbers.Integral):
        return int(token)
    shape = getattr(token, "shape", None)
    if shape is not None and len(shape) == 0:
        return int(token.item())
    return -1


def layout_from_comfy_tokens(chunks, tokenizer, *, prompt: str) -> TokenLayout:
    """Layout of exactly what ComfyUI's tokenizer produced for one text encoder.

    Parameters
    ----------
    chunks : list of list of (token, weight, word_id)
        ``SDTokenizer.tokenize_with_weights(prompt, return_word_ids=True)`` for one encoder (e.g. ``["l"]``):
        ``n_chunks`` lists of ``chunk_length`` entries; ``token`` is an int id or an embedding vector tensor,
        ``word_id`` is 0 for BOS/EOS/padding and otherwise numbers ComfyUI's word groups.
    tokenizer : CLIPTokenizer-like
        The encoder's Hugging Face tokenizer (``sd_tokenizer.tokenizer``).
    prompt : str
        The text that was tokenized, to recover the words as written and the embeddings' names.

    Returns
    -------
    TokenLayout
        Ids and weights exactly as the host encodes them, ``length = n_chunks * chunk_length``.
    """
    flat = [entry for chunk in chunks for entry in chunk]
    if not chunks or not flat:
        raise ValueError("no tokens: expected the output of tokenize_with_weights(..., return_word_ids=True)")
    chunk_length = len(chunks[0])
    if any(len(c) != chunk_length for c in chunks):
        raise ValueError("chunks differ in length")
    ids = [_as_id(e[0]) for e in flat]
    weights = [float(e[1]) for e in flat]
    if any(len(e) < 3 for e in flat):
        raise ValueError("word ids missing: call tokenize_with_weights(text, return_word_ids=True)")
    word_ids = [int(e[2]) for e in flat]

    # the host's groups in order of appearance
    host_groups: dict[int, list[int]] = {}
    for p, wid in enumerate(word_ids):
        if wid != 0:
            host_groups.setdefault(wid, []).append(p)
    groups = list(host_groups.values())

    assigned = None
    for literal in (False, True):
        assigned = _align_comfy(prompt, tokenizer, groups, ids, literal)
        if assigned is not None:
            break
    if assigned is None:
        assigned = _words_from_pieces(groups, ids, tokenizer)

    word_of = [-1] * len(ids)
    names: list[str | None] = [None] * len(ids)
    words = []
    for index, (text, positions, name) in enumerate(assigned):
        for p in positions:
            word_of[p] = index
            names[p] = name
        words.append(Word(text, index, tuple(positions), weights[positions[0]]))
    real = [i for i in ids if i >= 0]
    it = iter(_pieces(tokenizer, real))
    pieces = [next(it) if i >= 0 else f"<{EMBEDDING_PREFIX}{names[p] or '?'}:0>" for p, i in enumerate(ids)]
    pieces = _renumber_embedding_pieces(pieces, word_of)
    return TokenLayout(tuple(ids), tuple(weights), tuple(pieces), tuple(word_of), tuple(words), chunk_length,
                       (), (), tokenizer)


def _align_comfy(prompt: str, tokenizer, host: list[list[int]], ids: list[int], literal: bool):
    """Replay ComfyUI's grouping of ``prompt`` against the host's groups.

    Returns ``[(word text, positions, embedding name)]``, or None when the replay disagrees with the host.
    """
    state = {"j": 0}

    def resolve(name: str):
        if literal:
            return _LITERAL
        j = state["j"]
        if j < len(host) and all(ids[p] < 0 for p in host[j]):
            # the host found a file: by the name as written unless it has commas to strip
            return None if name != name.strip(",") else len(host[j])
        return None

    out = []
    for seg in parse_prompt(prompt, "comfy"):
        for g in _segment_groups(seg, tokenizer, resolve, True):
            if not g.ids:
                continue
            j = state["j"]
            if j >= len(host):
                return None
            positions = host[j]
            host_ids = [ids[p] for p in positions]
            if g.embedding is not None:
                if any(i >= 0 for i in host_ids):
                    return None
            elif host_ids != g.ids:
                return None
            k = 0
            for text, n in g.words:
                out.append((text, positions[k:k + n], g.embedding))
                k += n
            state["j"] = j + 1
    return out if state["j"] == len(host) else None


def _words_from_pieces(host: list[list[int]], ids: list[int], tokenizer):
    """Fallback words: one per word piece (up to an end-of-word marker), embeddings one each."""
    out = []
    n_emb = 0
    for positions in host:
        if all(ids[p] < 0 for p in positions):
            name = f"embedding{n_emb}"
            n_emb += 1
            out.append((EMBEDDING_PREFIX + name, list(positions), name))
            continue
        run_pos: list[int] = []
        run_pieces: list[str] = []
        for p, piece in zip(positions, _pieces(tokenizer, [ids[p] for p in positions])):
            run_pos.append(p)
            run_pieces.append(piece)
            if piece.endswith(_END_OF_WORD):
                out.append((_decode_pieces(run_pieces), run_pos, None))
                run_pos, run_pieces = [], []
        if run_pos:
            out.append((_decode_pieces(run_pieces), run_pos, None))
    return out
