"""Side by side with the reference library, castorini ``daam`` 0.2.0, on the same tiny SD1.x pipeline.

1. The tiny pipeline (``_common.bench_tiny_pipeline``: UNet channels 32/64/64, 2 heads, cross-attention at latent
   factors 1, 2 and in the mid block; 512x512 images, 64x64 latent, as the reference library assumes) is saved once
   with ``save_pretrained`` (safetensors, which diffusers 0.21.2 reads; the CLIP ``vocab.json``/``merges.txt`` are
   copied next to the ``tokenizer.json`` that transformers 5 writes, for transformers 4.30) to
   ``$DAAM_CACHE/bench/tiny-sd-pipeline``.
2. ``bench/reference_env.sh`` makes the reference venv; ``bench/_reference_worker.py`` runs there: interleaved plain /
   ``daam.trace`` samplings per step count, its map computation timed, its raw word maps saved.
3. This process (the project venv, diffusers 0.42) loads the same folder and does the same with
   ``daam_core.trace``: ``default`` = our default settings (all layers including the mid block, both CFG branches,
   maps at image size, min-max normalised) and ``matched`` = configured like the reference library (down and up
   blocks, positive branch only; maps with ``normalize="none"``, 64x64, bicubic, token mean).
4. Map agreement: Pearson correlation per word between the reference's raw maps and our ``matched`` maps.

Ratios are against each library's own plain sampling in its own process, with the same protocol on both sides
(``_common.interleaved``: one torch thread, order rotated each repetition, wall and *process CPU* time, median and
spread of the per-pair ratios). On a shared machine the CPU-time ratio is the figure: the wall ratio moves with
the other load. Sampling and map computation are timed apart. Run::

    nice -n 10 python bench/compare_reference.py --steps 10,20 --pairs 9
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

import _common as C

PROMPT = "a cat and a dog on a red sofa"
WORDS = ["cat", "dog", "red", "sofa"]
PIPELINE_VERSION = 2  # bump when bench_tiny_pipeline changes


def saved_pipeline(seed: int = 0) -> Path:
    out = C.daam_cache() / "bench" / f"tiny-sd-pipeline-v{PIPELINE_VERSION}-seed{seed}"
    if (out / "model_index.json").is_file():
        return out
    from daam_core.hosts.diffusers.tokenizers import find_clip_tokenizer_dir

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent))
    pipe = C.bench_tiny_pipeline(seed)
    pipe.save_pretrained(tmp, safe_serialization=True)
    src = find_clip_tokenizer_dir()
    for name in ("vocab.json", "merges.txt"):  # transformers 4.30's CLIPTokenizer needs them
        shutil.copy(src / name, tmp / "tokenizer" / name)
    legacy_text_encoder_keys(tmp / "text_encoder" / "model.safetensors")
    tmp.rename(out)
    C.log(f"saved the tiny pipeline to {out}")
    return out


def legacy_text_encoder_keys(path: Path) -> None:
    """transformers 5 saves ``CLIPTextModel`` weights without the ``text_model.`` prefix that transformers 4.30
    expects (it would silently initialise the whole text encoder at random); write them in the classic layout,
    which both versions load, with the ``position_ids`` buffer 4.30 keeps in its checkpoints."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path))
    fixed = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}
    fixed.setdefault("text_model.embeddings.position_ids", torch.arange(77, dtype=torch.int64)[None])
    save_file(fixed, str(path), metadata={"format": "pt"})


def reference(pipeline: Path, steps: str, pairs: int, maps_out: Path, size: int, guidance: float, seed: int,
              threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of this venv leaks into that one
    py = subprocess.run(["bash", str(Path(__file__).with_name("reference_env.sh"))], check=True,
                        stdout=subprocess.PIPE, text=True, env=env).stdout.strip().splitlines()[-1]
    cmd = [py, str(Path(__file__).with_name("_reference_worker.py")), "--pipeline", str(pipeline), "--steps", steps,
           "--pairs", str(pairs), "--prompt", PROMPT, "--words", ",".join(WORDS), "--size", str(size),
           "--guidance", str(guidance), "--seed", str(seed), "--maps-out", str(maps_out), "--threads", str(threads)]
    C.log("reference: " + " ".join(cmd))
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, cwd=tempfile.gettempdir(),
                         env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def ours(pipeline: Path, steps: str, pairs: int, size: int, guidance: float, seed: int,
         default_only: bool = False) -> tuple[dict, dict]:
    from diffusers import StableDiffusionPipeline

    from daam_core import trace

    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline), safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    matched_opts = dict(locations=["down", "up"], negative=False)
    matched_maps_opts = dict(normalize="none", size=(64, 64), upsample="bicubic", combine="mean", image=0)

    results, maps = {}, {}
    for n in [int(s) for s in steps.split(",")]:
        def call():
            return pipe(PROMPT, height=size, width=size, num_inference_steps=n, guidance_scale=guidance,
                        output_type="latent", generator=torch.Generator().manual_seed(seed)).images

        maps_s = {"default": [], "matched": []}
        maps_cpu = {"default": [], "matched": []}

        def traced(name, opts, map_opts):
            def run():
                clock = C.Clock()
                with trace(pipe, **opts) as tc:
                    call()
                sampled = clock.read()
                maps_clock = C.Clock()
                m = tc.result().word_maps(WORDS, **map_opts)
                wall, cpu = maps_clock.read()
                maps_s[name].append(wall)
                maps_cpu[name].append(cpu)
                if name == "matched":
                    maps[f"steps{n}"] = m.numpy()
                return C.Timed(*sampled)
            return run

        C.log(f"ours: {n} steps")
        runs = {"plain": call, "default": traced("default", {}, {})}
        if not default_only:
            runs["matched"] = traced("matched", matched_opts, matched_maps_opts)
        timing = C.interleaved(runs, pairs)
        entry = {"plain_median_s": timing["plain"]["median_s"], "plain_cpu_median_s": timing["plain"]["cpu_median_s"]}
        for name in list(runs)[1:]:
            m, mc = maps_s[name][-pairs:], maps_cpu[name][-pairs:]
            t = timing[name]
            entry[name] = {"median_s": t["median_s"], "cpu_median_s": t["cpu_median_s"],
                           **C.with_maps_summary(t, timing["plain"], m, mc),
                           "times_s": t["times_s"], "cpu_times_s": t["cpu_times_s"]}
        entry["plain_times_s"] = timing["plain"]["times_s"]
        entry["plain_cpu_times_s"] = timing["plain"]["cpu_times_s"]
        entry["loadavg"] = timing["_loadavg_after_each_rep"]
        results[str(n)] = entry
    return results, maps


def per_step(traced: list[float], plain: list[float], steps: int) -> dict:
    """Spread of the per-pair tracing cost per step, CPU ms: ``(traced_i - plain_i) / steps``."""
    return C.spread([round(1e3 * (t - p) / steps, 3) for t, p in zip(traced, plain)])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="10,20,40")
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in both processes (1: CPU time is "
                    "then close to independent of other load on the machine)")
    ap.add_argument("--default-only", action="store_true", help="time only our default configuration")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from daam_core.engine.metrics import pearson

    pipeline = saved_pipeline(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        maps_file = Path(tmp) / "reference_maps.npz"
        ref = reference(pipeline, args.steps, args.pairs, maps_file, args.size, args.guidance, args.seed, args.threads)
        ref_maps = dict(np.load(maps_file))
    our, our_maps = ours(pipeline, args.steps, args.pairs, args.size, args.guidance, args.seed, args.default_only)

    comparison = {}
    for n in args.steps.split(","):
        r, o = ref["steps"][n], our[n]
        key = f"steps{n}"
        corr = ({w: round(pearson(torch.from_numpy(ref_maps[key][i]), torch.from_numpy(our_maps[key][i])), 6)
                 for i, w in enumerate(WORDS)} if key in our_maps else {})
        steps = int(n)
        entry = {
            "reference_cpu_ratio": r["cpu_ratio_spread"], "reference_wall_ratio": r["ratio_spread"],
            "reference_cpu_ratio_with_maps": r["cpu_ratio_with_maps_spread"],
            "ours_cpu_ratio": o["default"]["cpu_ratio_spread"], "ours_wall_ratio": o["default"]["ratio_spread"],
            "ours_cpu_ratio_with_maps": o["default"]["cpu_ratio_with_maps_spread"],
            # tracing cost per denoising step, CPU ms: (traced - plain) medians / steps
            "reference_cpu_ms_per_step": round(1e3 * (r["daam_cpu_median_s"] - r["plain_cpu_median_s"]) / steps, 2),
            "ours_cpu_ms_per_step": round(1e3 * (o["default"]["cpu_median_s"] - o["plain_cpu_median_s"]) / steps, 2),
            # the same from each pair's own difference (traced - plain of one repetition): median and spread
            "reference_cpu_ms_per_step_pairs": per_step(r["cpu_daam_s"], r["cpu_plain_s"], steps),
            "ours_cpu_ms_per_step_pairs": per_step(o["default"]["cpu_times_s"], o["plain_cpu_times_s"], steps),
            "reference_maps_cpu_s": r["maps_cpu_s_median"], "ours_maps_cpu_s": o["default"]["maps_cpu_s_median"],
            "target_ours_at_most_reference": o["default"]["cpu_ratio_spread"]["median"]
            <= r["cpu_ratio_spread"]["median"],
        }
        ref_ms = entry["reference_cpu_ms_per_step_pairs"]["median"]
        entry["ours_over_reference_per_step"] = round(entry["ours_cpu_ms_per_step_pairs"]["median"] / ref_ms, 3) \
            if ref_ms > 0 else None
        entry["target_half_of_reference_per_step"] = entry["ours_cpu_ms_per_step_pairs"]["q3"] <= 0.5 * \
            entry["reference_cpu_ms_per_step_pairs"]["q1"]  # shown only when the spreads say so, not the medians
        if "matched" in o:
            entry["ours_matched_cpu_ratio"] = o["matched"]["cpu_ratio_spread"]
        if corr:
            entry.update(pearson_per_word=corr, pearson_min=min(corr.values()),
                         target_pearson_0_99=min(corr.values()) >= 0.99)
        comparison[n] = entry
    C.emit({"bench": "compare_reference", "pipeline": str(pipeline), "prompt": PROMPT, "words": WORDS,
            "size": args.size, "pairs": args.pairs, "threads": args.threads, "guidance": args.guidance,
            "comparison": comparison,
            "reference": ref, "ours": our, "machine": C.machine_info()})


if __name__ == "__main__":
    main()
