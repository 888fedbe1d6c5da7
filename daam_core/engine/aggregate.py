"""From per-layer running sums to token maps and word maps.

Interpolation is linear, so the layers of one resolution are summed at their native size and
upsampled once; the work after sampling is one upsample per resolution and word group, not per
layer x head x token.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

UPSAMPLE_MODES = ("bicubic", "bilinear", "nearest")
COMBINE_MODES = ("mean", "max", "sum")
NORMALIZE_MODES = ("minmax", "max", "shared", "none")


def resize_maps(maps: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize ``[..., h, w]`` maps to ``size``; bicubic overshoot below zero is clamped.

    Parameters
    ----------
    maps : Tensor ``[..., h, w]``
    size : (int, int)
        Target ``(H, W)``.
    mode : {"bicubic", "bilinear", "nearest"}
    """
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    lead = maps.shape[:-2]
    x = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    x = F.interpolate(x, size=size, mode=mode, **kwargs)
    if mode == "bicubic":
        x = x.clamp_(min=0)
    return x.reshape(*lead, *size)


def token_maps(sums: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]], calls: Mapping[str, int],
               stream: int, positions: Sequence[int], size: tuple[int, int], mode: str = "bicubic", *,
               layer_maps: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
               resolution_maps: Callable[[tuple[int, int], torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Average head-summed attention of chosen token positions over layers and steps.

    Parameters
    ----------
    sums : mapping layer -> Tensor ``[streams, N_layer, T]``
        Running sums from the recorder (only the layers to aggregate).
    shapes : mapping layer -> (h, w)
        Spatial shape of each layer (``h * w == N_layer``).
    calls : mapping layer -> int
        Number of recorded calls per layer; the result is divided by their total.
    stream : int
        Which stream (image and branch) to read.
    positions : sequence of int
        Token positions, ``P`` of them.
    size : (int, int)
        Common size ``(h, w)`` every layer is upsampled to.
    layer_maps : callable, optional
        ``(layer, sum, positions) -> [P, N_layer]``: a layer's maps in place of its head-summed ones (the
        refinements' head weighting, :mod:`daam_core.engine.refine`).
    resolution_maps : callable, optional
        ``((h, w), maps [P, h * w]) -> [P, h * w]``: applied to each resolution's sum before upsampling (the
        refinements' self-attention propagation).

    Returns
    -------
    Tensor ``[P, h, w]`` float32
    """
    if not sums:
        raise ValueError("no cross-attention layer was recorded for this selection")
    pos = torch.as_tensor(list(positions), dtype=torch.long)
    by_shape: dict[tuple[int, int], torch.Tensor] = {}
    total_calls = 0
    for name, acc in sums.items():
        h, w = shapes[name]
        idx = pos.to(acc.device)
        part = layer_maps(name, acc, idx) if layer_maps is not None else acc[stream].index_select(1, idx).t()
        if (h, w) in by_shape:
            by_shape[(h, w)] += part
        else:
            by_shape[(h, w)] = part.clone()
        total_calls += calls.get(name, 0)
    out = None
    for (h, w), part in by_shape.items():
        if resolution_maps is not None:
            part = resolution_maps((h, w), part)
        up = resize_maps(part.reshape(len(pos), h, w), size, mode)
        out = up if out is None else out + up
    return out / max(total_calls, 1)


def combine_tokens(maps: torch.Tensor, groups: Sequence[Sequence[int]], how: str = "mean") -> torch.Tensor:
    """Combine token maps into word maps.

    Parameters
    ----------
    maps : Tensor ``[P, h, w]``
    groups : sequence of sequences of int
        For each word, indices into the first axis of ``maps``.
    how : {"mean", "max", "sum"}

    Returns
    -------
    Tensor ``[len(groups), h, w]``
    """
    if how not in COMBINE_MODES:
        raise ValueError(f"token combination must be one of {COMBINE_MODES}, got {how!r}")
    out = []
    for g in groups:
        part = maps[list(g)]
        if how == "mean":
            out.append(part.mean(0))
        elif how == "max":
            out.append(part.amax(0))
        else:
            out.append(part.sum(0))
    return torch.stack(out) if out else maps.new_zeros((0, *maps.shape[1:]))


def finish_maps(maps: torch.Tensor, size: tuple[int, int], normalize: str = "minmax",
                upsample: str = "bicubic") -> torch.Tensor:
    """Word maps ``[W, h, w]`` of one image at the latent -> at ``size``, normalised (the last step of
    :meth:`~daam_core.engine.trace.AttentionTrace.word_maps`: normalising at output size, as the paper does, makes
    the resized maximum exactly 1). ``maps`` itself is left unchanged."""
    out = resize_maps(maps, size, upsample)
    if normalize != "none":
        out = normalize_maps(out.clamp(min=0), normalize)
    return out


def normalize_maps(maps: torch.Tensor, how: str = "minmax", eps: float = 1e-12) -> torch.Tensor:
    """Normalise word maps ``[..., W, h, w]``.

    ``minmax`` and ``max`` act per map; ``shared`` divides every word of an image by the largest
    value among them (maps stay comparable across words); ``none`` returns the mean probabilities.
    """
    if how not in NORMALIZE_MODES:
        raise ValueError(f"normalisation must be one of {NORMALIZE_MODES}, got {how!r}")
    if how == "none" or maps.numel() == 0:
        return maps
    flat = maps.flatten(-2)
    if how == "minmax":
        lo = flat.amin(-1, keepdim=True)
        hi = flat.amax(-1, keepdim=True)
        flat = (flat - lo) / (hi - lo).clamp_min(eps)
    elif how == "max":
        flat = flat / flat.amax(-1, keepdim=True).clamp_min(eps)
    else:
        hi = flat.amax(dim=(-2, -1), keepdim=True)
        flat = flat / hi.clamp_min(eps)
    return flat.reshape(maps.shape)
