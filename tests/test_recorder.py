"""The recorder against an explicit softmax(QK^T / sqrt(d)) reference."""

import math

import pytest
import torch

from daam_core.engine.aggregate import combine_tokens, normalize_maps, resize_maps, token_maps
from daam_core.engine.geometry import UNetGrid, downsampled
from daam_core.engine.recorder import AttentionRecorder, RecordFilter, Stream
from daam_core.hosts.contract import cfg_rows, cfg_streams


def reference_probs(q, k, heads, head_subset=None):
    """Head-summed probabilities [B, N, T] computed the plain way, in float64."""
    b, n, c = q.shape
    d = c // heads
    qh = q.double().view(b, n, heads, d).permute(0, 2, 1, 3)
    kh = k.double().view(b, k.shape[1], heads, d).permute(0, 2, 1, 3)
    p = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    if head_subset is not None:
        p = p[:, list(head_subset)]
    return p.sum(1)


def one_call_recorder(filter=None, n_images=2, tokens=77, latent=(8, 12)):
    rec = AttentionRecorder(filter)
    streams = cfg_streams(n_images, range(n_images), n_images)
    rec.begin(latent, streams, [tokens] * (2 * n_images))
    rec.set_call(cfg_rows(n_images, cfg=True), progress=0.5)
    return rec


def test_probabilities_match_reference_for_every_stream():
    torch.manual_seed(0)
    heads, d, t = 4, 16, 77
    q = torch.randn(4, 8 * 12, heads * d)
    k = torch.randn(4, t, heads * d)
    rec = one_call_recorder()
    rec.record("down.0", "down", q, k, heads)
    out = rec.finish()
    ref = reference_probs(q, k, heads)
    acc = out.sums["down.0"]
    # rows are [uncond img0, uncond img1, cond img0, cond img1]; streams are [cond 0, cond 1, uncond 0, uncond 1]
    for row, stream in enumerate([2, 3, 0, 1]):
        torch.testing.assert_close(acc[stream].double(), ref[row], atol=1e-5, rtol=0)
    assert out.layers["down.0"].hw == (8, 12) and out.layers["down.0"].factor == 1
    assert out.calls["down.0"] == 1


def test_running_sum_over_calls_and_head_subset():
    torch.manual_seed(1)
    heads, d = 3, 8
    rec = one_call_recorder(RecordFilter(heads=(0, 2)), n_images=1, tokens=5, latent=(4, 4))
    qs = [torch.randn(2, 16, heads * d) for _ in range(3)]
    ks = [torch.randn(2, 5, heads * d) for _ in range(3)]
    for q, k in zip(qs, ks):
        rec.set_call(cfg_rows(1, cfg=True), progress=0.1)
        rec.record("mid", "mid", q, k, heads)
    out = rec.finish()
    ref = sum(reference_probs(q, k, heads, (0, 2)) for q, k in zip(qs, ks))
    torch.testing.assert_close(out.sums["mid"][0].double(), ref[1], atol=1e-5, rtol=0)  # cond is row 1
    torch.testing.assert_close(out.sums["mid"][1].double(), ref[0], atol=1e-5, rtol=0)
    assert out.calls["mid"] == 3


def test_filters_skip_work_before_recording():
    torch.manual_seed(2)
    q = torch.randn(2, 16, 8)
    k = torch.randn(2, 5, 8)
    # time window: progress outside -> nothing recorded
    rec = AttentionRecorder(RecordFilter(start=0.2, end=0.6))
    rec.begin((4, 4), cfg_streams(1, [0], 1), [5, 5])
    rec.set_call(cfg_rows(1, True), progress=0.9)
    assert not rec.active
    rec.record("a", "down", q, k, 2)
    assert rec.finish().sums == {}
    # factor filter: a factor-1 layer is dropped, a factor-2 layer kept
    rec = AttentionRecorder(RecordFilter(factors=(2,), parts=("up",)))
    rec.begin((8, 8), cfg_streams(1, [0], 1), [5, 5])
    rec.set_call(cfg_rows(1, True), progress=0.0)
    rec.record("full", "up", torch.randn(2, 64, 8), k, 2)
    rec.record("half", "up", q, k, 2)
    rec.record("half-down", "down", q, k, 2)
    out = rec.finish()
    assert list(out.sums) == ["half"] and out.layers["half"].factor == 2
    # branch filter: only cond recorded, uncond rows never computed
    rec = AttentionRecorder(RecordFilter(branches=("cond",)))
    rec.begin((4, 4), cfg_streams(1, [0], 1), [5, 5])
    rec.set_call(cfg_rows(1, True), progress=0.0)
    rec.record("a", "down", q, k, 2)
    acc = rec.finish().sums["a"]
    assert acc[1].abs().sum() == 0 and acc[0].abs().sum() > 0


def test_repeated_context_is_folded_back_to_prompt_tokens():
    """ComfyUI repeats a 77-token conditioning to 154 when batched with a 154-token one."""
    torch.manual_seed(3)
    heads, d = 2, 8
    rec = AttentionRecorder()
    rec.begin((4, 4), [Stream(0, "cond", 0), Stream(0, "uncond", 1)], [154, 77])
    rec.set_call([1, 0], progress=0.0)
    q = torch.randn(2, 16, heads * d)
    k_neg = torch.randn(1, 77, heads * d)
    k = torch.cat([k_neg.repeat(1, 2, 1), torch.randn(1, 154, heads * d)])
    rec.record("a", "down", q, k, heads)
    acc = rec.finish().sums["a"]
    ref = reference_probs(q, k, heads)
    torch.testing.assert_close(acc[1, :, :77].double(), ref[0, :, :77] + ref[0, :, 77:], atol=1e-5, rtol=0)
    torch.testing.assert_close(acc[0].double(), ref[1], atol=1e-5, rtol=0)
    # the folded probabilities of the repeated prompt still sum to the head count
    torch.testing.assert_close(acc[1, :, :77].sum(-1), torch.full((16,), float(heads)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("latent", [(64, 64), (64, 96), (45, 77), (7, 11)])
def test_spatial_shape_comes_from_latent_not_sqrt(latent):
    h, w = latent
    for factor in (1, 2, 4, 8):
        hh, ww = downsampled(h, factor), downsampled(w, factor)
        assert UNetGrid(latent).locate(hh * ww) == (factor, (hh, ww))
    assert downsampled(45, 2) == 23 and downsampled(45, 4) == 12
    with pytest.raises(ValueError, match="does not fit"):
        UNetGrid(latent).locate(h * w + 1)


def test_memory_does_not_depend_on_number_of_calls():
    torch.manual_seed(4)
    sizes = []
    for steps in (5, 50):
        rec = one_call_recorder(n_images=1, tokens=7, latent=(4, 4))
        for _ in range(steps):
            rec.set_call(cfg_rows(1, True), progress=0.0)
            rec.record("a", "down", torch.randn(2, 16, 8), torch.randn(2, 7, 8), 2)
        out = rec.finish()
        sizes.append(sum(v.numel() * v.element_size() for v in out.sums.values()))
        assert out.calls["a"] == steps
    assert sizes[0] == sizes[1] == 2 * 16 * 7 * 4


def test_token_maps_average_layers_at_common_size():
    # two layers at different resolutions with constant maps: the upsampled mean is exact
    sums = {"hi": torch.ones(1, 16, 3) * 2.0, "lo": torch.ones(1, 4, 3) * 4.0}
    maps = token_maps(sums, {"hi": (4, 4), "lo": (2, 2)}, {"hi": 2, "lo": 2}, 0, [0, 2], (4, 4), "bilinear")
    assert maps.shape == (2, 4, 4)
    torch.testing.assert_close(maps, torch.full((2, 4, 4), 6.0 / 4))
    words = combine_tokens(torch.stack([torch.zeros(2, 2), torch.ones(2, 2) * 3]), [[0, 1], [1]], "mean")
    torch.testing.assert_close(words, torch.stack([torch.full((2, 2), 1.5), torch.full((2, 2), 3.0)]))
    m = torch.tensor([[[1.0, 3.0], [2.0, 5.0]], [[0.0, 1.0], [0.5, 0.5]]])
    torch.testing.assert_close(normalize_maps(m, "minmax")[0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    torch.testing.assert_close(normalize_maps(m, "shared")[1], torch.tensor([[0.0, 0.2], [0.1, 0.1]]))
    torch.testing.assert_close(normalize_maps(m, "max")[1], torch.tensor([[0.0, 1.0], [0.5, 0.5]]))
    up = resize_maps(torch.rand(3, 5, 7), (10, 14), "bicubic")
    assert up.shape == (3, 10, 14) and up.min() >= 0


def test_grouped_query_keys_are_read_per_query_head():
    """Grouped-query attention (ComfyUI's ``enable_gqa``): 4 query heads over 2 key heads equal the host's rule of
    repeating each key head for its group (``repeat_interleave``), in both tensor layouts, without a copy."""
    torch.manual_seed(5)
    heads, kv_heads, d, t = 4, 2, 8, 7
    q = torch.randn(4, 8 * 12, heads * d)
    k = torch.randn(4, t, kv_heads * d)
    k_full = k.view(4, t, kv_heads, d).repeat_interleave(heads // kv_heads, dim=2).reshape(4, t, heads * d)
    ref = reference_probs(q, k_full, heads)
    for skip_reshape in (False, True):
        rec = one_call_recorder(tokens=t)
        if skip_reshape:
            qh, kh = q.view(4, -1, heads, d).transpose(1, 2), k.view(4, t, kv_heads, d).transpose(1, 2)
            rec.record("down.0", "down", qh, kh, heads)
        else:
            rec.record("down.0", "down", q, k, heads)
        acc = rec.finish().sums["down.0"]
        for row, stream in enumerate([2, 3, 0, 1]):
            torch.testing.assert_close(acc[stream].double(), ref[row], atol=1e-5, rtol=0)
    rec = one_call_recorder(tokens=t)
    with pytest.raises(ValueError, match="keys .* do not match queries"):
        rec.record("down.0", "down", q, torch.randn(4, t, 3 * d), heads)
