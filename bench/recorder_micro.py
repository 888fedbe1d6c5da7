"""Where the recorder's time goes: one cross-attention call per layer resolution, in isolation.

For the shapes of SD1.5 at ``--size`` (CFG batch 2, 8 heads, head dims 40/80/160/160 at latent factors 1/2/4/8,
77 tokens), times the model's own cross-attention (``scaled_dot_product_attention`` of q, k, v: what the host
computes anyway) and ``CrossAttentionRecorder.record`` on the same q, k; then the steps of ``record`` one by one
(gather of the recorded rows, q k^T, scale, softmax, sum over heads, ``index_add_`` into the running sum). Median of
``--reps`` calls each, interleaved. This explains the per-layer-resolution cost seen in the sampling benchmarks.

Example::

    python bench/recorder_micro.py --size 512
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import _common as C


def load_recorder():
    """``daam_core.engine.recorder`` (imported as a file when the package as a whole cannot be imported yet)."""
    try:
        from daam_core.engine import recorder
        return recorder
    except ImportError:
        spec = importlib.util.spec_from_file_location("daam_recorder", C.REPO / "daam_core" / "engine" / "recorder.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["daam_recorder"] = mod
        spec.loader.exec_module(mod)
        return mod


def median_ms(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return round(1000 * statistics.median(ts), 3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=77)
    args = ap.parse_args()
    R = load_recorder()

    latent = args.size // 8
    heads, batch, T = 8, 2, args.tokens
    layers_per_factor = {1: 5, 2: 5, 4: 5, 8: 1}  # SD1.5: down 2 + up 3 per level, 1 mid block
    dims = {1: 40, 2: 80, 4: 160, 8: 160}
    g = torch.Generator().manual_seed(0)
    out = {}
    for factor, d in dims.items():
        hw = latent // factor
        n = hw * hw
        q = torch.randn(batch, n, heads * d, generator=g)
        k = torch.randn(batch, T, heads * d, generator=g)
        v = torch.randn(batch, T, heads * d, generator=g)
        rec = R.CrossAttentionRecorder()
        streams = R.cfg_streams(1, [0], 1)
        rec.begin((latent, latent), streams, [T, T])
        rec.set_call(R.cfg_rows(1, True), 0.0)

        def native():
            qh = q.view(batch, n, heads, d).transpose(1, 2)
            kh = k.view(batch, T, heads, d).transpose(1, 2)
            vh = v.view(batch, T, heads, d).transpose(1, 2)
            return F.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(batch, n, heads * d)

        def record():
            rec.record("layer", "down", q, k, heads)

        rows = torch.tensor([0, 1])
        qs = q[rows].view(batch, n, heads, d).transpose(1, 2)
        ks = k[rows].view(batch, T, heads, d).transpose(1, 2)
        scores = torch.matmul(qs, ks.transpose(-1, -2))
        probs = scores.softmax(-1)
        summed = probs.sum(1)
        acc = torch.zeros(batch, n, T)
        idx = torch.tensor([1, 0])
        steps = {
            "gather_rows": lambda: (q[rows], k[rows]),
            "qk_matmul": lambda: torch.matmul(qs, ks.transpose(-1, -2)),
            "scale": lambda: scores.mul(1.0 / math.sqrt(d)),
            "softmax": lambda: scores.softmax(-1),
            "head_sum": lambda: probs.sum(1),
            "index_add": lambda: acc.index_add_(0, idx, summed),
        }
        entry = {"hw": [hw, hw], "n": n, "head_dim": d, "layers": layers_per_factor[factor]}
        # interleave native / record so that drifts hit both
        nat, recd = [], []
        native(), record()
        for _ in range(args.reps):
            t = time.perf_counter(); native(); nat.append(time.perf_counter() - t)
            t = time.perf_counter(); record(); recd.append(time.perf_counter() - t)
        entry["native_cross_attention_ms"] = round(1000 * statistics.median(nat), 3)
        entry["record_ms"] = round(1000 * statistics.median(recd), 3)
        entry["record_over_native"] = round(entry["record_ms"] / entry["native_cross_attention_ms"], 3)
        entry["steps_ms"] = {name: median_ms(fn, args.reps) for name, fn in steps.items()}
        entry["record_ms_per_unet_call"] = round(entry["record_ms"] * layers_per_factor[factor], 3)
        out[str(factor)] = entry
        C.log(f"factor {factor}: {entry}")
    total = sum(e["record_ms_per_unet_call"] for e in out.values())
    C.emit({"bench": "recorder_micro", "size": args.size, "batch": batch, "heads": heads, "tokens": T,
            "by_factor": out, "record_ms_per_unet_call": round(total, 3), "machine": C.machine_info()})


if __name__ == "__main__":
    main()
