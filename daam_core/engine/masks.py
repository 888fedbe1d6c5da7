"""Masks from heat maps: thresholds, morphology, feathering and set operations.

All functions take and return float tensors ``[..., H, W]`` with values in [0, 1] (a ComfyUI MASK is
``[batch, H, W]``). Morphology runs on the CPU through OpenCV, once per output, never while sampling.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

THRESHOLD_MODES = ("relative", "absolute", "otsu")
SET_OPERATIONS = ("union", "intersection", "difference")


def _cv2():
    import cv2  # imported lazily: only mask post-processing and rendering need OpenCV
    return cv2


def otsu_level(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold of one map (values of any range); the level that maximises between-class variance."""
    v = values.detach().float().flatten().cpu().numpy()
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return hi
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    p = hist.astype(np.float64) / hist.sum()
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    mt = m0[-1]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1
    k = int(np.argmax(between))
    return float(edges[k + 1])


def threshold(maps: torch.Tensor, value: float = 0.4, mode: str = "relative") -> torch.Tensor:
    """Binary masks from maps ``[..., H, W]``.

    Parameters
    ----------
    value : float
        ``relative``: fraction of each map's maximum (the paper's tau, default 0.4);
        ``absolute``: a level on the map's own scale; ignored for ``otsu``.
    mode : {"relative", "absolute", "otsu"}

    Returns
    -------
    Tensor ``[..., H, W]`` of 0.0 / 1.0.
    """
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"threshold mode must be one of {THRESHOLD_MODES}, got {mode!r}")
    maps = maps.float()
    if mode == "absolute":
        return (maps >= value).float()
    flat = maps.reshape(-1, *maps.shape[-2:])
    if mode == "relative":  # all maps in one pass
        peak = flat.amax(dim=(-2, -1), keepdim=True)
        return ((flat >= value * peak) & (peak > 0)).float().reshape(maps.shape)
    out = torch.empty_like(flat)
    for i, m in enumerate(flat):
        out[i] = (m > otsu_level(m)).float()
    return out.reshape(maps.shape)


def threshold_levels(maps: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """For every pixel, how many relative thresholds ``i / steps`` (``i = 0..steps``) keep it.

    Parameters
    ----------
    maps : Tensor ``[..., H, W]``
    steps : int
        The thresholds are ``0, 1/steps, ..., 1``.

    Returns
    -------
    Tensor ``[..., H, W]`` uint8 (``steps`` <= 254): ``levels > i`` equals ``threshold(maps, i / steps)`` bit for
    bit. One pass: each map's thresholds are sorted (they grow with ``i``), so a pixel's count is a binary search
    among them, on the maps' device.
    """
    if not 0 < steps <= 254:
        raise ValueError(f"steps must be in 1..254, got {steps}")
    flat = maps.float().reshape(-1, maps.shape[-2] * maps.shape[-1])
    peak = flat.amax(dim=-1, keepdim=True)
    # the same float32 products as threshold(): (i / steps) as a float32 scalar times the float32 peak
    fractions = torch.tensor([i / steps for i in range(steps + 1)], dtype=torch.float32, device=flat.device)
    levels = fractions * peak  # [maps, steps + 1], non-decreasing along the thresholds
    count = torch.searchsorted(levels, flat.contiguous(), right=True)  # thresholds <= value: value >= level
    count = torch.where(peak > 0, count, torch.zeros_like(count))
    return count.to(torch.uint8).reshape(maps.shape)


def _per_map(masks: torch.Tensor, fn) -> torch.Tensor:
    flat = masks.detach().float().reshape(-1, *masks.shape[-2:]).cpu().numpy()
    out = np.stack([fn(np.ascontiguousarray(m)) for m in flat]) if len(flat) else flat
    return torch.from_numpy(out.astype(np.float32)).reshape(masks.shape).to(masks.device)


def _disk(radius: int):
    cv2 = _cv2()
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def grow(masks: torch.Tensor, pixels: int) -> torch.Tensor:
    """Dilate by ``pixels`` (> 0) or erode by ``-pixels`` (< 0) with a disk; works on soft masks too."""
    if pixels == 0:
        return masks.float()
    cv2 = _cv2()
    kernel = _disk(abs(int(pixels)))
    op = cv2.dilate if pixels > 0 else cv2.erode
    return _per_map(masks, lambda m: op(m, kernel, borderType=cv2.BORDER_REPLICATE))


def open_close(masks: torch.Tensor, open_px: int = 0, close_px: int = 0) -> torch.Tensor:
    """Morphological opening (drops specks up to ``open_px``) then closing (fills holes up to ``close_px``)."""
    cv2 = _cv2()
    out = masks.float()
    if open_px > 0:
        k = _disk(int(open_px))
        out = _per_map(out, lambda m: cv2.morphologyEx(m, cv2.MORPH_OPEN, k, borderType=cv2.BORDER_REPLICATE))
    if close_px > 0:
        k = _disk(int(close_px))
        out = _per_map(out, lambda m: cv2.morphologyEx(m, cv2.MORPH_CLOSE, k, borderType=cv2.BORDER_REPLICATE))
    return out


def feather(masks: torch.Tensor, pixels: int) -> torch.Tensor:
    """Soften edges with a Gaussian blur whose kernel spans ``2 * pixels + 1``; values stay in [0, 1]."""
    if pixels <= 0:
        return masks.float()
    cv2 = _cv2()
    size = 2 * int(pixels) + 1
    sigma = max(pixels / 2.0, 0.5)
    return _per_map(masks, lambda m: cv2.GaussianBlur(m, (size, size), sigma, borderType=cv2.BORDER_REPLICATE)).clamp_(0, 1)


def combine(masks: Sequence[torch.Tensor], operation: str = "union") -> torch.Tensor:
    """Set operations on soft masks: union = max, intersection = min, difference = first minus the rest."""
    if operation not in SET_OPERATIONS:
        raise ValueError(f"set operation must be one of {SET_OPERATIONS}, got {operation!r}")
    if len(masks) == 0:
        raise ValueError("combine needs at least one mask")
    out = masks[0].float()
    for m in masks[1:]:
        if m.shape != out.shape:
            raise ValueError(f"masks of different shapes cannot be combined: {tuple(out.shape)} and {tuple(m.shape)}")
        m = m.float()
        if operation == "union":
            out = torch.maximum(out, m)
        elif operation == "intersection":
            out = torch.minimum(out, m)
        else:
            out = (out - m).clamp_(min=0)
    return out


def refine(masks: torch.Tensor, *, open_px: int = 0, close_px: int = 0, grow_px: int = 0,
           feather_px: int = 0) -> torch.Tensor:
    """The usual post-processing chain: open/close, grow or shrink, then feather."""
    out = open_close(masks, open_px, close_px)
    out = grow(out, grow_px)
    return feather(out, feather_px)
