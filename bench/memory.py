"""Memory of DAAM tracing: flat in the number of steps, and the recorder's own size for SDXL at 1024x1024.

Part 1 (``--steps 10,20,50``): for each step count, a fresh child process builds the pipeline, runs one sampling (plain
or traced with default settings) and reports its peak resident memory (``ru_maxrss``: the whole process, model
included) and the peak sampled every 2 ms during the sampling alone. Growth = (peak at the largest step count -
peak at the smallest) / peak at the smallest; target < 2% for the traced runs. Models: ``tiny`` (the shared tiny
SD1.x pipeline at 512x512, 64x64 latent: the model is small, so the recorder's share of the process is the largest)
and ``sd15`` (full-width SD1.5 UNet at ``--size``).

Part 2 (``--sdxl``): the recorder's memory for SDXL at 1024x1024 with 77 tokens. Formula: one fp32 running sum per
cross-attention layer of shape ``[streams, N_layer, T]``, streams = images x 2 with CFG (both branches are recorded by
default), so ``bytes = 4 * streams * T * sum(N_layer)``. The layer list comes from the SDXL UNet config (built on the
meta device: no weights); the measurement feeds a real ``AttentionRecorder`` the q/k tensors of exactly those
shapes for two sampling steps (in a child process) and reports the sums' bytes and the peak memory the recorder
added above its inputs (sums + transient scores).

Example::

    python bench/memory.py --model tiny --steps 10,20,50 --sdxl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

import _common as C

PROMPT = "a cat and a dog on a red sofa"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class PeakSampler:
    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()

    def __enter__(self):
        self.peak = rss_mb()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())


def child_sampling(model: str, size: int, steps: int, traced: bool) -> dict:
    from daam_core import trace

    pipe = C.bench_tiny_pipeline(0) if model == "tiny" else C.sd15_pipeline(0)
    kwargs = dict(height=size, width=size, guidance_scale=7.5, output_type="latent")
    pipe(PROMPT, num_inference_steps=1, **kwargs)  # warm-up: one-time allocations are not step-dependent
    before = rss_mb()
    nbytes = 0
    with PeakSampler() as ps:
        if traced:
            with trace(pipe) as tc:
                pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kwargs)
            nbytes = tc.result().nbytes()
        else:
            pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kwargs)
    return {"steps": steps, "traced": traced, "rss_before_sampling_mb": round(before, 1),
            "sampling_peak_rss_mb": round(ps.peak, 1), "process_peak_rss_mb": round(C.peak_rss_mb(), 1),
            "recorder_bytes": nbytes}


def sdxl_layers(size: int = 1024) -> list[dict]:
    """Cross-attention layers of the SDXL UNet at ``size`` (name, factor, N, heads, head dim), from its config."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
    levels = len(unet.config.block_out_channels)
    latent = size // 8
    out = []
    for name, m in unet.named_modules():
        if name.endswith("attn2"):
            part, idx = name.split(".")[:2]
            if part == "down_blocks":
                level = int(idx)
            elif part == "up_blocks":
                level = levels - 1 - int(idx)
            else:
                level = levels - 1  # mid block
            factor = 2 ** level
            hw = latent // factor
            out.append({"name": name, "location": part.split("_")[0], "factor": factor, "n": hw * hw, "hw": hw, "heads": m.heads,
                        "head_dim": m.inner_dim // m.heads})
    return out


def child_sdxl(tokens: int, images: int) -> dict:
    from daam_core.engine.recorder import AttentionRecorder
    from daam_core.hosts.contract import cfg_rows, cfg_streams

    layers = sdxl_layers()
    rec = AttentionRecorder()
    streams = cfg_streams(images, list(range(images)), images)
    rec.begin((128, 128), streams, [tokens] * (2 * images))
    rows = cfg_rows(images, True)
    g = torch.Generator().manual_seed(0)
    # The inputs the host computes anyway (q, k of every layer), made once and reused for every call.
    inputs = {}
    for lay in layers:
        key = (lay["n"], lay["heads"], lay["head_dim"])
        if key not in inputs:
            inputs[key] = (torch.randn(2 * images, lay["n"], lay["heads"] * lay["head_dim"], generator=g),
                           torch.randn(2 * images, tokens, lay["heads"] * lay["head_dim"], generator=g))
    base_peak = C.peak_rss_mb()
    base = rss_mb()
    t0 = time.perf_counter()
    for step in range(2):
        rec.set_call(rows, step / 2)
        for lay in layers:
            q, k = inputs[(lay["n"], lay["heads"], lay["head_dim"])]
            rec.record(lay["name"], lay["location"], q, k, lay["heads"])
    elapsed = time.perf_counter() - t0
    after = rss_mb()
    peak = C.peak_rss_mb()
    nbytes = sum(v.numel() * v.element_size() for v in rec.sums.values())
    return {"layers": len(rec.sums), "sums_bytes": nbytes, "rss_added_mb": round(after - base, 1),
            "peak_added_mb": round(peak - max(base_peak, base), 1), "record_s_per_step": round(elapsed / 2, 3)}


def run_child(args: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    C.log(" ".join(cmd))
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["tiny", "sd15"], default="tiny")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", default="10,20,50")
    ap.add_argument("--sdxl", action="store_true", help="also the SDXL recorder formula and measurement")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=["plain", "traced", "sdxl"], default="traced", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        if args.mode == "sdxl":
            res = child_sdxl(77, 1)
        else:
            res = child_sampling(args.model, args.size, int(args.steps), args.mode == "traced")
        print(json.dumps(res), flush=True)
        return

    figures = {"bench": "memory", "model": args.model, "size": args.size, "runs": []}
    steps = [int(s) for s in args.steps.split(",")] if args.steps else []
    for n in steps:
        for mode in ("plain", "traced"):
            figures["runs"].append(run_child(["--model", args.model, "--size", str(args.size), "--steps", str(n),
                                              "--mode", mode]))
    if steps:
        summary = {}
        for mode in ("plain", "traced"):
            rs = sorted((r for r in figures["runs"] if r["traced"] == (mode == "traced")), key=lambda r: r["steps"])
            lo, hi = rs[0], rs[-1]
            summary[mode] = {
                "process_peak_mb": {str(r["steps"]): r["process_peak_rss_mb"] for r in rs},
                "sampling_peak_mb": {str(r["steps"]): r["sampling_peak_rss_mb"] for r in rs},
                "process_peak_growth": round(hi["process_peak_rss_mb"] / lo["process_peak_rss_mb"] - 1, 4),
                "sampling_peak_growth": round(hi["sampling_peak_rss_mb"] / lo["sampling_peak_rss_mb"] - 1, 4),
                "recorder_bytes": {str(r["steps"]): r["recorder_bytes"] for r in rs},
            }
        summary["traced_minus_plain_sampling_peak_mb"] = {
            str(n): round(next(r["sampling_peak_rss_mb"] for r in figures["runs"] if r["steps"] == n and r["traced"]) -
                          next(r["sampling_peak_rss_mb"] for r in figures["runs"] if r["steps"] == n and not r["traced"]), 1)
            for n in steps}
        summary["target_flat_under_2pct"] = summary["traced"]["process_peak_growth"] < 0.02
        figures["summary"] = summary

    if args.sdxl:
        layers = sdxl_layers()
        tokens, streams = 77, 2
        total_n = sum(lay["n"] for lay in layers)
        by = {}
        for lay in layers:
            b = by.setdefault(str(lay["factor"]), {"hw": lay["hw"], "layers": 0, "n": lay["n"], "heads": lay["heads"]})
            b["layers"] += 1
        formula = 4 * streams * tokens * total_n
        measured = run_child(["--mode", "sdxl"])
        figures["sdxl_1024"] = {
            "layers_by_factor": by, "layers": len(layers), "sum_N": total_n, "tokens": tokens, "streams": streams,
            "formula": "bytes = 4 * streams * T * sum(N_layer) = 4 * 2 * 77 * %d" % total_n,
            "formula_bytes": formula, "formula_mib": round(formula / 2 ** 20, 2),
            "measured": measured, "measured_mib": round(measured["sums_bytes"] / 2 ** 20, 2),
            "matches": measured["sums_bytes"] == formula,
        }
    figures["machine"] = C.machine_info()
    C.emit(figures)


if __name__ == "__main__":
    main()
