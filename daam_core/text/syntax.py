"""Prompt weighting syntax, without any tokenizer.

Three dialects are understood:

``"comfy"``
    ComfyUI 0.3.75's rules (``comfy/sd1_clip.py``): ``(text:1.2)`` sets an absolute weight, ``(text)`` multiplies
    the enclosing weight by 1.1 (so ``((text))`` is 1.21), ``\\(`` and ``\\)`` are literal parentheses. Square
    brackets and ``BREAK`` are ordinary text.
``"a1111"``
    The AUTOMATIC1111 WebUI's rules: ``(text:1.2)`` multiplies by 1.2, ``(text)`` by 1.1, ``[text]`` divides by
    1.1, nesting multiplies, ``\\( \\) \\[ \\] \\\\`` are literals, unclosed brackets extend to the end of the
    prompt, adjacent pieces of equal weight are merged, and ``BREAK`` (upper case, a word of its own) ends the
    current 75-token chunk.
``"plain"``
    No syntax: the prompt is one segment of weight 1 (what a diffusers pipeline feeds its tokenizer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["PromptSegment", "parse_prompt", "SYNTAXES"]

SYNTAXES = ("comfy", "a1111", "plain")


@dataclass(frozen=True)
class PromptSegment:
    """A run of prompt text that shares one weight.

    Attributes
    ----------
    text : str
        The text with weight syntax and escapes removed (``""`` for a break).
    weight : float
        Multiplier applied to the run's token embeddings.
    is_break : bool
        True for an A1111 ``BREAK`` marker, which starts a new chunk.
    """

    text: str
    weight: float
    is_break: bool = False


def parse_prompt(prompt: str, syntax: str = "comfy") -> list[PromptSegment]:
    """Split a prompt into weighted segments.

    Parameters
    ----------
    prompt : str
        The prompt as typed.
    syntax : {"comfy", "a1111", "plain"}
        Which weighting dialect to apply (see the module docstring).

    Returns
    -------
    list of PromptSegment
        Segments in prompt order. Each is tokenized on its own by the hosts (a token never spans two segments).
        ``"comfy"`` may return whitespace-only segments, as ComfyUI does; ``"plain"`` always returns exactly one.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")
    if syntax == "comfy":
        return _parse_comfy(prompt)
    if syntax == "a1111":
        return _parse_a1111(prompt)
    if syntax == "plain":
        return [PromptSegment(prompt, 1.0)]
    raise ValueError(f"unknown prompt syntax {syntax!r}; expected one of {', '.join(SYNTAXES)}")


# -- ComfyUI ------------------------------------------------------------------------------------------------------

# ComfyUI hides escaped parentheses behind control characters while it parses, then restores them per segment.
_COMFY_ESCAPES = (("\\)", "\0\1", ")"), ("\\(", "\0\2", "("))


def _comfy_escape(text: str) -> str:
    for escaped, hidden, _ in _COMFY_ESCAPES:
        text = text.replace(escaped, hidden)
    return text


def _comfy_unescape(text: str) -> str:
    for _, hidden, literal in _COMFY_ESCAPES:
        text = text.replace(hidden, literal)
    return text


def _comfy_top_level(text: str) -> list[str]:
    """Split at top-level parenthesised groups: ``"a (b (c)) d"`` -> ``["a ", "(b (c))", " d"]``.

    An unmatched ``)`` drives the depth negative, after which nothing closes at top level again; that is
    ComfyUI's behaviour and is kept.
    """
    items: list[str] = []
    current = ""
    depth = 0
    for ch in text:
        if ch == "(":
            if depth == 0 and current:
                items.append(current)
                current = ""
            current += ch
            depth += 1
        elif ch == ")":
            depth -= 1
            current += ch
            if depth == 0:
                items.append(current)
                current = ""
        else:
            current += ch
    if current:
        items.append(current)
    return items


def _comfy_weights(text: str, weight: float) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    for item in _comfy_top_level(text):
        if len(item) >= 2 and item[0] == "(" and item[-1] == ")":
            inner = item[1:-1]
            inner_weight = weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    # an explicit weight replaces (does not multiply) the enclosing one
                    inner_weight = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out.extend(_comfy_weights(inner, inner_weight))
        else:
            out.append((item, weight))
    return out


def _parse_comfy(prompt: str) -> list[PromptSegment]:
    return [PromptSegment(_comfy_unescape(t), w) for t, w in _comfy_weights(_comfy_escape(prompt), 1.0)]


# -- AUTOMATIC1111 ------------------------------------------------------------------------------------------------

_A1111_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]            # escaped bracket or backslash
    | \\                      # a lone backslash (dropped)
    | [(\[]                   # opening bracket
    | :\s*([+-]?[.\d]+)\s*\)  # ':1.2)' closes a round bracket with an explicit multiplier
    | [)\]]                   # closing bracket
    | [^\\()\[\]:]+           # plain text
    | :                       # a colon that is not a weight
    """,
    re.X,
)
_A1111_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def _parse_a1111(prompt: str) -> list[PromptSegment]:
    # pieces are [text, weight, is_break]; open brackets remember where their range starts
    pieces: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for p in pieces[start:]:
            if not p[2]:
                p[1] *= factor

    for m in _A1111_TOKEN.finditer(prompt):
        tok, explicit = m.group(0), m.group(1)
        if tok.startswith("\\"):
            pieces.append([tok[1:], 1.0, False])
        elif tok == "(":
            round_open.append(len(pieces))
        elif tok == "[":
            square_open.append(len(pieces))
        elif explicit is not None and round_open:
            try:
                factor = float(explicit)
            except ValueError:  # e.g. ':.)' matches the pattern but is no number
                factor = 1.1
            scale(round_open.pop(), factor)
        elif tok == ")" and round_open:
            scale(round_open.pop(), 1.1)
        elif tok == "]" and square_open:
            scale(square_open.pop(), 1 / 1.1)
        else:
            for k, part in enumerate(_A1111_BREAK.split(tok)):
                if k > 0:
                    pieces.append(["", 1.0, True])
                pieces.append([part, 1.0, False])
    # unclosed brackets apply to the rest of the prompt
    for start in round_open:
        scale(start, 1.1)
    for start in square_open:
        scale(start, 1 / 1.1)

    merged: list[list] = []
    for p in pieces:
        if merged and not p[2] and not merged[-1][2] and merged[-1][1] == p[1]:
            merged[-1][0] += p[0]
        else:
            merged.append(p)
    return [PromptSegment(t, w, b) for t, w, b in merged if b or t]
