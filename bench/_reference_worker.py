"""Runs inside the reference library's venv (castorini ``daam`` 0.2.0, diffusers 0.21.2): never imports daam_core.

Loads the shared tiny pipeline from disk, then for each step count times plain sampling against sampling inside
``daam.trace(pipe)`` with ``_common.interleaved`` (the same protocol as our side: order rotated per repetition,
wall and process CPU time, one torch thread by default), the word maps timed separately
(``compute_global_heat_map()`` + ``compute_word_heat_map(word)`` per word: the reference library's map computation),
and saves the raw word maps (its heat maps before any normalisation: mean over layers x heads of the bicubically
upsampled, clamped, time-summed maps, averaged over a word's tokens) to an .npz file. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform

import numpy as np
import torch

import _common as C  # torch-only helpers (this file's folder is on sys.path); never imports daam_core


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
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

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
        maps_wall, maps_cpu = [], []

        def plain():
            call(steps)

        def traced():
            clock = C.Clock()
            with daam.trace(pipe) as tc:
                call(steps)
                maps_clock = C.Clock()
                heat = tc.compute_global_heat_map()
                word_maps = {w: heat.compute_word_heat_map(w).heatmap for w in words}
                maps = maps_clock.read()
            total = clock.read()
            maps_wall.append(maps[0])
            maps_cpu.append(maps[1])
            maps_out[f"steps{steps}"] = np.stack([word_maps[w].float().cpu().numpy() for w in words])
            # sampling, entering and leaving the trace; the map computation excluded (timed on its own)
            return C.Timed(total[0] - maps[0], total[1] - maps[1])

        timing = C.interleaved({"plain": plain, "daam": traced}, args.pairs)
        maps_wall, maps_cpu = maps_wall[-args.pairs:], maps_cpu[-args.pairs:]  # warm-up left out
        d, p = timing["daam"], timing["plain"]
        results[str(steps)] = {
            "plain_median_s": p["median_s"], "plain_cpu_median_s": p["cpu_median_s"],
            "daam_median_s": d["median_s"], "daam_cpu_median_s": d["cpu_median_s"],
            **C.with_maps_summary(d, p, maps_wall, maps_cpu),
            "times_plain_s": p["times_s"], "times_daam_s": d["times_s"],
            "cpu_plain_s": p["cpu_times_s"], "cpu_daam_s": d["cpu_times_s"],
            "loadavg": timing["_loadavg_after_each_rep"],
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
