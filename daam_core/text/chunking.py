"""Chunking rules: how ComfyUI and A1111 spread a prompt's tokens over 77-token chunks (BOS + 75 + EOS)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass
class Group:
    """What ComfyUI calls a word: the tokens of one segment piece, or one embedding's vectors."""

    ids: list[int]                       # -1 per embedding vector
    weight: float
    words: list[tuple[str, int]]         # (surface text, token count), partitioning ids
    embedding: str | None = None
    is_break: bool = False


class Builder(Protocol):
    """What the chunking rules need of a layout builder (``daam_core.text.tokenize``'s): the special ids, and
    positions added one at a time."""

    bos: int
    eos: int
    pad: int

    def new_word(self, text: str, weight: float) -> int: ...

    def token(self, tid: int, weight: float, word: int, name: str | None = None) -> None: ...

    def special(self, tid: int, count: int = 1) -> None: ...

_COMFY_MAX_WORD_LENGTH = 8  # a group of at least this many tokens may be split across chunks
_A1111_COMMA_BACKTRACK = 20  # A1111's default "comma_padding_backtrack"


def flatten(groups: Sequence[Group], b: Builder) -> list[tuple[int, float, int, str | None]]:
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


def chunk_comfy(groups: Sequence[Group], b: Builder, max_length: int):
    """ComfyUI's chunking: a group that does not fit in the current chunk moves to the next one whole, unless it
    has 8 or more tokens, in which case it fills the current chunk and continues in the next."""
    room = max_length - 1  # content + BOS per chunk, before EOS
    chunk = 1
    b.special(b.bos)
    for g in groups:
        if g.is_break:
            raise ValueError("BREAK is not part of the ComfyUI syntax")
        tokens = flatten([g], b)
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


def chunk_a1111(groups: Sequence[Group], b: Builder, max_length: int, comma_id: int | None):
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
        tokens = flatten([g], b)
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
