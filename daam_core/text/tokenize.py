"""Token layouts built by re-doing a host's tokenization: ComfyUI, A1111-style and diffusers (plain) prompts.

Nothing here imports a host or transformers: the tokenizer is passed in (see :mod:`daam_core.text.pieces`).
The chunking rules of each syntax are in :mod:`daam_core.text.chunking`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

from .chunking import Group, chunk_a1111, chunk_comfy, flatten
from .embeddings import EMBEDDING_PREFIX, embedding_piece, lookup_embedding, split_embeddings
from .layout import TokenLayout, Word
from .pieces import END_OF_WORD, decode_pieces, encode, pieces_of, special_ids
from .syntax import PromptSegment, parse_prompt

__all__ = ["tokenize"]


_Group = Group


LITERAL = object()  # resolver answer: treat "embedding:name" as ordinary text


def _text_group(text: str, weight: float, tokenizer) -> _Group:
    """Tokenize a piece of text as one unit and split its tokens among its whitespace-separated words."""
    ids = encode([text], tokenizer)[0] if text.strip() else []
    surface = text.split()
    per_word = encode(surface, tokenizer)
    if [i for w in per_word for i in w] == ids:
        words = [(s, len(w)) for s, w in zip(surface, per_word) if w]
    else:
        # the text does not tokenize word by word (rare normalisation effects): one word per word piece
        words, pieces, run = [], pieces_of(tokenizer, ids), []
        for piece in pieces:
            run.append(piece)
            if piece.endswith(END_OF_WORD):
                words.append((decode_pieces(run), len(run)))
                run = []
        if run:
            words.append((decode_pieces(run), len(run)))
    return _Group(ids, weight, words)


def segment_groups(seg: PromptSegment, tokenizer, resolve: Callable[[str], Any] | None,
                    split: bool) -> Iterator[_Group]:
    """ComfyUI's per-segment grouping (SDTokenizer.tokenize_with_weights), one group at a time.

    ``resolve(name)`` gives an embedding's vector count, None when unknown (dropped, as ComfyUI does when the
    file is missing) or ``LITERAL`` (kept as text, as ComfyUI does without an embedding directory).
    """
    if seg.is_break:
        yield _Group([], 1.0, [], is_break=True)
        return
    parts = split_embeddings(seg.text) if split else ([seg.text] if seg.text else [])
    for part in parts:
        if part.startswith(EMBEDDING_PREFIX) and resolve is not None:
            words = part[len(EMBEDDING_PREFIX):].strip("\n").split()
            name = words[0] if words else ""
            leftover = " ".join(words[1:])
            n = resolve(name) if name else LITERAL
            if n is LITERAL:
                yield _text_group(part, seg.weight, tokenizer)
                continue
            if n is None:
                stripped = name.strip(",")
                if len(stripped) < len(name):
                    n = resolve(stripped) if stripped else None
                    leftover = f"{name[len(stripped):]} {leftover}"
                    name = stripped
            if n is not None and n is not LITERAL:
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
        real_pieces = iter(pieces_of(tokenizer, [i for i in self.ids if i >= 0]))
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
        pieces = renumber_embedding_pieces(pieces, word_of)
        overflow_real = [i for i in overflow if i >= 0]
        op = iter(pieces_of(tokenizer, overflow_real))
        overflow_pieces = tuple(next(op) if i >= 0 else f"<{EMBEDDING_PREFIX}?:0>" for i in overflow)
        return TokenLayout(tuple(self.ids), tuple(self.weights), tuple(pieces), word_of, words, chunk_length,
                           tuple(overflow), overflow_pieces, tokenizer)


def renumber_embedding_pieces(pieces: list[str], word_of: Sequence[int]) -> list[str]:
    """Number each embedding word's vectors 0..n-1 (across chunk boundaries too)."""
    out, seen = [], {}
    for piece, w in zip(pieces, word_of):
        emb = embedding_piece(piece)
        if emb is None:
            out.append(piece)
            continue
        k = seen.get(w, 0)
        seen[w] = k + 1
        out.append(f"<{EMBEDDING_PREFIX}{emb[0]}:{k}>")
    return out


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
    bos, eos = special_ids(tokenizer)
    b = _Builder(tokenizer, bos, eos, eos if pad_with_end else 0)
    resolve = None if embeddings is None else lookup_embedding(embeddings)
    if resolve is None and syntax == "comfy":
        resolve = lambda name: LITERAL  # noqa: E731 - ComfyUI still splits groups at "embedding:"
    split = syntax == "comfy" or embeddings is not None
    groups = [g for seg in parse_prompt(prompt, syntax) for g in segment_groups(seg, tokenizer, resolve, split)]

    if not chunked:
        size = max_length - 2
        tokens = flatten([g for g in groups if not g.is_break], b)
        b.special(bos)
        for t in tokens[:size]:
            b.token(*t)
        b.special(eos)
        b.special(b.pad, size - min(size, len(tokens)))
        return b.finish(max_length, [t[0] for t in tokens[size:]])
    if syntax == "a1111":
        comma = encode([","], tokenizer)[0]
        chunk_a1111(groups, b, max_length, comma[0] if len(comma) == 1 else None)
    else:
        chunk_comfy(groups, b, max_length)
    return b.finish(max_length)

