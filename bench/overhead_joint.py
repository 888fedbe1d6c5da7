"""Overhead of recording joint attention (Flux / SD3 shaped transformer blocks at 1024x1024) on the CPU.

The model is plain PyTorch with the real widths and reduced depth: Flux = 1 double-stream + 1 single-stream block
(24 heads x 128, width 3072, MLP ratio 4, RoPE on q and k), SD3 = 2 MMDiT joint blocks (24 heads x 64, width
1536, MLP ratio 4). 1024x1024 gives N = 4096 image tokens; T = 512 text tokens for Flux, 154 (77 CLIP + 77 T5) for
SD3. Every block of every forward is recorded. Host attention backends:

- ``sdpa``: ``F.scaled_dot_product_attention`` (ComfyUI ``--use-pytorch-cross-attention``); traced through
  ``AttentionRecorder.attend_joint`` (the fused kernel's log-sum-exp, output proven bit-identical);
- ``subquad``: ComfyUI's default CPU attention ``attention_sub_quad`` (imported from the host); traced with
  ``record_joint`` computing the normaliser itself (chunked).

Method (bench/_common.py): interleaved repetitions, order rotating; per repetition the traced forward's wall and
CPU time divided by the plain forward's; median, min and max of those ratios. Peak memory: the process's peak
RSS (reset before each forward, glibc told to map large blocks on their own) of the traced forward minus the plain
one, against ``sums + joint.workspace_bytes``. ``--contrast`` also times one call of the full-probabilities
approach (softmax over ``[B, H, L, L]``, what tools that materialise it do) and its added peak memory.

Example::

    nice -n 10 python bench/overhead_joint.py --family flux --backend sdpa --pairs 3
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import _common as C

SHAPES = {  # width, heads, text tokens, blocks
    "flux": dict(width=3072, heads=24, text=512, blocks=("double", "single"), rope=True),
    "sd3": dict(width=1536, heads=24, text=154, blocks=("joint", "joint"), rope=False),
}


def rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return -1


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rope_tables(length: int, dim: int):
    pos = torch.arange(length, dtype=torch.float32)
    freqs = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ang = pos[:, None] * freqs[None]
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Stream(torch.nn.Module):
    """One stream of a double/joint block: qkv, q/k RMS norm, output projection, MLP."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = torch.nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)
        self.norm2 = torch.nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(approximate="tanh"),
                                       torch.nn.Linear(4 * width, width))

    def qkv_heads(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return F.rms_norm(q, (q.shape[-1],)), F.rms_norm(k, (k.shape[-1],)), v


class DoubleBlock(torch.nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.txt, self.img = Stream(width, heads), Stream(width, heads)

    def forward(self, txt, img, attend, rope):
        tq, tk, tv = self.txt.qkv_heads(txt)
        iq, ik, iv = self.img.qkv_heads(img)
        q, k, v = torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        a = attend(q, k, v)  # [B, H, L, D]
        a = a.transpose(1, 2).flatten(2)
        t = txt.shape[1]
        txt = txt + self.txt.proj(a[:, :t])
        img = img + self.img.proj(a[:, t:])
        return txt + self.txt.mlp(self.txt.norm2(txt)), img + self.img.mlp(self.img.norm2(img))


class SingleBlock(torch.nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads, self.width = heads, width
        self.norm = torch.nn.LayerNorm(width, elementwise_affine=False)
        self.linear1 = torch.nn.Linear(width, 3 * width + 4 * width)
        self.linear2 = torch.nn.Linear(width + 4 * width, width)

    def forward(self, x, attend, rope):
        b, n, c = x.shape
        qkv, mlp = self.linear1(self.norm(x)).split([3 * c, 4 * c], dim=-1)
        q, k, v = qkv.view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k = F.rms_norm(q, (q.shape[-1],)), F.rms_norm(k, (k.shape[-1],))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        a = attend(q, k, v).transpose(1, 2).flatten(2)
        return x + self.linear2(torch.cat((a, F.gelu(mlp, approximate="tanh")), -1))


class Model(torch.nn.Module):
    def __init__(self, family, blocks=None):
        super().__init__()
        s = dict(SHAPES[family])
        if blocks:
            s["blocks"] = tuple(blocks)
        self.family, self.text = family, s["text"]
        self.blocks = torch.nn.ModuleList(
            SingleBlock(s["width"], s["heads"]) if kind == "single" else DoubleBlock(s["width"], s["heads"])
            for kind in s["blocks"])
        self.kinds = s["blocks"]
        self.heads, self.width, self.use_rope = s["heads"], s["width"], s["rope"]

    def forward(self, txt, img, attention):
        """``attention(name, part, q, k, v) -> out``; the text comes first on the sequence axis."""
        rope = rope_tables(txt.shape[1] + img.shape[1], self.width // self.heads) if self.use_rope else None
        t = txt.shape[1]
        counts: dict[str, int] = {}
        x = None
        for kind, block in zip(self.kinds, self.blocks):
            i = counts.get(kind, 0)
            counts[kind] = i + 1
            attend = lambda q, k, v, n=f"{kind}.{i}", p=kind: attention(n, p, q, k, v)  # noqa: E731
            if kind == "single":
                x = torch.cat((txt, img), 1) if x is None else x
                x = block(x, attend, rope)
            else:
                txt, img = block(txt, img, attend, rope)
        if x is not None:
            img = x[:, t:]
        return img


def host_attention(backend, heads):
    if backend == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    host = os.environ.get("COMFYUI_DIR") or str(C.daam_cache() / "ComfyUI-0.3.75")
    sys.path.insert(0, host)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    from comfy.ldm.modules.attention import attention_sub_quad

    return lambda q, k, v: attention_sub_quad(q, k, v, heads, skip_reshape=True, skip_output_reshape=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=sorted(SHAPES), default="flux")
    ap.add_argument("--backend", choices=("sdpa", "subquad"), default="sdpa")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--contrast", action="store_true", help="also time the full-probabilities approach once")
    ap.add_argument("--blocks", default="", help="block kinds, e.g. 'single' or 'double,single' (default: the "
                                                 "family's reduced depth)")
    ap.add_argument("--one-call", action="store_true", help="only the one-call comparison (implies --contrast)")
    args = ap.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # re-run with large blocks mapped on their own
        os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        os.execv(sys.executable, [sys.executable] + sys.argv)

    from daam_core.engine import joint
    from daam_core.engine.geometry import PatchGrid
    from daam_core.engine.recorder import AttentionRecorder, Stream as RStream

    torch.manual_seed(0)
    blocks = [b.strip() for b in args.blocks.split(",") if b.strip()]
    model = C.seeded_init_(C.empty_module(lambda: Model(args.family, blocks)), seed=0).eval()
    latent = args.size // 8
    hw = (latent // 2, latent // 2)
    n = hw[0] * hw[1]
    t = model.text
    txt = torch.randn(1, t, model.width) * 0.5
    img = torch.randn(1, n, model.width) * 0.5
    host = host_attention(args.backend, model.heads)
    rec = AttentionRecorder()
    length = t + n
    inside = {"wall": 0.0, "cpu": 0.0}  # time spent in record_joint (the recorder's own work)
    record_joint = rec.record_joint

    def timed_record_joint(*a, **kw):
        w0, c0 = time.perf_counter(), time.process_time()
        record_joint(*a, **kw)
        inside["wall"] += time.perf_counter() - w0
        inside["cpu"] += time.process_time() - c0

    rec.record_joint = timed_record_joint

    def plain_attention(name, part, q, k, v):
        return host(q, k, v)

    def traced_attention(name, part, q, k, v):
        if args.backend == "sdpa":
            return rec.attend_joint(name, part, q, k, v, model.heads, text=(0, t), image=(t, length),
                                    reference=lambda: host(q, k, v))
        out = host(q, k, v)
        rec.record_joint(name, part, q, k, model.heads, text=(0, t), image=(t, length))
        return out

    def run(traced: bool):
        inside.update(wall=0.0, cpu=0.0)
        if traced:
            rec.begin(PatchGrid((latent, latent), 2), [RStream(0, "cond", 0)], [t])
            rec.set_call([0], 0.5)
        reset_peak()
        base = rss_kib("VmRSS")
        w0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = model(txt, img, traced_attention if traced else plain_attention)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        peak = (rss_kib("VmHWM") - base) * 1024
        recording = rec.finish() if traced else None
        return out, wall, cpu, peak, recording

    C.log(f"{args.family} {args.size}x{args.size}: N={n}, T={t}, blocks={model.kinds}, backend={args.backend}")
    figures = {
        "bench": "overhead_joint", "family": args.family, "backend": args.backend, "size": args.size,
        "n_image": n, "text": t, "heads": model.heads, "head_dim": model.width // model.heads,
        "blocks": list(model.kinds), "machine": C.machine_info(),
    }
    if not args.one_call:
        run(True)  # warm-up, and the fused kernel's one-time bit-for-bit check per input signature
        times = {"plain": [], "traced": []}
        outputs, recording = {}, None
        for rep in range(args.pairs):
            order = ("plain", "traced") if rep % 2 == 0 else ("traced", "plain")
            for name in order:
                out, wall, cpu, peak, recorded = run(name == "traced")
                recording = recorded or recording
                times[name].append((wall, cpu, peak, inside["wall"], inside["cpu"]))
                outputs.setdefault(name, out)
            C.log(f"rep {rep + 1}/{args.pairs}: plain {times['plain'][-1][0]:.1f}s, "
                  f"traced {times['traced'][-1][0]:.1f}s (load {C.loadavg()})")

        def ratios(i):
            r = [a[i] / b[i] for a, b in zip(times["traced"], times["plain"])]
            return {"median": round(statistics.median(r), 4), "min": round(min(r), 4), "max": round(max(r), 4),
                    "all": [round(x, 4) for x in r]}

        layers = len(model.kinds)
        sums = layers * n * t * 4
        workspace = joint.workspace_bytes(1, model.heads, model.heads, n, length, t, model.width // model.heads,
                                          torch.float32, args.backend == "sdpa", rec.joint_chunk_elements)
        added = (statistics.median(x[2] for x in times["traced"])
                 - statistics.median(x[2] for x in times["plain"]))
        # the recorder's own share: its time inside record_joint over the plain forward of the same pair
        share_wall = [x[3] / y[0] for x, y in zip(times["traced"], times["plain"])]
        share_cpu = [x[4] / y[1] for x, y in zip(times["traced"], times["plain"])]
        figures.update({
            "pairs": args.pairs, "wall_ratio": ratios(0), "cpu_ratio": ratios(1),
            "plain_wall_s": [round(x[0], 2) for x in times["plain"]],
            "traced_wall_s": [round(x[0], 2) for x in times["traced"]],
            "plain_cpu_s": [round(x[1], 2) for x in times["plain"]],
            "traced_cpu_s": [round(x[1], 2) for x in times["traced"]],
            "output_identical": bool(torch.equal(outputs["plain"], outputs["traced"])),
            "recorder_share_wall": [round(x, 4) for x in share_wall],
            "recorder_share_cpu": [round(x, 4) for x in share_cpu],
            "recorder_s": [round(x[3], 2) for x in times["traced"]],
            "recorded_layers": sorted(recording.sums), "calls": recording.calls,
            "added_peak_mb": round(added / 2 ** 20, 1),
            "formula_mb": round((sums + workspace) / 2 ** 20, 1), "sums_mb": round(sums / 2 ** 20, 1),
            "workspace_mb": round(workspace / 2 ** 20, 1),
        })
    figures["full_lxl_fp32_mb"] = round(model.heads * length * length * 4 / 2 ** 20, 1)
    if args.contrast or args.one_call:
        g = torch.Generator().manual_seed(1)
        d = model.width // model.heads
        q, k, v = (torch.randn(1, model.heads, length, d, generator=g) for _ in range(3))
        host(q, k, v)
        rec.begin(PatchGrid((latent, latent), 2), [RStream(0, "cond", 0)], [t])
        rec.set_call([0], 0.5)
        traced_attention("single.0", "single", q, k, v)  # the kernel check for this signature, not timed
        rec.finish()
        timings = {}
        for name in ("attention", "full_probabilities", "attend_joint"):
            reset_peak()
            base = rss_kib("VmRSS")
            w0, c0 = time.perf_counter(), time.process_time()
            if name == "attention":
                host(q, k, v)
            elif name == "full_probabilities":  # the host's call plus the materialised [B, H, L, L] softmax
                host(q, k, v)
                p = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, dim=-1)
                acc = p[:, :, t:, :t].sum(1)
                del p, acc
            else:
                rec.begin(PatchGrid((latent, latent), 2), [RStream(0, "cond", 0)], [t])
                rec.set_call([0], 0.5)
                traced_attention("single.0", "single", q, k, v)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            peak = (rss_kib("VmHWM") - base) * 1024
            if name == "attend_joint":
                rec.finish()
            timings[name] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "added_peak_mb": round(peak / 2 ** 20, 1)}
            C.log(f"one call, {name}: {timings[name]}")
        figures["one_call"] = timings
    figures["loadavg"] = C.loadavg()
    C.emit(figures)


if __name__ == "__main__":
    main()
