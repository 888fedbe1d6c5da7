"""The prompt set of the shapes study: colour/shape phrases with and without positions, two-object prompts.

Every prompt carries its ``kind``, whether it says ``positions`` and its ``objects`` (``{"color", "shape"}`` in
prompt order), so that the study's records can be grouped without parsing the text again.
"""

from __future__ import annotations

from itertools import permutations, product

from .entanglement import article


def _phrase(color: str | None, shape: str) -> str:
    return f"{article(color or shape)} {color + ' ' if color else ''}{shape}"


def shapes_study_prompts() -> list[dict]:
    """522 prompts over the shapes vocabulary (:mod:`daam_core.scenes`).

    Kinds: ``one`` (a colour and a shape), ``two-different`` / ``two-same-shape`` / ``two-same-color`` (two coloured
    objects), ``two-plain`` (two shapes without colours: the cohyponym prompt "a X and a Y"), ``two-mixed`` (only
    the first object coloured). Positions: none, or "on the left/right" after each object.
    """
    from ..shapes.scenes import COLORS, SHAPES

    colors = list(COLORS)
    sides = [None, ("left", "right"), ("right", "left")]
    out = []

    def add(kind: str, objs: list[tuple[str | None, str]], where) -> None:
        parts = []
        for k, (c, s) in enumerate(objs):
            text = _phrase(c, s)
            if where:
                text += f" on the {where[k]}"
            parts.append(text)
        out.append({"prompt": " and ".join(parts), "kind": kind, "positions": bool(where),
                    "objects": [{"color": c, "shape": s} for c, s in objs]})

    for c, s in product(colors, SHAPES):
        for where in (None, ("left",), ("right",)):
            add("one", [(c, s)], where)
    for (c1, c2), (s1, s2) in product(permutations(colors, 2), product(SHAPES, SHAPES)):
        for where in sides:
            add("two-same-shape" if s1 == s2 else "two-different", [(c1, s1), (c2, s2)], where)
    for c, (s1, s2) in product(colors, permutations(SHAPES, 2)):
        for where in sides:
            add("two-same-color", [(c, s1), (c, s2)], where)
    for (s1, s2) in permutations(SHAPES, 2):
        for where in sides:
            add("two-plain", [(None, s1), (None, s2)], where)
    for c, (s1, s2) in product(colors, permutations(SHAPES, 2)):
        for where in sides:
            add("two-mixed", [(c, s1), (None, s2)], where)
    return out
