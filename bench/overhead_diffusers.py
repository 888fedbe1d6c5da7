"""Overhead of DAAM tracing through the diffusers adapter (``daam_core.trace(pipe)``).

Overhead ratio = time of ``pipe(...)`` inside ``with trace(pipe, ...)`` / time of the same call without tracing: same
model, seed, steps and size; the median over ``--pairs`` interleaved repetitions (see ``_common.interleaved``).
Sampling only (``output_type="latent"``: the VAE is the same for both and is not what is measured); installing and
removing the trace is inside the timed region. The word maps are timed separately after each traced run
(``tc.result().word_maps(words)``) and reported as ``maps_s`` and as the ratio with maps included.

Then one more traced run is instrumented (not part of the ratios): the time spent in the recorder
(``AttentionRecorder.record``) and in the host's own cross-attention (the wrapped processor) per layer
resolution, so that a missed target can be attributed.

Configurations (``--configs``): ``plain``; ``all`` = default settings (every cross-attention layer, every step, both
CFG branches); ``fN`` = only the layers at latent factor N (SD1.5 at 512x512: f4 = the 16x16 layers);
``cond`` = default layers but the positive branch only.

Examples::

    python bench/overhead_diffusers.py --model sd15 --size 512 --steps 3 --pairs 5
    python bench/overhead_diffusers.py --model sd15 --size 256 --steps 4 --pairs 5 --configs plain,all,f1,f2,f4,f8
    python bench/overhead_diffusers.py --model sdxl --size 1024 --steps 1 --pairs 5 --configs plain,all
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

import _common as C

PROMPT = "a cat and a dog on a red sofa"
WORDS = ["cat", "dog", "red", "sofa"]


def parse_config(name: str) -> dict:
    if name == "all":
        return {}
    if name == "cond":
        return {"negative": False}
    if name.startswith("f") and name[1:].isdigit():
        return {"factors": [int(name[1:])]}
    raise SystemExit(f"unknown configuration {name!r}: use plain, all, cond or fN")


def instrumented_run(pipe, call, trace):
    """One traced sampling with timers around the recorder and the wrapped processors, per layer."""
    from daam_core.hosts.diffusers.adapter import CrossAttentionRecorderProcessor

    rec_time, rec_calls = defaultdict(float), defaultdict(int)
    attn_time = defaultdict(float)
    with trace(pipe) as tc:
        record = tc.recorder.record

        def timed_record(name, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return record(name, *args, **kwargs)
            finally:
                rec_time[name] += time.perf_counter() - t0
                rec_calls[name] += 1

        tc.recorder.record = timed_record
        for name, module in pipe.unet.named_modules():
            proc = getattr(module, "processor", None)
            if isinstance(proc, CrossAttentionRecorderProcessor):
                inner = proc.inner

                def timed_inner(*args, _inner=inner, _name=name, **kwargs):
                    t0 = time.perf_counter()
                    try:
                        return _inner(*args, **kwargs)
                    finally:
                        attn_time[_name] += time.perf_counter() - t0

                proc.inner = timed_inner
        t0 = time.perf_counter()
        call()
        total = time.perf_counter() - t0
        result = tc.result()
    by_factor = {}
    for name, info in result.layers.items():
        f = by_factor.setdefault(info.factor, {"hw": list(info.hw), "layers": 0, "heads": info.heads, "calls": 0,
                                               "record_s": 0.0, "cross_attention_s": 0.0})
        f["layers"] += 1
        f["calls"] += rec_calls[name]
        f["record_s"] += rec_time[name]
        f["cross_attention_s"] += attn_time[name]
    return total, dict(sorted(by_factor.items())), result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--configs", default="plain,all,f4")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-breakdown", action="store_true", help="skip the instrumented run")
    args = ap.parse_args()

    from daam_core import trace

    configs = args.configs.split(",")
    if configs[0] != "plain":
        raise SystemExit("the first configuration must be plain (the baseline)")
    t0 = time.perf_counter()
    pipe = C.sd15_pipeline(args.seed) if args.model == "sd15" else C.sdxl_pipeline(args.seed)
    C.log(f"built {args.model} pipeline in {time.perf_counter() - t0:.1f}s "
          f"(UNet {C.count_params(pipe.unet) / 1e6:.0f} M parameters)")

    def call():
        return pipe(PROMPT, height=args.size, width=args.size, num_inference_steps=args.steps,
                    guidance_scale=args.guidance, output_type="latent",
                    generator=torch.Generator().manual_seed(args.seed)).images

    maps_s = defaultdict(list)
    nbytes = {}

    def traced_run(name, kwargs):
        def run():
            t0 = time.perf_counter()
            with trace(pipe, **kwargs) as tc:
                call()
            t = time.perf_counter()
            sampling = t - t0
            tc.result().word_maps(WORDS)
            maps_s[name].append(time.perf_counter() - t)
            nbytes[name] = tc.result().nbytes()
            return C.Timed(sampling)
        return run

    runs = {"plain": call}
    for name in configs[1:]:
        runs[name] = traced_run(name, parse_config(name))
    timing = C.interleaved(runs, args.pairs)
    for name in configs[1:]:
        m = maps_s[name][-args.pairs:]  # the warm-up run also timed its maps
        timing[name]["maps_s_median"] = round(statistics.median(m), 4)
        with_maps = [(t + s) / b for t, s, b in zip(timing[name]["times_s"], m, timing["plain"]["times_s"])]
        timing[name]["ratio_with_maps_median"] = round(statistics.median(with_maps), 4)
        timing[name]["recorder_bytes"] = nbytes[name]

    figures = {
        "bench": "overhead_diffusers", "model": args.model, "size": args.size, "steps": args.steps,
        "pairs": args.pairs, "guidance": args.guidance, "prompt": PROMPT, "words": WORDS,
        "unet_params_m": round(C.count_params(pipe.unet) / 1e6, 1), "timing": timing,
    }
    if not args.no_breakdown:
        total, by_factor, result = instrumented_run(pipe, call, trace)
        plain = timing["plain"]["median_s"]
        for f in by_factor.values():
            f["record_ms_per_call"] = round(1000 * f["record_s"] / max(f["calls"], 1), 3)
            f["record_share_of_plain"] = round(f["record_s"] / plain, 4)
            f["cross_attention_share_of_plain"] = round(f["cross_attention_s"] / plain, 4)
            f["record_s"] = round(f["record_s"], 4)
            f["cross_attention_s"] = round(f["cross_attention_s"], 4)
        rec_total = sum(f["record_s"] for f in by_factor.values())
        figures["breakdown"] = {
            "instrumented_total_s": round(total, 4), "by_factor": {str(k): v for k, v in by_factor.items()},
            "record_total_s": round(rec_total, 4), "record_share_of_plain": round(rec_total / plain, 4),
            "recorder_bytes": result.nbytes(),
            "note": "record_s = time inside AttentionRecorder.record (q k^T, softmax, head sum, index_add); "
                    "cross_attention_s = the host processor's own cross-attention; shares are of the median plain "
                    "sampling time; timers add a little overhead of their own",
        }
    figures["machine"] = C.machine_info()
    C.emit(figures)


if __name__ == "__main__":
    main()
