"""Tokenizer helpers shared by the layout builders: ids without specials, readable BPE pieces, pre-tokens.

The tokenizer is passed in (never loaded here): anything with ``bos_token_id``, ``eos_token_id``,
``convert_ids_to_tokens`` and ``__call__(texts, add_special_tokens=False)`` returning ``{"input_ids": ...}``.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from typing import Sequence

END_OF_WORD = "</w>"


def encode(texts: Sequence[str], tokenizer) -> list[list[int]]:
    """Token ids of each text without BOS/EOS."""
    if not texts:
        return []
    out = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(map(int, ids)) for ids in out]


def special_ids(tokenizer) -> tuple[int, int]:
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    if bos is None or eos is None:
        empty = tokenizer("")["input_ids"]
        bos, eos = int(empty[0]), int(empty[-1])
    return int(bos), int(eos)


def pieces_of(tokenizer, ids: Sequence[int]) -> list[str]:
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


def decode_pieces(pieces: Sequence[str]) -> str:
    """Readable text of consecutive BPE pieces (lower case, no end-of-word markers)."""
    table = _byte_decoder()
    raw = "".join(pieces).replace(END_OF_WORD, "")
    if all(ch in table for ch in raw):
        return bytes(table[ch] for ch in raw).decode("utf-8", errors="replace")
    return raw


# CLIP's pre-tokenizer, approximated with the standard library (\p{L} ~ [^\W\d_], \p{N} ~ \d)
_PRETOKEN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+")


def pretokens(text: str) -> list[str]:
    text = unicodedata.normalize("NFC", " ".join(text.split())).lower()
    return _PRETOKEN.findall(text)


# -- SentencePiece (T5) pieces: word starts instead of word ends --------------------------------------------
WORD_START = "\u2581"  # "▁": SentencePiece marks the start of a whitespace word
_RUN = re.compile(r"[^\W_]+|[\W_]+")


def is_sentencepiece(tokenizer) -> bool:
    """Whether a tokenizer writes SentencePiece pieces (``"▁"`` word starts), e.g. T5TokenizerFast."""
    ids = encode(["a b"], tokenizer)[0]
    return any(str(p).startswith(WORD_START) for p in tokenizer.convert_ids_to_tokens(ids))


def word_keys(text: str) -> list[str]:
    """Matching keys of a query or a decoded word: lower-case runs of letters/digits and of punctuation."""
    return [m.group(0).lower() for w in text.split() for m in _RUN.finditer(w)]


def piece_units(pieces: Sequence[str], positions: Sequence[int], word_of: Sequence[int]
                ) -> list[tuple[str, tuple[int, ...]]]:
    """Matching units of a run of SentencePiece content pieces: ``(key, positions)`` in order.

    A whitespace word starts at a ``"▁"`` piece or where the prompt's word changes; its decoded text is split as
    :func:`word_keys` does, each run keeping the positions of the pieces its characters came from.
    """
    units: list[tuple[str, tuple[int, ...]]] = []
    chars: list[tuple[str, set]] = []  # character, positions it stands for
    pending: list[int] = []  # positions of pieces without characters (a bare "▁"): joined to the next one
    prev_word = None

    def flush():
        if pending and chars:
            chars[-1][1].update(pending)
        pending.clear()
        text = "".join(c for c, _ in chars)
        for m in _RUN.finditer(text):
            pos = sorted(set().union(*(chars[i][1] for i in range(m.start(), m.end()))))
            units.append((m.group(0).lower(), tuple(pos)))
        chars.clear()

    for piece, pos, word in zip(pieces, positions, word_of):
        if piece.startswith(WORD_START) or word != prev_word:
            flush()
        body = [c for c in (piece[len(WORD_START):] if piece.startswith(WORD_START) else piece) if not c.isspace()]
        if not body:
            pending.append(pos)
        for c in body:
            chars.append((c, {pos, *pending}))
            pending.clear()
        prev_word = word
    flush()
    return units
