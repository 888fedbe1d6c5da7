"""Which fused kernel gives the log-sum-exp: asked of the real kernels on this CPU, never guessed.

The host's own call is compared bit for bit with each candidate of the device (here the CPU flash kernel) once per
input signature; only a kernel that equals it replaces the host's call afterwards.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from daam_core.engine import joint
from daam_core.engine.geometry import PatchGrid
from daam_core.engine.recorder import AttentionRecorder, Stream

FLASH_CPU = "aten::_scaled_dot_product_flash_attention_for_cpu"


def inputs(dtype=torch.float32, h=4, hk=4, t=6, n=12, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    length = t + n
    q = torch.randn(1, h, length, d, generator=g).to(dtype)
    k = (torch.randn(1, hk, length, d, generator=g) * 1.5).to(dtype)
    v = torch.randn(1, hk, length, d, generator=g).to(dtype)
    return q, k, v, (0, t), (t, length)


def reference(q, k, text, image, scale=None):
    """fp64 softmax over the whole joint sequence, image rows, text columns, summed over heads: ``[1, N, T]``."""
    q, k = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    return s.softmax(-1)[:, :, image[0]:image[1], text[0]:text[1]].sum(1)


def recorder(n=12, lse_kernel=False):
    rec = AttentionRecorder()
    rec.joint_lse_kernel = lse_kernel  # the normaliser, when not from the host's kernel, computed chunked
    rec.begin(PatchGrid((6, 8), 2), [Stream(0, "cond", 0)], [6])
    rec.set_call([0], 0.5)
    return rec


def forget(key):
    """Drop what was learnt about one signature (other tests may have used the same shapes)."""
    joint._chosen.pop(key, None)
    joint._verdicts.pop(key, None)


class Counted:
    """A host attention function that counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self):
        self.calls += 1
        return self.fn()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gqa", [False, True])
def test_sdpa_host_is_served_by_the_kernel_that_equals_it(dtype, gqa):
    q, k, v, text, image = inputs(dtype, hk=2 if gqa else 4, seed=1)
    host = Counted(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa))
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    key = joint._signature(q, k, v, None, None)
    forget(key)
    for call in range(3):
        rec = recorder()
        out = rec.attend_joint("double.0", "double", q, k, v, 4, text=text, image=image, reference=host)
        assert torch.equal(out, expected)
        torch.testing.assert_close(rec.finish().sums["double.0"].double(), reference(q, k, text, image),
                                   rtol=1e-5 if dtype == torch.float32 else 2e-3, atol=1e-6)
    assert joint._chosen[key] == "flash_cpu" and joint._verdicts[key] is True
    assert host.calls == 1  # asked once; the proven kernel served the two later calls alone


def test_host_no_kernel_equals_keeps_its_output_and_is_not_asked_again():
    """A host that is SDPA plus one ulp on one element: no candidate equals it. Its output is kept, the sums come
    from the recorder's own normaliser, and after the first call no candidate kernel runs at all."""
    q, k, v, text, image = inputs(seed=2)

    def perturbed():
        out = F.scaled_dot_product_attention(q, k, v).clone()
        out[0, 1, 2, 3] = torch.nextafter(out[0, 1, 2, 3], torch.tensor(math.inf))
        return out

    host = Counted(perturbed)
    key = joint._signature(q, k, v, None, None)
    forget(key)
    for call in range(3):
        rec = recorder()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = rec.attend_joint("single.0", "single", q, k, v, 4, text=text, image=image, reference=host)
        flash_runs = sum(e.name == FLASH_CPU for e in prof.events())
        assert torch.equal(out, perturbed())
        torch.testing.assert_close(rec.finish().sums["single.0"].double(), reference(q, k, text, image),
                                   rtol=1e-5, atol=1e-7)
        # the host's SDPA runs the flash kernel once; the first call also tried it as a candidate
        assert flash_runs == (2 if call == 0 else 1), (call, flash_runs)
    assert host.calls == 3
    assert joint._chosen[key] is None and joint._verdicts[key] is False


def test_verdict_is_kept_per_input_signature():
    """Strides, scale and dtype are part of the signature: each new one is asked once, then served from cache."""
    q, k, v, text, image = inputs(seed=3)
    variants = {
        "contiguous": (q, k, v, None),
        "strided": (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, None),  # [B, L, H, D] memory
        "scaled": (q, k, v, 0.3),
        "fp16": (q.half(), k.half(), v.half(), None),
    }
    keys = set()
    for name, (qq, kk, vv, scale) in variants.items():
        key = joint._signature(qq, kk, vv, None, scale)
        forget(key)
        keys.add(key)
        host = Counted(lambda qq=qq, kk=kk, vv=vv, scale=scale: F.scaled_dot_product_attention(qq, kk, vv, scale=scale))
        for _ in range(3):
            rec = recorder()
            out = rec.attend_joint("double.0", "double", qq, kk, vv, 4, text=text, image=image, reference=host,
                                   scale=scale)
            assert torch.equal(out, F.scaled_dot_product_attention(qq, kk, vv, scale=scale))
        matched = joint._chosen[key] is not None
        assert host.calls == (1 if matched else 3), name
        assert matched, f"{name}: the CPU flash kernel is SDPA's kernel here"
    assert len(keys) == len(variants)


def test_log_sum_exp_layouts_of_the_kernels():
    """cuDNN's ``[B, H, L, 1]`` and the padded ``[B, H, L_pad]`` of flash / memory-efficient become ``[B, H, L]``
    fp32 views; anything else is refused (then the normaliser is computed, never misread)."""
    q, k, _, _, _ = inputs(seed=4)
    lse = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).logsumexp(-1)  # [1, 4, 18]
    assert torch.equal(joint.lse_layout(lse, q), lse)
    assert torch.equal(joint.lse_layout(lse[..., None], q), lse)
    padded = torch.cat([lse, torch.full((1, 4, 14), 7.0)], dim=-1)  # padded to 32 rows
    assert torch.equal(joint.lse_layout(padded, q), lse)
    assert joint.lse_layout(padded, q).data_ptr() == padded.data_ptr()  # a view
    assert joint.lse_layout(lse.bfloat16(), q).dtype == torch.float32
    assert joint.lse_layout(lse.transpose(1, 2), q) is None  # [B, L, H]: not a known layout
    assert joint.lse_layout(lse[..., :10], q) is None  # too short
