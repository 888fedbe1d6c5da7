"""Pictures of heat maps: colour maps, overlays and a labelled grid (OpenCV and numpy only).

Images are float32 numpy arrays ``[H, W, 3]`` in [0, 1], RGB, the layout of a ComfyUI IMAGE item.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

COLORMAPS = ("jet", "turbo", "inferno", "magma", "viridis", "plasma", "hot", "gray")


def _cv2():
    import cv2
    return cv2


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _finite(a: np.ndarray, what: str) -> np.ndarray:
    """``a`` itself; a clear error where it holds NaN or infinity (they would become black pixels)."""
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise ValueError(f"{what} has {bad} NaN/infinite values of {a.size}: the model produced non-finite "
                         "values (a black picture), so there is nothing to draw")
    return a


def colorize(heat, cmap: str = "jet") -> np.ndarray:
    """Colour-map a map ``[H, W]`` with values in [0, 1] (clipped) to RGB ``[H, W, 3]`` in [0, 1]."""
    if cmap not in COLORMAPS:
        raise ValueError(f"colour map must be one of {COLORMAPS}, got {cmap!r}")
    m = np.clip(_finite(_as_numpy(heat), "the heat map"), 0.0, 1.0)
    if m.ndim != 2:
        raise ValueError(f"colorize expects one map [H, W], got shape {m.shape}")
    if cmap == "gray":
        return np.repeat(m[..., None], 3, axis=2)
    cv2 = _cv2()
    code = getattr(cv2, f"COLORMAP_{cmap.upper()}")
    bgr = cv2.applyColorMap(np.round(m * 255).astype(np.uint8), code)
    return bgr[..., ::-1].astype(np.float32) / 255.0


def overlay(image, heat, alpha: float = 0.5, cmap: str = "jet", weighted: bool = False) -> np.ndarray:
    """Blend a colour-mapped heat map over an image.

    Parameters
    ----------
    image : array ``[H, W, 3]`` in [0, 1]
    heat : array ``[h, w]`` in [0, 1]; resized to the image when sizes differ
    alpha : float
        Opacity of the heat map.
    weighted : bool
        Scale the opacity by the heat value, so cold regions show the image untouched.
    """
    img = _as_numpy(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"overlay expects an RGB image [H, W, 3], got shape {img.shape}")
    m = _as_numpy(heat)
    if m.shape != img.shape[:2]:
        cv2 = _cv2()
        m = cv2.resize(m, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_CUBIC)
    m = np.clip(m, 0.0, 1.0)
    colour = colorize(m, cmap)
    a = alpha * (m[..., None] if weighted else 1.0)
    return np.clip(img * (1.0 - a) + colour * a, 0.0, 1.0).astype(np.float32)


def label(image, text: str, scale: float | None = None) -> np.ndarray:
    """Write ``text`` on a dark band at the top of an RGB image (returns a new array)."""
    cv2 = _cv2()
    img = np.ascontiguousarray(_as_numpy(image).copy())
    h, w = img.shape[:2]
    scale = scale or max(0.3, min(1.0, w / 400))
    thickness = 1
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    band = min(h, th + base + 4)
    img[:band] *= 0.35
    ink = np.zeros((h, w), np.uint8)  # OpenCV draws text on 8-bit images only; blend it in as coverage
    cv2.putText(ink, text, (2, band - base - 1), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thickness, cv2.LINE_AA)
    a = ink[..., None].astype(np.float32) / 255.0
    return img * (1.0 - a) + a


def grid(images: Sequence, labels: Sequence[str] | None = None, columns: int | None = None,
         gap: int = 2, min_side: int = 0) -> np.ndarray:
    """Tile images ``[H, W, 3]`` (same size) into one picture, each with an optional label.

    Tiles whose shorter side is under ``min_side`` are first enlarged by a whole factor (nearest
    neighbour), so that small images (the 32x32 shapes model) stay readable under their labels.
    """
    if not images:
        raise ValueError("grid needs at least one image")
    tiles = [_as_numpy(im) for im in images]
    h, w = tiles[0].shape[:2]
    if any(t.shape[:2] != (h, w) for t in tiles):
        raise ValueError("grid images must all have the same size")
    factor = -(-min_side // min(h, w)) if min_side > min(h, w) else 1
    if factor > 1:
        tiles = [t.repeat(factor, 0).repeat(factor, 1) for t in tiles]
        h, w = h * factor, w * factor
    if labels is not None:
        if len(labels) != len(tiles):
            raise ValueError(f"{len(labels)} labels for {len(tiles)} images")
        tiles = [label(t, s) for t, s in zip(tiles, labels)]
    columns = columns or int(np.ceil(np.sqrt(len(tiles))))
    rows = int(np.ceil(len(tiles) / columns))
    out = np.ones((rows * h + (rows - 1) * gap, columns * w + (columns - 1) * gap, 3), dtype=np.float32)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        out[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = t
    return out


def to_uint8(image) -> np.ndarray:
    """Float RGB (or a single map) in [0, 1] to uint8 for saving."""
    return np.round(np.clip(_finite(_as_numpy(image), "the image"), 0, 1) * 255).astype(np.uint8)


def save_png(path, image) -> None:
    """Write an RGB ``[H, W, 3]`` or grey ``[H, W]`` float image in [0, 1] as PNG."""
    cv2 = _cv2()
    arr = to_uint8(image)
    if arr.ndim == 3:
        arr = arr[..., ::-1]
    if not cv2.imwrite(str(path), arr):
        raise OSError(f"could not write {path}")


def as_float_image(image) -> np.ndarray:
    """PIL image, uint8 array or float array/tensor -> float32 ``[H, W, 3]`` in [0, 1]."""
    if isinstance(image, torch.Tensor):
        arr = image.detach().float().cpu().numpy()
    else:
        arr = np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    arr = arr.astype(np.float32)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    return arr
