"""Joint attention (SD3 / Flux shaped): the recorder against an fp64 softmax over the whole joint sequence."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from daam_core.engine import joint
from daam_core.engine.geometry import PatchGrid
from daam_core.engine.recorder import AttentionRecorder, RecordFilter, Stream
from daam_core.hosts.contract import parse_blocks


def rope(x, theta=10000.0):
    """Rotate pairs of channels of ``x [B, H, L, D]`` by a position-dependent angle (Flux-like RoPE)."""
    b, h, length, d = x.shape
    pos = torch.arange(length, dtype=torch.float64)
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None] * freqs[None]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


def reference(q, k, text, image, scale=None, mask=None):
    """fp64 head-summed probabilities ``[B, N_img, T]``: the full ``[L, L]`` softmax, image rows, text columns.

    q ``[B, H, L, D]``, k ``[B, Hk, L, D]`` (grouped heads repeated as ``repeat_interleave``), mask additive or
    boolean broadcastable to ``[B, H, L, L]``.
    """
    q, k = q.double(), k.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    p = s.softmax(dim=-1)
    return p[:, :, image[0]:image[1], text[0]:text[1]].sum(1)


def recorder(hw=(4, 6), rows=2, tokens=(7,), filter=None, branches=("cond",) * 2, progress=0.5):
    rec = AttentionRecorder(filter)
    streams = [Stream(i, b, i % len(tokens)) for i, b in enumerate(branches[:rows])]
    rec.begin(PatchGrid((hw[0] * 2, hw[1] * 2), 2), streams, list(tokens))
    rec.set_call(list(range(rows)), progress)
    return rec


CASES = {
    # name: (text range, image range, extra tokens after the image (reference latents))
    "text_first": ("text", "image", 0),
    "image_first": ("image", "text", 0),
    "text_image_reference": ("text", "image", 5),
}


def joint_inputs(order, t, n, extra, b=2, h=4, hk=None, d=16, seed=0, dtype=torch.float32):
    hk = hk or h
    g = torch.Generator().manual_seed(seed)
    length = t + n + extra
    first, second = (t, n) if order[0] == "text" else (n, t)
    text = (0, t) if order[0] == "text" else (n, n + t)
    image = (t, t + n) if order[0] == "text" else (0, n)
    assert first + second + extra == length
    q = rope(torch.randn(b, h, length, d, generator=g, dtype=torch.float64)).to(dtype)
    k = rope(torch.randn(b, hk, length, d, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    v = torch.randn(b, hk, length, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, text, image


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("layout", ["flat", "heads"])
@pytest.mark.parametrize("lse_kernel", [True, False], ids=["kernel_lse", "chunked_lse"])
def test_probabilities_equal_fp64_full_softmax(case, layout, lse_kernel):
    first, second, extra = CASES[case]
    t, hw = 7, (4, 6)
    q, k, _, text, image = joint_inputs((first, second), t, hw[0] * hw[1], extra)
    length = q.shape[2]
    mask = torch.randn(2, 1, length, length, generator=torch.Generator().manual_seed(4)) * 2  # additive, per row
    mask[:, :, :, 3] = -math.inf  # one key masked out for everyone
    scale = 0.2
    rec = recorder(hw)
    rec.joint_lse_kernel = lse_kernel  # normaliser from the CPU flash kernel's log-sum-exp, or computed here
    rec.joint_chunk_elements = 4 * 4 * length * 3  # several query chunks
    if layout == "flat":
        flat = lambda x: x.transpose(1, 2).reshape(x.shape[0], length, -1)  # noqa: E731
        rec.record_joint("double.0", "double", flat(q), flat(k), 4, text=text, image=image, scale=scale,
                         mask=mask[:, 0])
    else:
        rec.record_joint("double.0", "double", q, k, 4, text=text, image=image, scale=scale, mask=mask)
    out = rec.finish()
    ref = reference(q, k, text, image, scale, mask)
    assert out.sums["double.0"].shape == (2, hw[0] * hw[1], t)
    torch.testing.assert_close(out.sums["double.0"].double(), ref, atol=1e-5, rtol=0)
    assert out.layers["double.0"].kind == "joint" and out.layers["double.0"].hw == hw
    # the text columns do not sum to the head count: image keys take their share of the normaliser
    assert ref.sum(-1).mean() < 4 * 0.9


@pytest.mark.parametrize("mask_kind", ["none", "bool_2d", "additive_3d"])
@pytest.mark.parametrize("lse_kernel", [True, False], ids=["kernel_lse", "chunked_lse"])
def test_grouped_query_heads_and_masks(mask_kind, lse_kernel):
    t, hw = 5, (3, 4)
    q, k, _, text, image = joint_inputs(("text", "image"), t, 12, 0, h=6, hk=2, seed=3)
    length = q.shape[2]
    mask = None
    if mask_kind == "bool_2d":
        mask = torch.rand(length, length, generator=torch.Generator().manual_seed(1)) > 0.3
        mask |= torch.eye(length, dtype=torch.bool)
    elif mask_kind == "additive_3d":
        mask = torch.randn(2, length, length, generator=torch.Generator().manual_seed(2))
    rec = recorder(hw, tokens=(t,))
    rec.joint_lse_kernel = lse_kernel
    rec.record_joint("joint.1", "joint", q, k, 6, text=text, image=image, mask=mask)
    ref_mask = None if mask is None else (mask[None, None] if mask.ndim == 2 else mask[:, None])
    torch.testing.assert_close(rec.finish().sums["joint.1"].double(), reference(q, k, text, image, None, ref_mask),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_mask", [False, True])
def test_fused_kernel_output_is_the_hosts_and_probabilities_exact(dtype, with_mask):
    """attend_joint: the output equals F.scaled_dot_product_attention bit for bit, the sums the fp64 reference."""
    t, hw = 9, (4, 4)
    q, k, v, text, image = joint_inputs(("image", "text"), t, 16, 0, h=4, d=32, seed=5, dtype=dtype)
    length = q.shape[2]
    mask = (torch.randn(1, 1, length, length, generator=torch.Generator().manual_seed(6)) * 0.5).to(dtype) if with_mask else None
    scale = 0.15
    host = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # noqa: E731
    expected = host()
    for step in range(3):  # first call verifies the kernel; later ones use it alone
        rec = recorder(hw, tokens=(t,))
        out = rec.attend_joint("single.0", "single", q, k, v, 4, text=text, image=image, reference=host,
                               scale=scale, mask=mask)
        assert torch.equal(out, expected)
        got = rec.finish().sums["single.0"].double()
        ref = reference(q, k, text, image, scale, mask)
        torch.testing.assert_close(got, ref, atol=1e-5 if dtype == torch.float32 else 2e-3, rtol=0)
    fused = joint.fused_attention_lse(q, k, v, scale=scale, mask=mask)
    assert fused is not None, "the CPU flash kernel should take these inputs"
    assert joint._verdicts[joint._signature(q, k, v, mask, scale)] is True


def test_fused_lse_used_matches_chunked_normaliser():
    """With the kernel's log-sum-exp and without it the recorded sums agree (the two paths are one quantity)."""
    t, hw = 6, (4, 5)
    q, k, v, text, image = joint_inputs(("text", "image"), t, 20, 0, h=6, hk=3, d=16, seed=7)
    out_lse = joint.fused_attention_lse(q, k, v)
    assert out_lse is not None
    sums = []
    for lse in (out_lse[1], None):
        rec = recorder(hw, tokens=(t,))
        rec.record_joint("double.2", "double", q, k, 6, text=text, image=image, lse=lse)
        sums.append(rec.finish().sums["double.2"])
    torch.testing.assert_close(sums[0], sums[1], atol=1e-6, rtol=0)


def test_a_kernel_that_differs_from_the_host_is_not_used():
    """A reference that is not SDPA (here: SDPA + 1 ulp on one element) keeps the host's output and recomputes."""
    t, hw = 4, (2, 3)
    q, k, v, text, image = joint_inputs(("text", "image"), t, 6, 0, h=2, d=8, seed=11)

    def host():
        out = F.scaled_dot_product_attention(q, k, v).clone()
        out[0, 0, 0, 0] = torch.nextafter(out[0, 0, 0, 0], torch.tensor(math.inf))
        return out

    for _ in range(2):
        rec = recorder(hw, tokens=(t,))
        out = rec.attend_joint("double.0", "double", q, k, v, 2, text=text, image=image, reference=host)
        assert torch.equal(out, host())
        torch.testing.assert_close(rec.finish().sums["double.0"].double(), reference(q, k, text, image),
                                   atol=1e-5, rtol=0)
    assert joint._verdicts[joint._signature(q, k, v, None, None)] is False


def test_filters_parts_blocks_heads_window_rows():
    t, hw = 5, (2, 4)
    q, k, _, text, image = joint_inputs(("text", "image"), t, 8, 0, h=4, seed=13)
    names = [("double.0", "double"), ("double.1", "double"), ("single.0", "single"), ("single.7", "single")]
    f = RecordFilter(parts=("double", "single"), blocks=parse_blocks("single:5-9, double:1"), heads=(1, 3))
    rec = recorder(hw, tokens=(t,), filter=f)
    for name, part in names:
        rec.record_joint(name, part, q, k, 4, text=text, image=image)
    out = rec.finish()
    assert sorted(out.sums) == ["double.1", "single.7"]
    ref = reference(q[:, [1, 3]], k[:, [1, 3]], text, image)
    torch.testing.assert_close(out.sums["single.7"].double(), ref, atol=1e-5, rtol=0)
    # outside the time window nothing is recorded
    rec = recorder(hw, tokens=(t,), filter=RecordFilter(start=0.0, end=0.3), progress=0.5)
    rec.record_joint("double.0", "double", q, k, 4, text=text, image=image)
    assert rec.finish().sums == {}
    # one batch row skipped (e.g. its branch is not recorded): the other row lands in its own stream
    rec = AttentionRecorder(RecordFilter(branches=("cond",)))
    rec.begin(PatchGrid((4, 8), 2), [Stream(0, "cond", 0), Stream(0, "uncond", 1)], [t, t])
    rec.set_call([1, 0], 0.5)  # row 0 is uncond (skipped), row 1 is cond
    rec.record_joint("joint.0", "joint", q, k, 4, text=text, image=image)
    acc = rec.finish().sums["joint.0"]
    torch.testing.assert_close(acc[0].double(), reference(q, k, text, image)[1], atol=1e-5, rtol=0)
    assert acc[1].abs().max() == 0
    with pytest.raises(ValueError, match="part:start-end"):
        parse_blocks("triple 0-3")
    with pytest.raises(ValueError, match=r"unknown network parts \['triple'\]"):
        AttentionRecorder(RecordFilter(blocks=parse_blocks("triple:0-3"))).begin(
            PatchGrid((4, 4), 2, ("double", "single")), [Stream(0, "cond", 0)], [5])
    with pytest.raises(ValueError, match="block range"):
        RecordFilter(blocks=(("double", 3, 1),))


def test_bad_ranges_and_shapes_are_clear_errors():
    t, hw = 5, (2, 4)
    q, k, _, text, image = joint_inputs(("text", "image"), t, 8, 0, seed=17)
    rec = recorder(hw, tokens=(t,))
    with pytest.raises(ValueError, match="text range"):
        rec.record_joint("double.0", "double", q, k, 4, text=(0, 99), image=image)
    with pytest.raises(ValueError, match="do not match"):
        rec.record_joint("double.0", "double", q, k[:, :, :-1], 4, text=text, image=image)
    # a grid that does not fit the image range: the layer is skipped with a warning, nothing silently recorded
    rec.record_joint("double.0", "double", q, k, 4, text=text, image=(t, t + 7))
    out = rec.finish()
    assert out.sums == {} and any("double.0" in w for w in out.warnings)


def test_planted_attention_recovered():
    """A text key that dominates a chosen region of the image queries: its map's mask is that region."""
    torch.manual_seed(19)
    hw, t, h, d = (16, 16), 8, 4, 32
    n = hw[0] * hw[1]
    region = torch.zeros(hw, dtype=torch.bool)
    region[3:9, 5:13] = True
    target = 2
    q = rope(torch.randn(1, h, t + n, d) * 0.3)  # plant after RoPE: what the host's attention receives
    k = rope(torch.randn(1, h, t + n, d) * 0.3)
    direction = torch.randn(d)
    direction /= direction.norm()
    k[0, :, target] += 4 * direction
    q[0, :, t:][:, region.flatten()] += 4 * direction
    rec = recorder(hw, rows=1, tokens=(t,))
    for step in range(3):
        rec.set_call([0], step / 2)
        rec.record_joint("single.0", "single", q, k, h, text=(0, t), image=(t, t + n))
    sums = rec.finish().sums["single.0"][0]  # [N, T]
    heat = sums[:, target].reshape(hw)
    found = heat >= 0.4 * heat.max()
    iou = (found & region).sum() / (found | region).sum()
    assert iou >= 0.9, f"IoU {iou:.3f}"


MEMORY_SCRIPT = textwrap.dedent(r"""
    import json, sys, torch
    from daam_core.engine import joint
    from daam_core.engine.geometry import PatchGrid
    from daam_core.engine.recorder import AttentionRecorder, Stream

    def rss_kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    torch.set_num_threads(1)
    mode = sys.argv[1]
    b, h, d, t, hw = 1, 8, 64, 64, (48, 48)
    n = hw[0] * hw[1]
    length = t + n
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, length, d, generator=g)
    k = torch.randn(b, h, length, d, generator=g)
    rec = AttentionRecorder()
    rec.joint_chunk_elements = 1 << 20
    rec.joint_lse_kernel = mode == "kernel"

    def call():
        if mode in ("kernel", "chunked"):
            rec.record_joint("double.0", "double", q, k, h, text=(0, t), image=(t, length))
        else:  # what tools that materialise the probabilities do
            p = (q @ k.transpose(-1, -2) * d ** -0.5).softmax(-1)
            rec.sums["full"] = rec.sums.get("full", 0) + p[:, :, t:, :t].sum(1)

    rec.begin(PatchGrid((hw[0] * 2, hw[1] * 2), 2), [Stream(0, "cond", 0)], [t])
    rec.set_call([0], 0.5)
    call()  # warm-up: allocates the running sum and caches
    base = rss_kib("VmRSS")
    reset_peak()
    call()
    added = (rss_kib("VmHWM") - base) * 1024
    bound = joint.workspace_bytes(b, h, h, n, length, t, d, torch.float32, False, rec.joint_chunk_elements,
                                  lse_kernel=mode == "kernel", threads=1)
    print(json.dumps({"added": added, "bound": bound, "full": b * h * length * length * 4,
                      "sums": b * n * t * 4}))
""")


def _measure(mode):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, mode], capture_output=True, text=True, env=env,
                         cwd=root, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_no_full_attention_matrix_peak_memory_within_formula():
    """Peak memory added by one call, measured as the process's peak RSS (reset before the call; glibc told to
    map every block >= 64 KiB on its own so freed memory leaves RSS), in a fresh process.

    Formula (``joint.workspace_bytes``, fp32): ``2 * B*H*chunk*keys*4 + B*chunk*T*4 + B*H*chunk*D*4 +
    2 * B*H*chunk*4`` with ``chunk = chunk_elements // (B*H*keys)``, ``keys = L`` when the normaliser is computed
    here, ``keys = T`` when the CPU flash kernel gives it, plus then the kernel's output and log-sum-exp
    ``B*H*N*(D + 1)*4`` and 2 MiB per thread; here 8-20 MB against the 180 MB of one [H, L, L] fp32 tensor.
    The same measurement of the full-probabilities approach sees the [L, L] tensors (the measurement works).
    """
    full = _measure("full")
    assert full["added"] >= full["full"], full
    slack = 2 << 20  # allocator rounding, page granularity, small Python objects
    for mode in ("kernel", "chunked"):
        ours = _measure(mode)
        assert ours["added"] <= ours["bound"] + slack, (mode, ours)
        assert ours["bound"] < ours["full"] / 5, (mode, ours)
