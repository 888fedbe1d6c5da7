"""Textual-inversion embeddings in prompts: ``embedding:name`` and the pieces that stand for their vectors."""

from __future__ import annotations

import re
from typing import Callable, Mapping

EMBEDDING_PREFIX = "embedding:"
_EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")


def embedding_piece(piece: str | None) -> tuple[str, int] | None:
    """``"<embedding:name:3>"`` -> ``("name", 3)``."""
    if piece and piece.startswith("<" + EMBEDDING_PREFIX) and piece.endswith(">"):
        name, _, k = piece[len(EMBEDDING_PREFIX) + 1:-1].rpartition(":")
        if k.isdigit():
            return name, int(k)
    return None


def embedding_key(piece: str) -> tuple[str, str, int]:
    """Matching key of an embedding vector: the same file named with or without extension matches."""
    name, k = embedding_piece(piece)
    return ("emb", embedding_stem(name), k)


def strip_prefix(text: str) -> str:
    return text[len(EMBEDDING_PREFIX):].strip() if text.startswith(EMBEDDING_PREFIX) else text


def embedding_stem(name: str) -> str:
    for ext in _EMBEDDING_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def same_embedding(word_text: str, name: str) -> bool:
    return embedding_stem(strip_prefix(word_text)) == embedding_stem(name)


def split_embeddings(text: str) -> list[str]:
    """ComfyUI's split before every ``embedding:`` that follows a space or newline; empty parts dropped."""
    parts = re.split(" " + EMBEDDING_PREFIX + "|\n" + EMBEDDING_PREFIX, text)
    parts = [parts[0]] + [EMBEDDING_PREFIX + p for p in parts[1:]]
    return [p for p in parts if p != ""]


def lookup_embedding(embeddings: Mapping[str, int]) -> Callable[[str], int | None]:
    """Name -> vector count, accepting the name with or without a file extension (as ComfyUI does)."""
    stems = {}
    for key, n in embeddings.items():
        stems.setdefault(embedding_stem(key), int(n))

    def resolve(name: str) -> int | None:
        if name in embeddings:
            return int(embeddings[name])
        return stems.get(embedding_stem(name))

    return resolve

