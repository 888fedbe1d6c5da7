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

Ratios are against each library's own plain sampling in its own process (interleaved repetitions); the overhead
target compares ``ratio - 1`` with map computation included. Run::

    python bench/compare_reference.py --steps 10,20,40 --pairs 7
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
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
    from daam_core.hosts.diffusers.tiny import find_clip_tokenizer_dir

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


def reference(pipeline: Path, steps: str, pairs: int, maps_out: Path, size: int, guidance: float, seed: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of this venv leaks into that one
    py = subprocess.run(["bash", str(Path(__file__).with_name("reference_env.sh"))], check=True,
                        stdout=subprocess.PIPE, text=True, env=env).stdout.strip().splitlines()[-1]
    cmd = [py, str(Path(__file__).with_name("_reference_worker.py")), "--pipeline", str(pipeline), "--steps", steps,
           "--pairs", str(pairs), "--prompt", PROMPT, "--words", ",".join(WORDS), "--size", str(size),
           "--guidance", str(guidance), "--seed", str(seed), "--maps-out", str(maps_out)]
    C.log("reference: " + " ".join(cmd))
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, cwd=tempfile.gettempdir(),
                         env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def ours(pipeline: Path, steps: str, pairs: int, size: int, guidance: float, seed: int) -> tuple[dict, dict]:
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

        def traced(name, opts, map_opts):
            def run():
                t0 = time.perf_counter()
                with trace(pipe, **opts) as tc:
                    call()
                t1 = time.perf_counter()
                m = tc.result().word_maps(WORDS, **map_opts)
                maps_s[name].append(time.perf_counter() - t1)
                if name == "matched":
                    maps[f"steps{n}"] = m.numpy()
                return C.Timed(t1 - t0)
            return run

        C.log(f"ours: {n} steps")
        timing = C.interleaved({"plain": call, "default": traced("default", {}, {}),
                                "matched": traced("matched", matched_opts, matched_maps_opts)}, pairs)
        entry = {"plain_median_s": timing["plain"]["median_s"]}
        for name in ("default", "matched"):
            m = maps_s[name][-pairs:]
            with_maps = [(t + s) / p for t, s, p in zip(timing[name]["times_s"], m, timing["plain"]["times_s"])]
            entry[name] = {"median_s": timing[name]["median_s"], "maps_s_median": round(statistics.median(m), 4),
                           "ratio_median": timing[name]["ratio_median"],
                           "ratio_with_maps_median": round(statistics.median(with_maps), 4),
                           "ratios": timing[name]["ratios"], "ratios_with_maps": [round(r, 4) for r in with_maps]}
        results[str(n)] = entry
    return results, maps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="10,20,40")
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from daam_core.engine.metrics import pearson

    pipeline = saved_pipeline(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        maps_file = Path(tmp) / "reference_maps.npz"
        ref = reference(pipeline, args.steps, args.pairs, maps_file, args.size, args.guidance, args.seed)
        ref_maps = dict(np.load(maps_file))
    our, our_maps = ours(pipeline, args.steps, args.pairs, args.size, args.guidance, args.seed)

    comparison = {}
    for n in args.steps.split(","):
        r, o = ref["steps"][n], our[n]
        ref_over = r["ratio_with_maps_median"] - 1
        ours_over = o["default"]["ratio_with_maps_median"] - 1
        key = f"steps{n}"
        corr = {w: round(pearson(torch.from_numpy(ref_maps[key][i]), torch.from_numpy(our_maps[key][i])), 6)
                for i, w in enumerate(WORDS)}
        comparison[n] = {
            "reference_ratio": r["ratio_median"], "reference_ratio_with_maps": r["ratio_with_maps_median"],
            "ours_default_ratio": o["default"]["ratio_median"],
            "ours_default_ratio_with_maps": o["default"]["ratio_with_maps_median"],
            "ours_matched_ratio": o["matched"]["ratio_median"],
            "ours_matched_ratio_with_maps": o["matched"]["ratio_with_maps_median"],
            "overhead_fraction_of_reference": round(ours_over / ref_over, 3) if ref_over > 0 else None,
            "target_at_most_half": bool(ref_over > 0 and ours_over <= ref_over / 2),
            "pearson_per_word": corr, "pearson_min": min(corr.values()),
            "target_pearson_0_99": min(corr.values()) >= 0.99,
        }
    C.emit({"bench": "compare_reference", "pipeline": str(pipeline), "prompt": PROMPT, "words": WORDS,
            "size": args.size, "pairs": args.pairs, "guidance": args.guidance, "comparison": comparison,
            "reference": ref, "ours": our, "machine": C.machine_info()})


if __name__ == "__main__":
    main()
