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
from daam_core.shapes import model as shapes_model, scenes  # noqa: E402


def load_pipeline(args):
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
    from diffusers import StableDiffusionImg2ImgPipeline

    p = StableDiffusionImg2ImgPipeline(**pipe.components)
    p.set_progress_bar_config(disable=True)
    return p


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


def real_scene_traces(pipe, items, strength: float, seed: int):
    i2i = img2img_of(pipe)
    steps = max(1, round(1 / strength))
    traces = []
    for s in items:
        with trace(i2i) as tc:
            i2i(s.caption, image=to_pil(s.image), strength=1 / steps, num_inference_steps=steps, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(seed), output_type="np")
        traces.append(tc.result())
    return traces


LAYER_GROUPS = {"16x16": {"factors": [2]}, "8x8": {"factors": [4]}, "down": {"locations": ["down"]},
                "up": {"locations": ["up"]}, "mid": {"locations": ["mid"]}}


def empty_scores() -> dict:
    return {k: [] for k in ("noun_1", "color_1", "noun_2", "color_2", "noun_2_wrong", "noun_2_positions",
                            "noun_2_plain")}


def score_objects(res: dict, tr, scene, mask_of, tau: float, **select) -> None:
    """Append the noun and colour IoUs of ``scene``'s objects (ground truth ``mask_of(object)``) to ``res``."""
    n = len(scene.objects)
    for o in scene.objects:
        maps = tr.word_maps([o.shape, o.color], image=0, **select)
        res[f"noun_{n}"].append(score(maps[0], mask_of(o), tau))
        res[f"color_{n}"].append(score(maps[1], mask_of(o), tau))
        if n == 2:
            other = next(x for x in scene.objects if x is not o)
            res["noun_2_wrong"].append(score(maps[0], mask_of(other), tau))
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


def generate(pipe, items, seed: int, steps: int, guidance: float, time_window=(0.0, 1.0)):
    """Draw each caption (traced); per item ``(trace, {colour: (shape, mask)} found, drawn right)``."""
    out = []
    for i, s in enumerate(items):
        with trace(pipe, time_window=time_window) as tc:
            img = pipe(s.caption, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                       generator=torch.Generator().manual_seed(seed + i)).images[0]
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
    args = ap.parse_args(argv)
    with torch.no_grad():  # not set_grad_enabled(False): main() is also called inside the test process
        result = run(args)
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


if __name__ == "__main__":
    raise SystemExit(main())
