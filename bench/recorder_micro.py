"""Where the recorder's time goes: one cross-attention call per layer resolution, in isolation.

For the shapes of SD1.5 at ``--size`` (CFG batch 2, 8 heads, head dims 40/80/160/160 at latent factors 1/2/4/8,
77 tokens), times the model's own cross-attention (``scaled_dot_product_attention`` of q, k, v: what the host
computes anyway) and ``CrossAttentionRecorder.record`` on the same q, k; then the steps of ``record`` one by one
(gather of the recorded rows, q k^T, scale, softmax, sum over heads, ``index_add_`` into the running sum). Median of
``--reps`` calls each, interleaved. This explains the per-layer-resolution cost seen in the sampling benchmarks.

Times are process CPU time with one torch thread; ``--baseline COMMIT`` times that commit's recorder beside the
current one (interleaved) for a before/after figure. Example::

    nice -n 10 python bench/recorder_micro.py --size 512 --baseline 2f6a575
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


def baseline_recorder(commit: str):
    """The recorder module as it was at ``commit`` (``git show``), imported beside the current one."""
    import subprocess
    import tempfile

    src = subprocess.run(["git", "-C", str(C.REPO), "show", f"{commit}:daam_core/engine/recorder.py"], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    path = tempfile.NamedTemporaryFile("w", suffix=".py", delete=False)
    path.write(src)
    path.close()
    name = "daam_core.engine._baseline_recorder"  # a sibling of the current module: its relative imports resolve
    spec = importlib.util.spec_from_file_location(name, path.name)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def median_ms(fn, reps: int) -> float:
    """Median process CPU time of ``fn`` in ms (one torch thread: independent of other load)."""
    fn()
    ts = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        ts.append(time.process_time() - t)
    return round(1000 * statistics.median(ts), 3)


def spread(ts: list[float]) -> list[float]:
    """10th and 90th percentile of times ``ts`` (s) in ms."""
    q = statistics.quantiles(ts, n=10)
    return [round(1000 * q[0], 3), round(1000 * q[-1], 3)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=77)
    ap.add_argument("--model", choices=("sd15", "tiny"), default="sd15",
                    help="sd15: SD1.5's layer shapes; tiny: the reference comparison's tiny UNet (2 heads x 16/32)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline", default=None, help="a git commit whose recorder is timed beside this one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    R = load_recorder()
    B = baseline_recorder(args.baseline) if args.baseline else None

    latent = args.size // 8
    batch, T = 2, args.tokens
    if args.model == "sd15":
        heads = 8
        layers_per_factor = {1: 5, 2: 5, 4: 5, 8: 1}  # SD1.5: down 2 + up 3 per level, 1 mid block
        dims = {1: 40, 2: 80, 4: 160, 8: 160}
    else:
        heads = 2
        layers_per_factor = {1: 4, 2: 2, 4: 1}  # tiny UNet: down 1 + up 2 per level, 1 mid block
        dims = {1: 16, 2: 32, 4: 32}
    g = torch.Generator().manual_seed(0)
    out = {}
    for factor, d in dims.items():
        hw = latent // factor
        n = hw * hw
        q = torch.randn(batch, n, heads * d, generator=g)
        k = torch.randn(batch, T, heads * d, generator=g)
        v = torch.randn(batch, T, heads * d, generator=g)
        def make(module):
            r = module.CrossAttentionRecorder()
            r.begin((latent, latent), [module.Stream(0, "cond", 0), module.Stream(0, "uncond", 1)], [T, T])
            r.set_call([1, 0], 0.0)  # the usual CFG batch: uncond row first
            return r

        rec = make(R)
        old = make(B) if B is not None else None

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
        def record_baseline():
            old.record("layer", "down", q, k, heads)

        # interleave native / record (/ baseline) so that drifts hit all; process CPU time
        fns = {"native": native, "record": record}
        if old is not None:
            fns["baseline"] = record_baseline
        times = {name: [] for name in fns}
        for fn in fns.values():
            fn()
        for i in range(args.reps):
            names = list(fns)
            for name in names[i % len(names):] + names[:i % len(names)]:
                t = time.process_time()
                fns[name]()
                times[name].append(time.process_time() - t)
        nat, recd = times["native"], times["record"]
        entry["native_cross_attention_ms"] = round(1000 * statistics.median(nat), 3)
        entry["record_ms"] = round(1000 * statistics.median(recd), 3)
        entry["record_ms_p10_p90"] = spread(recd)
        if old is not None:
            entry["baseline_record_ms"] = round(1000 * statistics.median(times["baseline"]), 3)
            entry["baseline_record_ms_p10_p90"] = spread(times["baseline"])
            entry["baseline_record_ms_per_unet_call"] = round(entry["baseline_record_ms"] * layers_per_factor[factor], 3)
        entry["record_over_native"] = round(entry["record_ms"] / entry["native_cross_attention_ms"], 3)
        entry["steps_ms"] = {name: median_ms(fn, args.reps) for name, fn in steps.items()}
        entry["record_ms_per_unet_call"] = round(entry["record_ms"] * layers_per_factor[factor], 3)
        out[str(factor)] = entry
        C.log(f"factor {factor}: {entry}")
    total = sum(e["record_ms_per_unet_call"] for e in out.values())
    result = {"bench": "recorder_micro", "model": args.model, "size": args.size, "batch": batch, "heads": heads,
              "tokens": T, "clock": "process CPU time", "by_factor": out, "record_ms_per_unet_call": round(total, 3)}
    if B is not None:
        result["baseline"] = args.baseline
        result["baseline_record_ms_per_unet_call"] = round(
            sum(e["baseline_record_ms_per_unet_call"] for e in out.values()), 3)
    result["machine"] = C.machine_info()
    C.emit(result)


if __name__ == "__main__":
    main()
