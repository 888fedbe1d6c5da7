"""Runs inside the reference library's venv (castorini ``daam`` 0.2.0, diffusers 0.21.2): never imports daam_core.

Loads the shared tiny pipeline from disk, then for each step count times plain sampling against sampling inside
``daam.trace(pipe)`` (interleaved repetitions), the word maps timed separately
(``compute_global_heat_map()`` + ``compute_word_heat_map(word)`` per word: the reference library's map computation),
and saves the raw word maps (its heat maps before any normalisation: mean over layers x heads of the bicubically
upsampled, clamped, time-summed maps, averaged over a word's tokens) to an .npz file. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipeline", required=True)
    ap.add_argument("--steps", default="10,20,40")
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--words", required=True)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--maps-out", required=True)
    args = ap.parse_args()

    import daam
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline

    words = args.words.split(",")
    pipe = StableDiffusionPipeline.from_pretrained(args.pipeline, safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)

    def call(steps):
        return pipe(args.prompt, height=args.size, width=args.size, num_inference_steps=steps,
                    guidance_scale=args.guidance, output_type="latent",
                    generator=torch.Generator().manual_seed(args.seed)).images

    maps_out = {}
    results = {}
    for steps in [int(s) for s in args.steps.split(",")]:
        times = {"plain": [], "daam": []}
        maps_times = []

        def plain():
            t0 = time.perf_counter()
            call(steps)
            return time.perf_counter() - t0

        def traced():
            t0 = time.perf_counter()
            with daam.trace(pipe) as tc:
                call(steps)
                t1 = time.perf_counter()
                heat = tc.compute_global_heat_map()
                word_maps = {w: heat.compute_word_heat_map(w).heatmap for w in words}
                t2 = time.perf_counter()
            t3 = time.perf_counter()
            maps_times.append(t2 - t1)
            maps_out[f"steps{steps}"] = np.stack([word_maps[w].float().cpu().numpy() for w in words])
            return (t1 - t0) + (t3 - t2)  # sampling, entering and leaving the trace; maps excluded

        runs = {"plain": plain, "daam": traced}
        for name in runs:  # warm-up
            runs[name]()
        maps_times.clear()
        names = list(runs)
        for rep in range(args.pairs):
            order = names[rep % 2:] + names[:rep % 2]
            for name in order:
                gc.collect()
                times[name].append(runs[name]())
            print(f"[ref] steps {steps} rep {rep + 1}/{args.pairs}: plain {times['plain'][-1]:.3f}s "
                  f"daam {times['daam'][-1]:.3f}s", file=sys.stderr, flush=True)
        ratios = [t / p for t, p in zip(times["daam"], times["plain"])]
        with_maps = [(t + m) / p for t, m, p in zip(times["daam"], maps_times, times["plain"])]
        results[str(steps)] = {
            "plain_median_s": round(statistics.median(times["plain"]), 4),
            "daam_median_s": round(statistics.median(times["daam"]), 4),
            "maps_s_median": round(statistics.median(maps_times), 4),
            "ratio_median": round(statistics.median(ratios), 4),
            "ratio_with_maps_median": round(statistics.median(with_maps), 4),
            "ratios": [round(r, 4) for r in ratios], "ratios_with_maps": [round(r, 4) for r in with_maps],
            "times_plain_s": [round(t, 4) for t in times["plain"]],
            "times_daam_s": [round(t, 4) for t in times["daam"]],
        }
    np.savez(args.maps_out, words=np.array(words), **maps_out)
    print(json.dumps({
        "library": "daam", "daam": daam.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "torch": torch.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
        "cross_attention_processor": type(next(iter(pipe.unet.attn_processors.values()))).__name__,
        "steps": results,
    }), flush=True)


if __name__ == "__main__":
    main()
