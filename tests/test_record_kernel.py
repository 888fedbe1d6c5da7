"""The Triton recording kernel on this CPU (Triton's interpreter) against an fp64 softmax and the torch path, and
the recorder's hot path (no new work buffers, no host synchronisation once warmed up)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from daam_core.engine.geometry import PatchGrid
from daam_core.engine.recorder import AttentionRecorder, RecordFilter, Stream
from daam_core.hosts.contract import cfg_rows, cfg_streams

ROOT = Path(__file__).resolve().parent.parent
HAVE_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(scope="module")
def interpreted():
    """Errors of every case of ``tests/helpers/record_kernel_cases.py``, run under ``TRITON_INTERPRET=1``."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "record_kernel_cases.py")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_triton_kernel_equals_fp64_softmax_and_torch_path(interpreted):
    """Cross (softmax over the text keys; folded and cut contexts) and joint (exp(s - lse) over the text span;
    lse given or computed by the kernel, also by its LSE-only pass over several token tiles), fp32 / bf16 / fp16
    inputs, head subsets, skipped rows, permuted streams, grouped-query heads, additive and boolean masks: within
    1e-5 relative of the fp64 reference and of the torch path (seen: below 1e-6)."""
    expected = {f"{kind}-{dt}" for kind in ("cross", "joint") for dt in ("fp32", "bf16", "fp16")}
    assert expected <= set(interpreted)
    assert any("several-tiles" in name and "joint" in name for name in interpreted)
    bad = {}
    for name, e in interpreted.items():
        for pair in ("triton_vs_fp64", "torch_vs_fp64", "triton_vs_torch"):
            if not e[pair]["rel"] <= 1e-5:
                bad[f"{name}/{pair}"] = e[pair]
        assert e["ref_max"] > 0.5, name  # the sums are not trivially zero
    assert not bad, bad


@pytest.mark.skipif(not (HAVE_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")
def test_compiled_kernel_on_cuda_equals_fp64_softmax_and_torch_path():
    """The same cases with the compiled kernel on the GPU (the recorder's "auto" choice there)."""
    sys.path.insert(0, str(ROOT / "tests" / "helpers"))
    import record_kernel_cases

    bad = {f"{name}/{pair}": e[pair] for name, e in record_kernel_cases.compare("cuda").items()
           for pair in ("triton_vs_fp64", "torch_vs_fp64", "triton_vs_torch") if not e[pair]["rel"] <= 1e-5}
    assert not bad, bad


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_triton_path_makes_no_work_buffer_after_the_first_call(interpreted):
    for name, e in interpreted.items():
        first, second = e["scratch_allocations"]
        assert second == first, (name, e["scratch_allocations"])


def _cross_call(rec, q, k):
    rec.set_call(cfg_rows(1, True), progress=0.5)
    rec.record("down.0", "down", q, k, 4)


def _joint_call(rec, q, k):
    rec.set_call([0, 1], progress=0.5)
    rec.record_joint("double.0", "double", q, k, 4, text=(0, 7), image=(7, 31))


def _attend_call(rec, q, k):
    rec.set_call([0, 1], progress=0.5)
    v = k  # values shaped like the keys; only the output's identity with SDPA matters here
    out = rec.attend_joint("single.0", "single", q, k, v, 4, text=(0, 7), image=(7, 31),
                           reference=lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def _setups():
    g = torch.Generator().manual_seed(0)
    cross = AttentionRecorder(RecordFilter(heads=(0, 2), branches=("cond",)))
    cross.begin((4, 6), cfg_streams(1, [0], 1), [7, 7])
    joint = AttentionRecorder()
    joint.joint_chunk_elements = 2 * 4 * 31 * 5  # several chunks of queries
    joint.begin(PatchGrid((8, 12), 2), [Stream(0, "cond", 0), Stream(1, "cond", 0)], [7])
    attend = AttentionRecorder()
    attend.begin(PatchGrid((8, 12), 2), [Stream(0, "cond", 0), Stream(1, "cond", 0)], [7])
    return {
        "attend_joint_fp32": (attend, _attend_call, torch.randn(2, 4, 31, 8, generator=g),
                              torch.randn(2, 4, 31, 8, generator=g)),
        "cross_bf16_heads_rows": (cross, _cross_call, torch.randn(2, 24, 32, generator=g).bfloat16(),
                                  torch.randn(2, 7, 32, generator=g).bfloat16()),
        "joint_fp32_chunked": (joint, _joint_call, torch.randn(2, 4, 31, 8, generator=g),
                               torch.randn(2, 4, 31, 8, generator=g)),
    }


@pytest.mark.parametrize("case", ["cross_bf16_heads_rows", "joint_fp32_chunked", "attend_joint_fp32"])
def test_warm_recorded_call_allocates_no_work_buffer_and_never_syncs(case):
    """After one call, a recorded call of the same shapes (torch path; attend_joint: the proven fused kernel and
    its log-sum-exp) makes no new work buffer and calls no ``aten::item`` / ``aten::_local_scalar_dense`` (a host
    synchronisation on a GPU)."""
    rec, call, q, k = _setups()[case]
    call(rec, q, k)
    made = rec.scratch_allocations
    assert made > 0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call(rec, q, k)
    names = {e.name for e in prof.events()}
    assert not names & {"aten::item", "aten::_local_scalar_dense", "aten::lift_fresh"}, names
    assert rec.scratch_allocations == made
    assert sum(rec.finish().calls.values()) == 2
