"""Head/dependent map overlap (the paper's mIoU, mIoD, mIoH) per pair, per prompt and over a study.

A pair's numbers come from the two tokens' maps thresholded at ``tau`` of their maximum: IoU, intersection over
the dependent's mask (IoD: how much of the dependent lies inside the head) and over the head's mask (IoH).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping, Sequence

import torch

from .syntax import ParsedPrompt, Relation

PAIR_FIELDS = ("iou", "iod", "ioh")


def pair_stats(head: torch.Tensor, dependent: torch.Tensor) -> dict[str, float]:
    """IoU, IoD and IoH of two binary masks ``[H, W]`` (0/1 or bool)."""
    h = head.bool()
    d = dependent.bool()
    if h.shape != d.shape:
        raise ValueError(f"masks must have the same shape, got {tuple(h.shape)} and {tuple(d.shape)}")
    inter = (h & d).sum().item()
    union = (h | d).sum().item()
    nh, nd = h.sum().item(), d.sum().item()
    return {"iou": inter / union if union else 1.0, "iod": inter / nd if nd else 0.0,
            "ioh": inter / nh if nh else 0.0}


def group_maps(trace, groups: Sequence[Sequence[int]], image: int = 0, branch: str = "cond", *,
               combine: str = "mean", normalize: str = "minmax", size: tuple[int, int] | None = None,
               **select) -> torch.Tensor:
    """Maps ``[G, H, W]`` of groups of token positions, made as :meth:`AttentionTrace.word_maps` makes words'."""
    from ..engine.aggregate import combine_tokens, normalize_maps, resize_maps

    if not groups or any(not g for g in groups):
        raise ValueError("every group needs at least one token position")
    size = tuple(size or trace.image_hw)
    flat = sorted({p for g in groups for p in g})
    maps = trace.token_maps(flat, image, branch, **select)
    index = {p: j for j, p in enumerate(flat)}
    out = combine_tokens(maps, [[index[p] for p in g] for g in groups], combine)
    out = resize_maps(out, size)
    return normalize_maps(out.clamp_(min=0), normalize) if normalize != "none" else out


def relation_pairs(parsed: ParsedPrompt, trace, image: int = 0, branch: str = "cond", tau: float = 0.4,
                   unrelated: bool = True, **select) -> list[dict]:
    """One JSON-safe row per pair of ``parsed``: kind, relation, the two tokens and their IoU/IoD/IoH."""
    from ..engine.masks import threshold

    pairs: list[Relation] = parsed.relations() + (parsed.unrelated() if unrelated else [])
    if not pairs:
        return []
    keys = sorted({t.positions for r in pairs for t in (r.head, r.dependent)})
    masks = threshold(group_maps(trace, keys, image, branch, **select), tau)
    at = {k: i for i, k in enumerate(keys)}
    rows = []
    for r in pairs:
        stats = pair_stats(masks[at[r.head.positions]], masks[at[r.dependent.positions]])
        rows.append({"kind": "related" if r.label else "unrelated", "relation": r.label or "unrelated",
                     "head": r.head.text, "dependent": r.dependent.text, "head_index": r.head.index,
                     "dependent_index": r.dependent.index, **{k: round(v, 6) for k, v in stats.items()}})
    return rows


def relation_table(rows: Iterable[Mapping], min_pairs: int = 1) -> list[dict]:
    """The paper's table from pair rows of many prompts.

    Returns rows ``{"group", "pairs", "miou", "miod", "mioh", "delta"}`` (``delta`` = mIoH - mIoD): first
    ``unrelated``, then ``all related``, then each relation with at least ``min_pairs`` pairs, most frequent first.
    """
    by: dict[str, list[Mapping]] = defaultdict(list)
    related: list[Mapping] = []
    for r in rows:
        by[r["relation"]].append(r)
        if r["kind"] == "related":
            related.append(r)

    def summary(name: str, items: Sequence[Mapping]) -> dict:
        n = len(items)
        out = {"group": name, "pairs": n}
        for f in PAIR_FIELDS:
            out[f"m{f}"] = sum(float(x[f]) for x in items) / n if n else float("nan")
        out["delta"] = out["mioh"] - out["miod"]
        return out

    table = [summary("unrelated", by.get("unrelated", [])), summary("all related", related)]
    rels = sorted((k for k in by if k != "unrelated" and len(by[k]) >= min_pairs), key=lambda k: (-len(by[k]), k))
    table += [summary(k, by[k]) for k in rels]
    return table
