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

