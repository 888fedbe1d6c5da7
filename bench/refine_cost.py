"""Cost of the word-map refinements (issue 24): sampling overhead, time after sampling, memory by formula.

    nice -n 10 python bench/refine_cost.py --repeats 3

1. Sampling (CPU): the shipped shapes model (32x32, 20 DPM-Solver++ steps, CFG) and the shared tiny SD1.x pipeline
   at 256x256 (32x32 latent: self-attention at 32x32 and 16x16, 10 steps), untraced, traced plain, traced with
   self-attention sums, with per-head sums, with both: ``--repeats`` interleaved repetitions in rotated order
   (``_common.interleaved``, one torch thread), each configuration's ratio to the untraced run of the same
   repetition in process CPU time and wall time, median and spread.
2. After sampling: ``word_maps`` of two words, plain and each refinement (median of 20).
3. Memory: the sums' bytes by formula (:func:`daam_core.engine.refine.self_attention_bytes`, ``head_sum_bytes``),
   checked against the bytes of the tensors a real trace holds (shapes model, tiny pipeline), and the formula for
   SDXL at 1024x1024 (layers from its UNet config, ``bench/memory.py``) and Flux at 1024x1024.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from daam_core import trace  # noqa: E402
from daam_core.engine import refine  # noqa: E402
from daam_core.engine.refine import RefineRecording  # noqa: E402

MODES = {"traced": None, "self": RefineRecording(self_attention=True), "heads": RefineRecording(head_sums=True),
         "both": RefineRecording(self_attention=True, head_sums=True)}
MAPS = {"plain": {}, "propagate:2": {"propagate": 2}, "heads:1": {"head_power": 1.0},
        "propagate:2+heads:1": {"propagate": 2, "head_power": 1.0},
        "finest:2+heads:4": {"propagate": 2, "propagate_at": "finest", "head_power": 4.0},
        "exclusive": {"exclusive": True},
        "finest:2+heads:4+exclusive": {"propagate": 2, "propagate_at": "finest", "head_power": 4.0, "exclusive": True},
        "both:1+heads:4+exclusive": {"propagate": 1, "propagate_at": "both", "head_power": 4.0, "exclusive": True}}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def sampling(pipe, prompt: str, words, steps: int, size: int, guidance: float, repeats: int) -> dict:
    def draw():
        return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images[0]

    traces = {}

    def traced(mode, opts):
        def run():
            with trace(pipe, refine=opts) as tc:
                draw()
            traces[mode] = tc.result()
        return run

    timing = C.interleaved({"untraced": draw, **{m: traced(m, o) for m, o in MODES.items()}}, repeats,
                           baseline="untraced")
    out = {"untraced_s": timing["untraced"]["median_s"], "untraced_cpu_s": timing["untraced"]["cpu_median_s"]}
    for mode in MODES:
        t = timing[mode]
        out[f"{mode}_s"], out[f"{mode}_cpu_s"] = t["median_s"], t["cpu_median_s"]
        out[f"{mode}_cpu_ratio"], out[f"{mode}_wall_ratio"] = t["cpu_ratio_spread"], t["ratio_spread"]
    out["loadavg"] = timing["_loadavg_after_each_rep"]
    tr = traces["both"]
    for name, kw in MAPS.items():
        out[f"maps_{name}_ms"] = 1000 * median_time(lambda: tr.word_maps(words, image=0, **kw), 20)
    streams = len(tr.streams)
    t = max(lay.length for lay in tr.layouts)
    hws = [tr.layers[n].hw for n in tr.sums]
    out["self_bytes"] = sum(v.nbytes for v in tr.self_sums.values())
    out["self_bytes_formula"] = refine.self_attention_bytes(streams, hws)
    out["head_bytes"] = sum(v.nbytes for v in tr.head_sums.values())
    out["head_bytes_formula"] = refine.head_sum_bytes(streams, [(*tr.layers[n].hw, tr.layers[n].heads)
                                                                for n in tr.sums], t)
    out["plain_bytes"] = sum(v.nbytes for v in tr.sums.values())
    return out


def large_models() -> dict:
    from memory import sdxl_layers

    layers = sdxl_layers(1024)
    hws = [(x["hw"], x["hw"]) for x in layers]
    mib = 2 ** 20
    return {
        "sdxl_1024_self_MiB_per_stream": refine.self_attention_bytes(1, hws) / mib,
        "sdxl_1024_self_MiB_per_stream_max_queries_4096": refine.self_attention_bytes(1, hws, 4096) / mib,
        "sdxl_1024_heads_MiB_per_stream_77_tokens": refine.head_sum_bytes(
            1, [(x["hw"], x["hw"], x["heads"]) for x in layers], 77) / mib,
        "sdxl_1024_plain_MiB_per_stream_77_tokens": 4 * 77 * sum(x["n"] for x in layers) / mib,
        # Flux.1 at 1024x1024: one 64x64 grid of image tokens; self-attention there would be 4 * 4096^2 bytes
        "flux_1024_self_MiB_per_stream_if_recorded": refine.self_attention_bytes(1, [(64, 64)], 4096) / mib,
        "flux_1024_heads_MiB_per_stream_512_tokens_57_blocks_if_recorded": refine.head_sum_bytes(
            1, [(64, 64, 24)] * 57, 512) / mib,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from daam_core.cli.demo_pipeline import tiny_sd_pipeline
    from daam_core.shapes import model as shapes_model

    torch.set_num_threads(1)  # process CPU time then hardly depends on the machine's other load
    result = {"bench": "refine_cost", "threads": torch.get_num_threads()}
    with torch.no_grad():
        if shapes_model.available():
            result["shapes_32"] = sampling(shapes_model.load_shapes_pipeline(),
                                           "a red circle on the left and a blue square on the right",
                                           ["circle", "square"], 20, 32, 4.0, args.repeats)
        tiny = tiny_sd_pipeline(seed=0, vae_levels=4)
        tiny.set_progress_bar_config(disable=True)
        result["tiny_sd_256"] = sampling(tiny, "a red car and a dog on the grass", ["car", "dog"], 10, 256, 7.5,
                                         args.repeats)
    result["formula"] = large_models()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
