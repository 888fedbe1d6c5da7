"""Entanglement: cohyponyms sharing pixels (and one of them going missing), adjectives spreading past their noun.

The paper's findings: for "a(n) X and a(n) Y", the maps of similar objects (giraffe, zebra) overlap more and one of
the two is more often missing from the image; an adjective's map reaches beyond the object it modifies. On the
shapes model (:mod:`daam_core.scenes`) which objects were drawn is detected exactly, so both can be measured.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

VOWEL_SOUND = re.compile(r"^[aeiou]", re.I)


def article(noun: str) -> str:
    """``"an"`` before a vowel letter, else ``"a"``."""
    return "an" if VOWEL_SOUND.match(noun) else "a"


def cohyponym_prompts(pairs: Iterable[tuple[str, str]]) -> list[str]:
    """``"a(n) X and a(n) Y"`` for each ``(X, Y)``."""
    return [f"{article(x)} {x} and {article(y)} {y}" for x, y in pairs]


def _bool(mask) -> torch.Tensor:
    m = torch.as_tensor(np.asarray(mask)) if not isinstance(mask, torch.Tensor) else mask
    return m.bool() if m.dtype == torch.bool else m.float() >= 0.5


def map_overlap(mask_a, mask_b) -> float:
    """IoU of two binary masks ``[H, W]`` (the thresholded maps of X and Y); two empty masks give 0."""
    a, b = _bool(mask_a), _bool(mask_b)
    union = (a | b).sum().item()
    return (a & b).sum().item() / union if union else 0.0


def adjective_spread(adjective_mask, noun_mask) -> float:
    """Fraction of an adjective's mask ``[H, W]`` outside its noun's mask (0: inside it, 1: all outside).

    ``noun_mask`` is the noun's object where ground truth exists, else the noun's own thresholded map.
    """
    a, n = _bool(adjective_mask), _bool(noun_mask)
    if a.shape != n.shape:
        raise ValueError(f"masks must have the same shape, got {tuple(a.shape)} and {tuple(n.shape)}")
    total = a.sum().item()
    if total == 0:
        raise ValueError("the adjective's mask is empty: its spread is undefined")
    return (a & ~n).sum().item() / total


def shape_similarity(a: str, b: str, size: int = 256) -> float:
    """IoU of two shapes drawn with the same centre and bounding box: how alike they look (1 for the same)."""
    from ..shapes.scenes import shape_mask

    c = (size / 2, size / 2)
    return map_overlap(shape_mask(a, c, 0.8 * size, (size, size)), shape_mask(b, c, 0.8 * size, (size, size)))


def match_objects(expected: Sequence[Mapping], found: Sequence[tuple[str, str, np.ndarray]]) -> list[int | None]:
    """For each expected object ``{"color": str | None, "shape": str}`` the index into ``found`` of the detected
    ``(colour, shape, mask)`` that is it, or None; each detection is used once, objects with a colour first."""
    used: set[int] = set()
    out: list[int | None] = [None] * len(expected)
    order = sorted(range(len(expected)), key=lambda i: expected[i].get("color") is None)
    for i in order:
        e = expected[i]
        for j, (color, shape, _) in enumerate(found):
            if j in used or shape != e["shape"] or (e.get("color") and color != e["color"]):
                continue
            out[i] = j
            used.add(j)
            break
    return out


def cohyponym_summary(rows: Iterable[Mapping]) -> list[dict]:
    """Mean map overlap and how often both objects appear, per group of two-object rows.

    ``rows`` hold ``group``, ``overlap`` (IoU of the two nouns' masks) and ``both_present`` (bool, or None where
    it is unknown: left out of that mean, which is NaN when no row of the group knows).
    """
    groups: dict[str, list[Mapping]] = {}
    for r in rows:
        groups.setdefault(str(r["group"]), []).append(r)
    out = []
    for g, items in sorted(groups.items()):
        n = len(items)
        known = [bool(r["both_present"]) for r in items if r["both_present"] is not None]
        out.append({"group": g, "prompts": n, "overlap": sum(float(r["overlap"]) for r in items) / n,
                    "both_present": sum(known) / len(known) if known else float("nan")})
    return out
