"""``daam``: generate with a traced diffusers pipeline, or analyse a saved trace.

    daam demo --out daam_out
    daam generate --model PATH --prompt "a cat and a dog" --words cat,dog --out daam_out
    daam analyze daam_out/trace.safetensors --words dog --threshold 0.3 --iou cat,dog --out analysis

Nothing reaches for a model hub: models are local diffusers folders or single-file safetensors
checkpoints with a local config folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from ..engine import masks as mask_ops
from ..engine import metrics, render
from ..engine.aggregate import COMBINE_MODES, NORMALIZE_MODES
from ..engine.io import TraceFormatError
from ..engine.masks import THRESHOLD_MODES
from ..engine.outputs import WordsError, check_words, write_outputs
from ..engine.refine import DEFAULT_MAX_QUERIES, RefineRecording
from ..engine.trace import load_trace
from ..text.query import WordNotFoundError, split_words
from . import study


class CliError(Exception):
    """An error the user can fix; printed without a traceback."""


def load_pipeline(model: str, config: str | None, family: str | None, device: str, dtype: torch.dtype):
    import diffusers

    path = Path(model)
    if not path.exists():
        raise CliError(f"model not found: {path} (give a local diffusers pipeline folder or a .safetensors file)")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CliError(f"{path} is a folder without model_index.json: not a diffusers pipeline folder")
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype,
                                                           use_safetensors=True)
    else:
        if path.suffix != ".safetensors":
            raise CliError(f"{path.name}: only .safetensors checkpoints are loaded (pickled .ckpt/.pt/.bin files are "
                           "refused because loading them can run code)")
        if not config:
            raise CliError("a single-file checkpoint needs --config DIR: a local diffusers pipeline folder whose "
                           "configs describe the model (nothing is downloaded)")
        cls_name = family_class(family, Path(config))
        cls = getattr(diffusers, cls_name)
        pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True, torch_dtype=dtype)
    if not hasattr(pipe, "unet") or not hasattr(pipe, "encode_prompt"):
        raise CliError(f"{type(pipe).__name__} is not supported: use a Stable Diffusion 1.x/2.x or SDXL pipeline")
    return pipe.to(device)


def family_class(family: str | None, config: Path) -> str:
    names = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
    if family:
        return names[family]
    index = config / "model_index.json"
    if not index.is_file():
        raise CliError(f"--config {config} has no model_index.json; pass --family sd1, sd2 or sdxl")
    return json.loads(index.read_text())["_class_name"]


def generate(pipe, args, out: Path) -> dict:
    from ..hosts.diffusers.tracing import trace

    words = split_words(args.words)
    if not args.prompt.strip():
        raise CliError("the prompt is empty: DAAM maps words of the prompt, so give one with --prompt")
    pipe.set_progress_bar_config(disable=False, desc="sampling")
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    t0 = time.perf_counter()
    refine = RefineRecording(self_attention=args.propagate > 0, max_queries=args.self_attention_max,
                             head_sums=args.head_power != 0)
    with trace(pipe, refine=refine) as tc:
        call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gen,
                    height=args.height, width=args.width, num_images_per_prompt=args.num_images, output_type="np")
        if args.syntax == "plain":
            tok = pipe.tokenizer
            n_tokens = len(tok(args.prompt, add_special_tokens=False).input_ids)
            if n_tokens > tok.model_max_length - 2:  # diffusers would truncate: encode in chunks instead
                call.update(tc.encode_prompt(args.prompt, args.negative, syntax="plain"))
            else:
                call.update(prompt=args.prompt, negative_prompt=args.negative)
        else:
            call.update(tc.encode_prompt(args.prompt, args.negative, syntax=args.syntax))
        images = pipe(**call).images
    elapsed = time.perf_counter() - t0
    result = tc.result()
    result.meta.update(prompt=args.prompt, negative_prompt=args.negative, seed=args.seed, steps=args.steps,
                       guidance=args.guidance, syntax=args.syntax, model=str(getattr(args, "model", "demo")))
    if not words:
        words = [w.text for w in result.layout(0).words][:6]
    refined = refinements(args)
    summary = write_outputs(result, words, out, images, threshold=args.threshold, mode=args.mode, cmap=args.cmap,
                            alpha=args.alpha, **refined)
    if args.negative and args.negative_words:
        write_outputs(result, split_words(args.negative_words), out, images, branch="uncond",
                      threshold=args.threshold, mode=args.mode, cmap=args.cmap, alpha=args.alpha, save_trace=False,
                      **refined)
    summary["seconds"] = round(elapsed, 3)
    return summary


def cmd_generate(args) -> dict:
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe = load_pipeline(args.model, args.config, args.family, args.device, dtype)
    return generate(pipe, args, Path(args.out))


DEMO_DEFAULTS = {  # prompt, words, steps, size, guidance
    "shapes": ("a red circle on the left and a blue square on the right", "circle,square,red,blue", 20, 32, 4.0),
    "tiny": ("a red car and a dog on the grass", "car,dog,red", 10, 256, 7.5),
}


def cmd_demo(args) -> dict:
    """The shapes model when one is given or shipped, else a random-weight tiny pipeline."""
    from .demo_pipeline import tiny_sd_pipeline
    from ..shapes import model as shapes_model

    folder = Path(args.model) if args.model else (shapes_model.ASSET_DIR if shapes_model.available() else None)
    if folder is not None:
        if not shapes_model.available(folder):
            raise CliError(f"{folder} is not a shapes pipeline folder (model_index.json and unet/ expected)")
        pipe, kind = shapes_model.load_shapes_pipeline(folder), "shapes"
    else:
        pipe, kind = tiny_sd_pipeline(seed=args.seed, vae_levels=4), "tiny"
    prompt, words, steps, size, guidance = DEMO_DEFAULTS[kind]
    if not args.prompt:  # the model's own prompt and its words
        args.prompt, args.words = prompt, args.words or words
    args.steps = args.steps or steps
    args.width, args.height = args.width or size, args.height or size
    args.guidance = args.guidance or guidance
    args.model = str(folder) if folder else "tiny random-weight pipeline"
    summary = generate(pipe, args, Path(args.out))
    summary["model"] = args.model
    return summary


def cmd_analyze(args) -> dict:
    try:
        trace = load_trace(args.trace)
    except (TraceFormatError, FileNotFoundError) as e:
        raise CliError(str(e)) from None
    if args.propagate and not trace.self_sums:
        raise CliError("--propagate needs a trace with self-attention sums: generate it with --propagate")
    if args.head_power and not trace.head_sums:
        raise CliError("--head-power needs a trace with per-head sums: generate it with --head-power")
    if args.source == "output" and not trace.output_sums:
        raise CliError("--source output needs a trace with output-similarity sums (a joint-attention model traced "
                       "with them: ComfyUI's record_output_similarity, or trace(pipe, refine=RefineRecording("
                       "output_similarity=True)))")
    out = Path(args.out)
    branch = "uncond" if args.negative else "cond"
    words = split_words(args.words)
    images = None
    if args.image:
        import cv2

        paths = [Path(p) for p in args.image]
        pics = []
        for p in paths:
            bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if bgr is None:
                raise CliError(f"cannot read image {p}")
            pics.append(render.as_float_image(bgr[..., ::-1]))
        if len(pics) != trace.num_images:
            raise CliError(f"{len(pics)} images given for a trace of {trace.num_images}")
        images = pics
    summary = write_outputs(trace, words, out, images, branch=branch, threshold=args.threshold, mode=args.mode,
                            combine=args.combine, normalize=args.normalize, cmap=args.cmap, alpha=args.alpha,
                            save_trace=False, source=args.source, **refinements(args))
    if args.iou:
        pair = split_words(args.iou)
        if len(pair) != 2:
            raise CliError("--iou takes two words separated by a comma, e.g. --iou cat,dog")
        check_words(trace, pair, branch)
        maps = trace.word_maps(pair, branch=branch, combine=args.combine, normalize=args.normalize,
                               source=args.source, **refinements(args))
        m = mask_ops.threshold(maps, args.threshold, args.mode)
        summary["iou"] = {f"{pair[0]}|{pair[1]}": [metrics.iou(m[b, 0], m[b, 1]) for b in range(m.shape[0])]}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def refinements(args) -> dict:
    """The ``word_maps`` refinements the command line asks for."""
    return dict(propagate=args.propagate, propagate_at=args.propagate_at, head_power=args.head_power,
                exclusive=args.exclusive)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="daam_out", help="output folder (created; files are only written there)")
    p.add_argument("--threshold", type=float, default=0.4, help="mask threshold (relative: fraction of the max)")
    p.add_argument("--mode", choices=THRESHOLD_MODES, default="relative", help="threshold mode")
    p.add_argument("--cmap", choices=render.COLORMAPS, default="jet", help="colour map of heat maps")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    p.add_argument("--propagate", type=int, default=0, help="self-attention propagation steps k (map <- A^k map; "
                   "0 = plain DAAM); generate/demo then record self-attention sums (see docs/benchmarks.md)")
    p.add_argument("--propagate-at", choices=("each", "finest", "both"), default="each",
                   help="with --propagate: each layer resolution with its own self-attention, all layers summed "
                   "at the finest recorded resolution and propagated there, or both (the first, then the second)")
    p.add_argument("--head-power", type=float, default=0.0, help="weight each attention head by its map's "
                   "concentration to this power (0 = plain DAAM); generate/demo then record per-head sums")
    p.add_argument("--exclusive", action="store_true", help="the words compete for pixels: each keeps only the "
                   "pixels where it attends most, relative to its own average (masks never overlap)")


def _sampling(p: argparse.ArgumentParser, prompt_default: str | None, words_default: str | None) -> None:
    p.add_argument("--prompt", default=prompt_default, required=prompt_default is None,
                   help="the prompt" + (" (default: one made for the model)" if prompt_default == "" else ""))
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--words", default=words_default, help="words or phrases to map, comma separated (dog#2 = "
                   "second 'dog'); default: the first words of the prompt")
    p.add_argument("--negative-words", default="", help="words of the negative prompt to map")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--self-attention-max", type=int, default=DEFAULT_MAX_QUERIES,
                   help="with --propagate: the largest layer resolution (h*w queries) whose self-attention is kept "
                   "(memory 4*N^2 bytes per image and CFG branch)")
    p.add_argument("--syntax", choices=("plain", "comfy", "a1111"), default="plain",
                   help="prompt syntax: plain (as diffusers), comfy ((word:1.2)) or a1111 (also [word], BREAK)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="daam", description="Per-word cross-attention heat maps (DAAM).")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate images with a local pipeline and write maps, overlays and masks")
    g.add_argument("--model", required=True, help="diffusers pipeline folder or single-file .safetensors checkpoint")
    g.add_argument("--config", help="for a single file: a local diffusers pipeline folder with the configs")
    g.add_argument("--family", choices=("sd1", "sd2", "sdxl"), help="model family of a single-file checkpoint")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    _sampling(g, None, None)
    _common(g)
    d = sub.add_parser("demo", help="run the main job on the embedded default model")
    d.add_argument("--model", help="a shapes pipeline folder (default: the shipped shapes model if present, else a "
                   "random-weight tiny pipeline)")
    _sampling(d, "", None)
    d.set_defaults(steps=None, width=None, height=None, guidance=None)
    _common(d)
    a = sub.add_parser("analyze", help="maps, masks and overlap from a saved trace")
    a.add_argument("trace", help="trace .safetensors written by generate")
    a.add_argument("--words", required=True, help="words or phrases, comma separated")
    a.add_argument("--negative", action="store_true", help="read the negative prompt's maps")
    a.add_argument("--image", nargs="*", help="the generated image(s), for overlays")
    a.add_argument("--iou", help="two words whose mask IoU to report, e.g. cat,dog")
    a.add_argument("--combine", choices=COMBINE_MODES, default="mean", help="how a word's tokens are combined")
    a.add_argument("--normalize", choices=NORMALIZE_MODES, default="minmax", help="map normalisation")
    a.add_argument("--source", choices=("attention", "output"), default="attention",
                   help="attention: DAAM's maps; output: joint-attention models' output-similarity maps "
                   "(ConceptAttention-style; the trace must hold them)")
    _common(a)
    study.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in study.COMMANDS:
        return study.run_command(args)
    handlers = {"generate": cmd_generate, "demo": cmd_demo, "analyze": cmd_analyze}
    try:
        summary = handlers[args.command](args)
    except (CliError, WordsError, WordNotFoundError) as e:
        print(f"daam: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(Path(args.out).resolve()), **{k: v for k, v in summary.items() if k != "images"}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
