"""Attribution against ground truth: DAAM maps of the shapes model scored as segmentation (mIoU).

    python bench/attribution.py                                  # the shipped model (daam_core/shapes/assets/shapes)
    python bench/attribution.py --checkpoint RUN/state.safetensors   # a training checkpoint (EMA weights)

Real scenes: a rendered scene is noised to timestep ~250 and denoised by one UNet pass (img2img with one step);
the maps of its caption's words are thresholded and compared with the exact object masks. Generated images:
the pipeline draws the caption; objects are found by colour (daam_core.shapes.scenes.detect_objects), a prompt counts as
drawn right when every named colour is found with the named shape, and maps are scored against the found objects.
Baselines: the whole image and a centred disc. Ablations (real scenes): layer resolution, down/up blocks, token
aggregation (two-token phrases), threshold 0.2-0.6, and the timestep of the pass; on generated images: layers,
threshold and the window of sampling steps recorded. Head/dependent overlap (mIoD, mIoH) of colour-noun
pairs as in the paper. Ends with one JSON line.

    python bench/attribution.py --refine --seeds 1234,1235,1236   # plain DAAM against the refinements
    python bench/attribution.py --refine --dit                    # joint attention: output similarity

``--refine`` (issue 24) traces every image once with self-attention and per-head sums
(:mod:`daam_core.engine.refine`), scores plain DAAM and each refinement (self-attention propagation ``k`` steps at
each resolution or at the finest one, head weighting by concentration, nouns competing for pixels, their
combinations) on the same traces, per seed, and reports the mean and the spread (min-max over seeds) of each
score; the whole-image baseline is scored against the same objects.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daam_core import trace  # noqa: E402
from daam_core.engine import masks as mask_ops  # noqa: E402
from daam_core.engine import metrics, render  # noqa: E402
from daam_core.engine.refine import RefineRecording  # noqa: E402
from daam_core.shapes import model as shapes_model, scenes  # noqa: E402


def load_pipeline(args):
    if args.dit:
        from daam_core.shapes import dit

        return dit.load_shapes_dit_pipeline(args.dit_folder)
    if args.checkpoint:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
        from train_shapes import load_state

        unet, text, vae = shapes_model.build_components()
        ema_u, ema_t, _ = shapes_model.build_components()
        load_state(args.checkpoint, {"unet": unet, "text": text, "vae": vae, "ema_unet": ema_u, "ema_text": ema_t})
        pipe = shapes_model.assemble_pipeline(ema_u.eval(), ema_t.eval(), vae.eval())
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return shapes_model.load_shapes_pipeline(args.model)


def img2img_of(pipe):
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline, StableDiffusionImg2ImgPipeline

    cls = StableDiffusion3Img2ImgPipeline if isinstance(pipe, StableDiffusion3Pipeline) else \
        StableDiffusionImg2ImgPipeline
    p = cls(**pipe.components)
    p.set_progress_bar_config(disable=True)
    return p


def call_options(pipe) -> dict:
    """Extra pipeline arguments: the joint-attention shapes model's T5 length (its zero T5 positions)."""
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline

    if isinstance(pipe, (StableDiffusion3Pipeline, StableDiffusion3Img2ImgPipeline)):
        from daam_core.shapes import dit

        return {"max_sequence_length": dit.T5_TOKENS}
    return {}


def test_scenes(n_one: int, n_two: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    out = [scenes.random_scene(rng, n_objects=1) for _ in range(n_one)]
    held = scenes.held_out_prompts()
    for i in range(n_two):  # the held-out colour/shape pairs, never seen in training
        c1, s1, c2, s2 = held[i % len(held)]
        out.append(scenes.random_scene(rng, n_objects=2, colors=(c1, c2), shapes=(s1, s2)))
    return out


def to_pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(image)


def score(word_map: torch.Tensor, gt: np.ndarray, tau: float) -> float:
    return metrics.iou(mask_ops.threshold(word_map, tau), torch.from_numpy(gt))


def baselines(scene) -> dict:
    h, w = scene.image.shape[:2]
    disc = scenes.shape_mask("circle", (h / 2, w / 2), 0.6 * w, (h, w))
    out = {"whole": [], "disc": []}
    for o in scene.objects:
        out["whole"].append(metrics.iou(torch.ones(h, w), torch.from_numpy(o.mask)))
        out["disc"].append(metrics.iou(torch.from_numpy(disc), torch.from_numpy(o.mask)))
    return out


def real_scene_traces(pipe, items, strength: float, seed: int, refine: RefineRecording | None = None):
    i2i = img2img_of(pipe)
    steps = max(1, round(1 / strength))
    traces = []
    for s in items:
        with trace(i2i, refine=refine) as tc:
            i2i(s.caption, image=to_pil(s.image), strength=1 / steps, num_inference_steps=steps, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(seed), output_type="np", **call_options(i2i))
        traces.append(tc.result())
    return traces


LAYER_GROUPS = {"16x16": {"factors": [2]}, "8x8": {"factors": [4]}, "down": {"locations": ["down"]},
                "up": {"locations": ["up"]}, "mid": {"locations": ["mid"]}}


def empty_scores() -> dict:
    return {k: [] for k in ("noun_1", "color_1", "noun_2", "color_2", "noun_2_wrong", "noun_2_positions",
                            "noun_2_plain")}


def score_objects(res: dict, tr, scene, mask_of, tau: float, **select) -> None:
    """Append the noun and colour IoUs of ``scene``'s objects (ground truth ``mask_of(object)``) to ``res``.

    The nouns of a scene are mapped together and so are its colours: with ``exclusive=True`` in ``select`` the
    nouns compete with each other for pixels, and the colours with each other."""
    n = len(scene.objects)
    nouns = tr.word_maps([o.shape for o in scene.objects], image=0, **select)
    colors = tr.word_maps([o.color for o in scene.objects], image=0, **select)
    for j, o in enumerate(scene.objects):
        res[f"noun_{n}"].append(score(nouns[j], mask_of(o), tau))
        res[f"color_{n}"].append(score(colors[j], mask_of(o), tau))
        if n == 2:
            other = next(x for x in scene.objects if x is not o)
            res["noun_2_wrong"].append(score(nouns[j], mask_of(other), tau))
            res[f"noun_2_{caption_kind(scene)}"].append(res["noun_2"][-1])


def mean_scores(res: dict) -> dict:
    return {k: float(np.mean(v)) for k, v in res.items() if v}


def evaluate_real(traces, items, tau=0.4, **select) -> dict:
    """mIoU of noun and colour maps against their objects, and of noun maps against the other object."""
    res = empty_scores()
    for tr, s in zip(traces, items):
        score_objects(res, tr, s, lambda o: o.mask, tau, **select)
    return mean_scores(res)


def caption_kind(scene) -> str:
    """"positions" when the caption says where each object is ("... on the left"), else "plain"."""
    return "positions" if " on the " in scene.caption else "plain"


def head_dependent(traces, items, tau=0.4) -> dict:
    pairs = []
    for tr, s in zip(traces, items):
        for o in s.objects:
            maps = tr.word_maps([o.shape, o.color], image=0)
            pairs.append((mask_ops.threshold(maps[0], tau), mask_ops.threshold(maps[1], tau)))
    return metrics.head_dependent_overlap(pairs)


def generate(pipe, items, seed: int, steps: int, guidance: float, time_window=(0.0, 1.0),
             refine: RefineRecording | None = None):
    """Draw each caption (traced); per item ``(trace, {colour: (shape, mask)} found, drawn right)``."""
    out = []
    for i, s in enumerate(items):
        with trace(pipe, time_window=time_window, refine=refine) as tc:
            img = pipe(s.caption, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                       generator=torch.Generator().manual_seed(seed + i), **call_options(pipe)).images[0]
        img = render.to_uint8(img)
        found = {c: (shape, m) for c, shape, m in scenes.detect_objects(img)}
        ok = all(o.color in found and found[o.color][0] == o.shape for o in s.objects)
        out.append((tc.result(), found, ok))
    return out


def evaluate_generated(drawn, items, tau=0.4, **select) -> dict:
    """mIoU of the maps of the images drawn right, against the objects found in them by colour."""
    res = empty_scores()
    for (tr, found, ok), s in zip(drawn, items):
        if ok:
            score_objects(res, tr, s, lambda o: found[o.color][1], tau, **select)
    out = mean_scores(res)
    out["correct_fraction"] = sum(ok for _, _, ok in drawn) / len(items)
    return out


def evaluate_phrases(traces, items, tau=0.4, combine="mean") -> dict:
    """mIoU of two-token phrase maps ("red circle"): how the tokens of a phrase are combined."""
    res = {"phrase_1": [], "phrase_2": []}
    for tr, s in zip(traces, items):
        for o in s.objects:
            res[f"phrase_{len(s.objects)}"].append(score(tr.word_maps(o.phrase, image=0, combine=combine)[0],
                                                         o.mask, tau))
    return mean_scores(res)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a shapes pipeline folder (default: the shipped one)")
    ap.add_argument("--checkpoint", type=Path, help="a training state (tools/train_shapes.py) instead")
    ap.add_argument("--scenes", type=int, default=48, help="scenes per object count")
    ap.add_argument("--generated", type=int, default=48, help="prompts per object count for generated images")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--quick", action="store_true", help="no ablations")
    ap.add_argument("--refine", action="store_true", help="compare plain DAAM with the refinements (issue 24)")
    ap.add_argument("--seeds", default="1234,1235,1236", help="with --refine: comma-separated seeds")
    ap.add_argument("--dit", action="store_true", help="with --refine: the joint-attention shapes model "
                    "(daam_core/shapes/dit.py): attention against output similarity")
    ap.add_argument("--dit-folder", help="with --dit: a trained transformer folder's parent (default: the shipped)")
    args = ap.parse_args(argv)
    if args.dit and not args.refine:
        ap.error("--dit compares the maps of the joint-attention model: use it with --refine")
    with torch.no_grad():  # not set_grad_enabled(False): main() is also called inside the test process
        result = run_refine(args) if args.refine else run(args)
    print(json.dumps(result))
    return 0


def run(args) -> dict:
    t0 = time.time()
    pipe = load_pipeline(args)
    items = test_scenes(args.scenes, args.scenes, args.seed)
    traces = real_scene_traces(pipe, items, 0.25, args.seed)
    result = {"bench": "attribution", "real": evaluate_real(traces, items)}
    base = {"whole": [], "disc": []}
    for s in items:
        for k, v in baselines(s).items():
            base[k].extend(v)
    result["baselines"] = {k: float(np.mean(v)) for k, v in base.items()}
    result["head_dependent"] = head_dependent(traces, items)
    gen = test_scenes(args.generated, args.generated, args.seed + 1)
    drawn = generate(pipe, gen, args.seed, args.steps, args.guidance)
    result["generated"] = evaluate_generated(drawn, gen)
    if not args.quick:
        abl = {}
        for name, sel in LAYER_GROUPS.items():
            abl[f"layers:{name}"] = evaluate_real(traces, items, **sel)
        for combine in ("mean", "max", "sum"):
            abl[f"phrase_combine:{combine}"] = evaluate_phrases(traces, items, combine=combine)
        for tau in (0.2, 0.3, 0.5, 0.6):
            abl[f"tau:{tau}"] = evaluate_real(traces, items, tau=tau)
        for strength in (0.1, 0.5, 0.75):
            abl[f"timestep:{round(strength * pipe.scheduler.config.num_train_timesteps)}"] = evaluate_real(
                real_scene_traces(pipe, items, strength, args.seed), items)
        result["ablations"] = abl
        gab = {}
        for name, sel in LAYER_GROUPS.items():
            if name != "mid":  # the lowest on rendered scenes; not repeated on generated images
                gab[f"layers:{name}"] = evaluate_generated(drawn, gen, **sel)
        for tau in (0.2, 0.3, 0.5, 0.6):
            gab[f"tau:{tau}"] = evaluate_generated(drawn, gen, tau=tau)
        for window in ((0.0, 0.5), (0.25, 1.0), (0.5, 1.0), (0.75, 1.0)):
            gab[f"steps:{window[0]}-{window[1]}"] = evaluate_generated(
                generate(pipe, gen, args.seed, args.steps, args.guidance, window), gen)
        result["generated_ablations"] = gab
    result["seconds"] = round(time.time() - t0, 1)
    return result


# -- issue 24: refinements of the word maps, scored against plain DAAM ------------------------------------------
REFINE_VARIANTS = {
    "plain": {},
    "propagate:2": {"propagate": 2},
    "propagate:4": {"propagate": 4},
    "heads:1": {"head_power": 1.0},
    "heads:2": {"head_power": 2.0},
    "heads:4": {"head_power": 4.0},
    "propagate:4+heads:2": {"propagate": 4, "head_power": 2.0},
    "finest:2": {"propagate": 2, "propagate_at": "finest"},
    "finest:2+heads:4": {"propagate": 2, "propagate_at": "finest", "head_power": 4.0},
    "exclusive": {"exclusive": True},
    "heads:4+exclusive": {"head_power": 4.0, "exclusive": True},
    "propagate:4+heads:2+exclusive": {"propagate": 4, "head_power": 2.0, "exclusive": True},
    "finest:1+heads:4+exclusive": {"propagate": 1, "propagate_at": "finest", "head_power": 4.0, "exclusive": True},
    "finest:2+heads:4+exclusive": {"propagate": 2, "propagate_at": "finest", "head_power": 4.0, "exclusive": True},
    "both:1+heads:4": {"propagate": 1, "propagate_at": "both", "head_power": 4.0},
    "both:1+heads:4+exclusive": {"propagate": 1, "propagate_at": "both", "head_power": 4.0, "exclusive": True},
    "both:2+heads:4+exclusive": {"propagate": 2, "propagate_at": "both", "head_power": 4.0, "exclusive": True},
}
DIT_VARIANTS = {  # joint attention: no self-attention or per-head sums; output similarity instead
    "plain": {},
    "exclusive": {"exclusive": True},
    "output": {"source": "output"},
    "output+exclusive": {"source": "output", "exclusive": True},
}
REFINE_KEYS = ("noun_1", "noun_2", "noun_2_wrong", "color_1", "color_2", "whole_1", "whole_2")


def whole_baseline(res: dict, scene, mask_of) -> None:
    """The whole image as every word's mask, scored against the same objects (per object count)."""
    n = len(scene.objects)
    for o in scene.objects:
        gt = torch.from_numpy(np.asarray(mask_of(o)))
        res[f"whole_{n}"].append(metrics.iou(torch.ones_like(gt, dtype=torch.float32), gt))


def refine_scores(pairs, tau: float = 0.4, variants: dict | None = None) -> dict:
    """Per variant the mean scores over ``pairs`` of ``(trace, scene, mask_of)``."""
    out = {}
    for name, opts in (variants or REFINE_VARIANTS).items():
        res = {**empty_scores(), "whole_1": [], "whole_2": []}
        for tr, s, mask_of in pairs:
            score_objects(res, tr, s, mask_of, tau, **opts)
            if name == "plain":
                whole_baseline(res, s, mask_of)
        out[name] = mean_scores(res)
    base = {k: v for k, v in out["plain"].items() if k.startswith("whole_")}
    for name in out:
        out[name].update(base)
    return out


def run_refine(args) -> dict:
    """Every variant of :data:`REFINE_VARIANTS` (:data:`DIT_VARIANTS` with ``--dit``) on rendered and generated
    scenes, per seed; mean and spread."""
    t0 = time.time()
    pipe = load_pipeline(args)
    variants = DIT_VARIANTS if args.dit else REFINE_VARIANTS
    opts = RefineRecording(output_similarity=True) if args.dit else RefineRecording(self_attention=True,
                                                                                     head_sums=True)
    per_seed = {"real": [], "generated": []}
    drawn_right = []
    for seed in (int(x) for x in args.seeds.split(",")):
        items = test_scenes(args.scenes, args.scenes, seed)
        traces = real_scene_traces(pipe, items, 0.25, seed, refine=opts)
        per_seed["real"].append(refine_scores([(tr, s, lambda o: o.mask) for tr, s in zip(traces, items)],
                                              variants=variants))
        gen = test_scenes(args.generated, args.generated, seed + 1)
        drawn = generate(pipe, gen, seed, args.steps, args.guidance, refine=opts)
        pairs = [(tr, s, (lambda f: lambda o: f[o.color][1])(found)) for (tr, found, ok), s in zip(drawn, gen) if ok]
        per_seed["generated"].append(refine_scores(pairs, variants=variants))
        drawn_right.append(sum(ok for _, _, ok in drawn) / len(gen))
    summary = {}
    for kind, seeds in per_seed.items():
        summary[kind] = {}
        for name in variants:
            row = {}
            for key in REFINE_KEYS:
                vals = [s[name][key] for s in seeds if key in s[name]]
                if vals:
                    row[key] = {"mean": float(np.mean(vals)), "min": float(np.min(vals)), "max": float(np.max(vals))}
            summary[kind][name] = row
    return {"bench": "attribution-refine", "model": "shapes DiT" if args.dit else "shapes UNet", "seeds": args.seeds,
            "scenes": args.scenes, "generated": args.generated,
            "drawn_right": drawn_right, "summary": summary, "per_seed": per_seed,
            "seconds": round(time.time() - t0, 1)}


def refine_table(result: dict) -> str:
    """The markdown table of a ``--refine`` result: mean (min-max over seeds)."""
    lines = ["| scenes | variant | " + " | ".join(REFINE_KEYS) + " |", "|---|---|" + "---|" * len(REFINE_KEYS)]
    for kind, rows in result["summary"].items():
        for name, row in rows.items():
            cells = [f"{row[k]['mean']:.3f} ({row[k]['min']:.3f}-{row[k]['max']:.3f})" if k in row else ""
                     for k in REFINE_KEYS]
            lines.append(f"| {kind} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
