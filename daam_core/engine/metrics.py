"""The paper's map comparisons: IoU, mIoU, mIoD/mIoH for head-dependent pairs, soft overlap.

Binary inputs are thresholded at 0.5 so that float masks in [0, 1] can be passed as they are.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch


def _binary(x: torch.Tensor) -> torch.Tensor:
    return x.float() >= 0.5


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"maps must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two binary masks ``[H, W]``; two empty masks give 1.0."""
    _check(a, b)
    a, b = _binary(a), _binary(b)
    union = (a | b).sum().item()
    if union == 0:
        return 1.0
    return (a & b).sum().item() / union


def mean_iou(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean IoU over (prediction, reference) pairs: the paper's mIoU."""
    values = [iou(a, b) for a, b in pairs]
    if not values:
        raise ValueError("mean_iou needs at least one pair")
    return sum(values) / len(values)


def intersection_over(a: torch.Tensor, b: torch.Tensor, over: torch.Tensor) -> float:
    _check(a, b)
    a, b = _binary(a), _binary(b)
    denom = _binary(over).sum().item()
    return (a & b).sum().item() / denom if denom else 0.0


def iod(head: torch.Tensor, dependent: torch.Tensor) -> float:
    """Intersection over the dependent's mask: how much of the dependent lies inside the head."""
    return intersection_over(head, dependent, dependent)


def ioh(head: torch.Tensor, dependent: torch.Tensor) -> float:
    """Intersection over the head's mask: how much of the head the dependent covers."""
    return intersection_over(head, dependent, head)


def head_dependent_overlap(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """The paper's relation statistics over (head, dependent) mask pairs.

    Returns
    -------
    dict with ``miou``, ``miod`` (intersection over dependent) and ``mioh`` (intersection over head).
    """
    if not pairs:
        raise ValueError("head_dependent_overlap needs at least one pair")
    n = len(pairs)
    return {
        "miou": sum(iou(h, d) for h, d in pairs) / n,
        "miod": sum(iod(h, d) for h, d in pairs) / n,
        "mioh": sum(ioh(h, d) for h, d in pairs) / n,
    }


def soft_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Overlap of two non-negative maps: ``sum(min) / sum(max)`` (1 for identical maps)."""
    _check(a, b)
    a, b = a.float(), b.float()
    denom = torch.maximum(a, b).sum().item()
    return torch.minimum(a, b).sum().item() / denom if denom > 0 else 1.0


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two maps of the same shape."""
    _check(a, b)
    x = a.double().flatten()
    y = b.double().flatten()
    x = x - x.mean()
    y = y - y.mean()
    denom = (x.norm() * y.norm()).item()
    return (x @ y).item() / denom if denom > 0 else 0.0
