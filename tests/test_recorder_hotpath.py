"""The recorder's per-call paths (no gather when every row is recorded, gathered rows, [B, H, N, D] inputs, half
precision, a given scale, head subsets, work buffers shared by layers) against a float64 softmax."""

import pytest
import torch

from daam_core.engine.recorder import AttentionRecorder, RecordFilter, Stream
from daam_core.hosts.contract import cfg_rows, cfg_streams


def reference(q, k, heads, scale=None, subset=None):
    """softmax(scale * Q K^T) in float64 from ``[B, N, H*D]`` / ``[B, T, H*D]``, summed over (a subset of) heads."""
    b, n, c = q.shape
    d = c // heads
    qh = q.double().view(b, n, heads, d).transpose(1, 2)
    kh = k.double().view(b, k.shape[1], heads, d).transpose(1, 2)
    p = torch.softmax((qh @ kh.transpose(-1, -2)) * (scale if scale is not None else d ** -0.5), -1)
    return (p if subset is None else p[:, list(subset)]).sum(1)


def recorder(filter=None, n_images=1, tokens=(7, 7), latent=(4, 6)):
    rec = AttentionRecorder(filter)
    rec.begin(latent, cfg_streams(n_images, range(n_images), n_images), list(tokens))
    return rec


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("skip_reshape", [False, True])
def test_every_row_recorded_all_layouts_and_dtypes(dtype, skip_reshape):
    g = torch.Generator().manual_seed(0)
    heads, d = 3, 8
    rec = recorder()
    total = {"a": 0, "b": 0}
    for step in range(3):
        rec.set_call(cfg_rows(1, cfg=True), progress=0.5)
        for name in ("a", "b"):  # two layers of one shape share the work buffers
            q = torch.randn(2, 24, heads * d, generator=g).to(dtype)
            k = torch.randn(2, 7, heads * d, generator=g).to(dtype)
            if skip_reshape:
                rec.record(name, "down", q.view(2, 24, heads, d).transpose(1, 2), k.view(2, 7, heads, d).transpose(1, 2),
                           heads, scale=0.3)
            else:
                rec.record(name, "down", q, k, heads, scale=0.3)
            total[name] = total[name] + reference(q, k, heads, scale=0.3)
    out = rec.finish()
    for name in ("a", "b"):
        # rows [uncond, cond] -> streams [cond, uncond]
        torch.testing.assert_close(out.sums[name][0].double(), total[name][1], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.sums[name][1].double(), total[name][0], atol=1e-5, rtol=0)
    assert out.calls == {"a": 3, "b": 3}


def test_gathered_rows_head_subset_and_unrecorded_branch():
    g = torch.Generator().manual_seed(1)
    heads, d = 4, 4
    rec = recorder(RecordFilter(heads=(1, 3), branches=("cond",)), n_images=2, tokens=(5, 5, 5, 5))
    rec.set_call(cfg_rows(2, cfg=True), progress=0.0)  # rows: uncond 0, uncond 1, cond 0, cond 1
    q = torch.randn(4, 24, heads * d, generator=g)
    k = torch.randn(4, 5, heads * d, generator=g)
    rec.record("x", "up", q, k, heads)
    out = rec.finish()
    ref = reference(q, k, heads, subset=(1, 3))
    torch.testing.assert_close(out.sums["x"][0].double(), ref[2], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.sums["x"][1].double(), ref[3], atol=1e-5, rtol=0)
    assert out.sums["x"][2:].abs().max() == 0  # uncond streams not recorded


def test_prompts_of_different_lengths_in_one_call():
    """Rows conditioned on prompts of 5 and 10 tokens with keys repeated to 10 (ComfyUI's common length)."""
    g = torch.Generator().manual_seed(2)
    heads, d = 2, 4
    rec = AttentionRecorder()
    rec.begin((4, 6), [Stream(0, "cond", 0), Stream(1, "cond", 1)], [5, 10])
    rec.set_call((0, 1), progress=0.0)
    q = torch.randn(2, 24, heads * d, generator=g)
    k5 = torch.randn(1, 5, heads * d, generator=g)
    k10 = torch.randn(1, 10, heads * d, generator=g)
    k = torch.cat([k5.repeat(1, 2, 1), k10])
    rec.record("x", "down", q, k, heads)
    out = rec.finish()
    ref = reference(q, k, heads)
    torch.testing.assert_close(out.sums["x"][0, :, :5].double(), ref[0].view(24, 2, 5).sum(1), atol=1e-5, rtol=0)
    assert out.sums["x"][0, :, 5:].abs().max() == 0
    torch.testing.assert_close(out.sums["x"][1].double(), ref[1], atol=1e-5, rtol=0)
