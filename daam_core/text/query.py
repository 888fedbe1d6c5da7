"""Word queries: ``dog``, ``red car``, ``dog#2``, comma-separated word lists, and the error for a missing word."""

from __future__ import annotations

import re
from typing import Sequence


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


def split_words(text: str | None) -> list[str]:
    """A comma-separated word list -> its non-empty, stripped entries (``"cat, dog#2,"`` -> ``["cat", "dog#2"]``)."""
    return [w.strip() for w in (text or "").split(",") if w.strip()]
