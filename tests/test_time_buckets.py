"""The recorder's time buckets (the preview's time scrub) against an explicit per-call reference."""

import math

import pytest
import torch

from daam_core.engine.recorder import AttentionRecorder, RecordFilter
from daam_core.hosts.contract import cfg_rows, cfg_streams


def head_summed(q, k, heads):
    """softmax(QK^T / sqrt(d)) summed over heads, [B, N, T], in float64."""
    b, n, c = q.shape
    d = c // heads
    qh = q.double().view(b, n, heads, d).transpose(1, 2)
    kh = k.double().view(b, k.shape[1], heads, d).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1).sum(1)


def run(k_buckets, progresses, seed=0, heads=2, d=8, tokens=6, latent=(4, 6)):
    torch.manual_seed(seed)
    rec = AttentionRecorder(RecordFilter(time_buckets=k_buckets))
    rec.begin(latent, cfg_streams(1, [0], 1), [tokens, tokens])
    calls = []
    for p in progresses:
        q = torch.randn(2, latent[0] * latent[1], heads * d)
        k = torch.randn(2, tokens, heads * d)
        rec.set_call(cfg_rows(1, cfg=True), progress=p)
        rec.record("down.0", "down", q, k, heads)
        calls.append((p, head_summed(q, k, heads)))
    return rec.finish(), calls


def test_each_bucket_holds_the_calls_of_its_part_of_the_sampling():
    progresses = [i / 9 for i in range(10)]  # 10 steps, 0 .. 1
    out, calls = run(4, progresses)
    sums = out.time_sums["down.0"]
    assert sums.shape == (4, 2, 24, 6)
    for b in range(4):
        mine = [probs for p, probs in calls if min(int(p * 4), 3) == b]
        ref = sum(mine)  # rows [uncond, cond] -> streams [cond, uncond]
        torch.testing.assert_close(sums[b, 0].double(), ref[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(sums[b, 1].double(), ref[0], atol=1e-5, rtol=0)
        assert out.time_calls["down.0"][b] == len(mine)
    torch.testing.assert_close(out.sums["down.0"], sums.sum(0))
    assert sum(out.time_calls["down.0"]) == out.calls["down.0"] == 10


def test_total_equals_the_untimed_recording_and_memory_is_k_times_one_sum():
    progresses = [i / 5 for i in range(6)]
    timed, _ = run(8, progresses, seed=3)
    plain, _ = run(1, progresses, seed=3)
    torch.testing.assert_close(timed.sums["down.0"], plain.sums["down.0"], atol=1e-6, rtol=0)
    assert plain.time_sums == {} and plain.time_calls == {}
    one = plain.sums["down.0"]
    assert timed.time_sums["down.0"].numel() == 8 * one.numel()


def test_memory_is_flat_in_the_number_of_steps():
    short, _ = run(4, [i / 3 for i in range(4)])
    long, _ = run(4, [i / 39 for i in range(40)])
    assert short.time_sums["down.0"].shape == long.time_sums["down.0"].shape


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_bucket_count_is_refused(bad):
    with pytest.raises(ValueError, match="time_buckets"):
        RecordFilter(time_buckets=bad)
