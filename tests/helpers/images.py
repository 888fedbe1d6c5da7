"""Guards for image comparisons: "traced equals plain" proves nothing when both are black or NaN.

Every test that compares a traced image (or latent) with the untraced one goes through :func:`assert_same_image`,
which first checks that each side is a real picture: finite everywhere and not constant.
"""

from __future__ import annotations

import numpy as np
import torch

# Least standard deviation of a real picture: on the 0-255 scale for integer images, else on the values' scale.
MIN_STD_UINT8 = 1.0
MIN_STD_FLOAT = 1e-3


def _array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.double() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def assert_real_image(x, what: str = "image") -> None:
    """``x`` (array or tensor, any shape) is finite and has some spread of values."""
    a = _array(x)
    assert a.size > 0, f"{what} is empty"
    if np.issubdtype(a.dtype, np.floating):
        bad = int((~np.isfinite(a)).sum())
        assert bad == 0, f"{what} has {bad} non-finite values of {a.size} (NaN/inf: the host produced no picture)"
        least = MIN_STD_FLOAT
    else:
        least = MIN_STD_UINT8
    std = float(a.astype(np.float64).std())
    assert std >= least, (f"{what} is (nearly) constant: std {std:.3g} < {least} over values "
                          f"{float(a.min()):.4g}..{float(a.max()):.4g} (a black or blank picture proves nothing)")


def assert_same_image(plain, traced, what: str = "traced image") -> None:
    """Both are real pictures and equal bit for bit (``what`` names the traced side in the message)."""
    assert_real_image(plain, f"untraced reference of the {what}")
    assert_real_image(traced, what)
    a, b = _array(plain), _array(traced)
    assert a.shape == b.shape, f"{what}: shape {b.shape} differs from the untraced {a.shape}"
    if not np.array_equal(a, b):
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        raise AssertionError(f"{what} differs from the untraced one: max abs {diff.max():.3g} at "
                             f"{int((diff > 0).sum())} of {diff.size} values")


def assert_close_image(plain, traced, atol: float, what: str = "traced image") -> None:
    """Both are real pictures and equal within ``atol`` (for hosts whose kernels are not bitwise repeatable)."""
    assert_real_image(plain, f"untraced reference of the {what}")
    assert_real_image(traced, what)
    diff = float(np.abs(_array(plain).astype(np.float64) - _array(traced).astype(np.float64)).max())
    assert diff <= atol, f"{what} differs from the untraced one by {diff:.3g} > {atol}"


def with_override(model, override):
    """A clone of ComfyUI MODEL ``model`` with another node's attention override installed (as a third-party node
    would install it)."""
    other = model.clone()
    other.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    return other


def assert_tracing_keeps_the_host_image(pack, model, sample, what: str):
    """``sample(m)`` (a sampling of ComfyUI MODEL ``m``) gives the same image traced by DAAM Trace Model as
    untraced, also when another node's attention override (one that halves every attention output) sits below
    DAAM's and is called as often as without DAAM; no module's ``forward`` is replaced. Returns the first traced
    MODEL, after its sampling."""
    import torch

    plain = sample(model)
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    assert_same_image(plain, sample(traced_model), f"{what} traced sampling")
    assert all("forward" not in vars(m) for m in model.model.diffusion_model.modules())
    seen = []

    def other(func, *args, **kwargs):
        seen.append(1)
        return func(*args, **kwargs) * 0.5

    expected = sample(with_override(model, other))
    n = len(seen)
    got = sample(pack.DAAMTraceModel.execute(with_override(model, other))[0])
    assert_same_image(expected, got, f"{what} traced sampling under another override")
    assert len(seen) == 2 * n and not torch.equal(expected, plain)
    return traced_model


def assert_planted_video_maps(pack, traced_model, clip, samples, pos_text: str, neg_text: str, region, frames: int):
    """DAAM Heatmaps of "dog, park" (and the negative "blurry") on a video whose text key of "dog" was planted on
    ``region`` (a boolean latent-frame grid) in frame 1: per-frame MASK / IMAGE batches, 'dog' on its region and
    'park' off it, DAAM Mask's per-frame mask equal to the maps thresholded, a preview image per frame, finite
    negative maps. Returns the node's output."""
    import torch

    from daam_core.engine import masks as mask_ops
    from daam_core.engine import metrics

    images = torch.rand(frames, 128, 192, 3, generator=torch.Generator().manual_seed(3))
    out = pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, pos_text, neg_text, "dog, park",
                                    negative_words="blurry", images=images)
    heat, over, masks, maps = out.result
    assert masks.shape == (frames * 3, 128, 192) and over.shape == (frames * 3, 128, 192, 3)  # frame x word
    truth = region.repeat_interleave(128 // region.shape[0], 0).repeat_interleave(192 // region.shape[1], 1)
    assert metrics.iou(masks[3] > 0.5, truth) >= 0.9, "frame 1's mask of 'dog' misses its planted region"
    assert metrics.iou(masks[4] > 0.5, truth) < 0.5, "frame 1's mask of 'park' took 'dog's planted region"
    dog_maps = maps.trace.word_maps("dog")  # [frames, 1, H, W]
    assert dog_maps.shape == (frames, 1, 128, 192)
    mask = pack.DAAMMask.execute(maps, "dog")[0]
    assert mask.shape == (frames, 128, 192)
    assert torch.equal(mask, mask_ops.threshold(dog_maps, 0.4, "relative")[:, 0])
    (payload,) = out.ui["daam_preview"]
    assert len(payload["images"]) == frames
    blurry = maps.trace.word_maps("blurry", branch="uncond")
    assert blurry.shape == (frames, 1, 128, 192) and torch.isfinite(blurry).all()
    return out
