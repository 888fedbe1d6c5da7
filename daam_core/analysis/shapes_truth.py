"""Scoring one generated image of the shapes model against what it really drew.

The objects a prompt names (``{"color": "red" | None, "shape": "circle"}`` in prompt order) are found in the image by
colour (:func:`daam_core.scenes.detect_objects`); each noun's and colour word's thresholded map is then compared
with its object's exact mask.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np
import torch

from .entanglement import adjective_spread, map_overlap, match_objects, shape_similarity


def objects_in_prompt(prompt: str) -> list[dict]:
    """``[{"color", "shape"}]`` of the shapes vocabulary named in ``prompt``, in order (colour None if not said)."""
    from ..shapes.scenes import COLORS, SHAPES

    colors = "|".join(COLORS)
    shapes = "|".join(SHAPES)
    out = []
    for m in re.finditer(rf"\b(?:({colors})\s+)?({shapes})\b", prompt.lower()):
        out.append({"color": m.group(1), "shape": m.group(2)})
    return out


def _queries(objects: Sequence[Mapping]) -> tuple[list[str], list[str | None]]:
    """Per object the query of its noun and of its colour (``circle#2`` for the second circle)."""
    seen: dict[str, int] = {}

    def q(word: str) -> str:
        seen[word] = seen.get(word, 0) + 1
        return f"{word}#{seen[word]}"

    nouns, colors = [], []
    for o in objects:
        colors.append(q(o["color"]) if o.get("color") else None)
        nouns.append(q(o["shape"]))
    return nouns, colors


def score_item(trace, image: np.ndarray, objects: Sequence[Mapping], tau: float = 0.4, image_index: int = 0) -> dict:
    """What was drawn and how the maps fit it.

    Parameters
    ----------
    trace : AttentionTrace
    image : ndarray ``[H, W, 3]`` uint8
        The generated image (same size as the trace's maps).
    objects : sequence of ``{"color": str | None, "shape": str}``

    Returns
    -------
    dict with ``objects`` (per object: ``present``, ``noun_iou`` and ``color_iou`` against its mask, ``spread``
    (colour mask outside the object) and ``spread_map`` (outside the noun's mask), ``noun_wrong_iou`` against the
    other object), ``drawn_right``, and for two objects ``both_present``, ``noun_overlap``, ``similarity``.
    """
    from ..engine.masks import threshold
    from ..shapes.scenes import detect_objects

    if not objects:
        raise ValueError("the prompt names no object of the shapes vocabulary")
    found = detect_objects(image)
    match = match_objects(objects, found)
    nouns, colors = _queries(objects)
    queries = nouns + [c for c in colors if c]
    maps = trace.word_maps(queries, image=image_index, size=tuple(image.shape[:2]))
    masks = threshold(maps, tau).bool()
    at = {q: i for i, q in enumerate(queries)}
    truth = [torch.from_numpy(found[j][2]) if j is not None else None for j in match]
    rows = []
    for i, o in enumerate(objects):
        noun = masks[at[nouns[i]]]
        row = {"color": o.get("color"), "shape": o["shape"], "present": truth[i] is not None}
        if truth[i] is not None:
            row["noun_iou"] = map_overlap(noun, truth[i])
        if colors[i]:
            col = masks[at[colors[i]]]
            row["spread_map"] = adjective_spread(col, noun)
            if truth[i] is not None:
                row["color_iou"] = map_overlap(col, truth[i])
                row["spread"] = adjective_spread(col, truth[i])
        others = [truth[k] for k in range(len(objects)) if k != i and truth[k] is not None]
        if others:
            row["noun_wrong_iou"] = map_overlap(noun, others[0])
        rows.append(row)
    out = {"objects": rows, "drawn_right": all(r["present"] for r in rows), "found": len(found)}
    if len(objects) == 2:
        out["both_present"] = out["drawn_right"]
        out["noun_overlap"] = map_overlap(masks[at[nouns[0]]], masks[at[nouns[1]]])
        out["similarity"] = shape_similarity(objects[0]["shape"], objects[1]["shape"])
    return out
