"""Run an example workflow on a real ComfyUI server with the pack and copy its outputs to a folder.

Used by tools/demo.sh (which sets up the host first). The server runs on a free 127.0.0.1 port and is
always stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers.checkpoints import cached_sd15_checkpoint  # noqa: E402
from helpers.comfy_server import running_comfyui  # noqa: E402

from daam_core.text.query import split_words  # noqa: E402


# What each output of DAAM Heatmaps is, by output index; nodes that pass an image through unchanged in meaning.
HEATMAPS_OUTPUTS = {0: "heatmap", 1: "overlay", 2: "mask"}
PASS_THROUGH = {"ImageScaleBy", "ImageScale", "MaskToImage", "ImageToMask", "GrowMask", "FeatherMask"}


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "-", text).strip("-").lower() or "word"


def output_names(wf: dict, node_id: str, count: int) -> list[str] | None:
    """File names that say what a SaveImage's images show (``heatmap_circle_00001.png``), or None to keep the
    host's names. DAAM Heatmaps batches are image-major: every word of image 1, then of image 2."""
    node = wf.get(node_id, {})
    link = node.get("inputs", {}).get("images")
    if node.get("class_type") != "SaveImage" or not isinstance(link, list):
        return None
    src_id, index = str(link[0]), link[1]
    while wf[src_id]["class_type"] in PASS_THROUGH:
        first = next(v for v in wf[src_id]["inputs"].values() if isinstance(v, list))
        src_id, index = str(first[0]), first[1]
    src = wf[src_id]
    words, negative = src["inputs"].get("words"), src["inputs"].get("negative_words", "")
    if not isinstance(words, str) or not isinstance(negative, str):
        return None
    if src["class_type"] == "DAAMHeatmaps" and index in HEATMAPS_OUTPUTS:
        labels = [_slug(w) for w in split_words(words)] + ["neg-" + _slug(w) for w in split_words(negative)]
        labels = [f"{HEATMAPS_OUTPUTS[index]}_{w}" for w in labels]
    elif src["class_type"] == "DAAMMask":
        labels = ["daam-mask_" + "+".join(_slug(w) for w in split_words(words))]
    else:
        return None
    if count % len(labels):
        return None  # not the batch layout this naming assumes: keep the host's names
    return [f"{labels[i % len(labels)]}_{i // len(labels) + 1:05d}.png" for i in range(count)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", help="an SD1.x / SD2.x / SDXL .safetensors checkpoint for the workflows that load one "
                   "(default: a random-weight SD1.5-shaped one written now)")
    p.add_argument("--workflow", help="name of a workflow in example_workflows/api (default: shapes_heatmaps, which "
                   "runs the shipped shapes model; txt2img_heatmaps when --checkpoint is given)")
    p.add_argument("--out", default="daam_out", help="folder for the outputs")
    p.add_argument("--prompt", help="replace the positive prompt")
    p.add_argument("--words", help="replace the words to map (comma separated)")
    p.add_argument("--steps", type=int, help="replace the sampler steps")
    p.add_argument("--size", type=int, help="replace the image width and height")
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args(argv)

    name = Path(args.workflow or ("txt2img_heatmaps" if args.checkpoint else "shapes_heatmaps")).name
    wf_path = REPO / "example_workflows" / "api" / f"{name}.json"
    if not wf_path.is_file():
        p.error(f"no workflow {wf_path.name} in example_workflows/api")
    text = wf_path.read_text()
    ckpt = None
    if "CHANGE_ME.safetensors" in text:
        if not args.checkpoint:  # random weights: the plumbing is the point, so keep the CPU run short
            args.size = args.size or 256
            args.steps = args.steps or 8
        ckpt = Path(args.checkpoint) if args.checkpoint else cached_sd15_checkpoint(seed=0)
        if not ckpt.is_file() or ckpt.suffix != ".safetensors":
            p.error(f"--checkpoint must be an existing .safetensors file, got {ckpt}")
        text = text.replace("CHANGE_ME.safetensors", ckpt.name)
    elif args.checkpoint:
        p.error(f"{wf_path.name} loads no checkpoint; name a workflow that does (txt2img_heatmaps, ...)")
    wf = json.loads(text)
    positive_text = {n["inputs"]["positive"][0] for n in wf.values()
                     if n["class_type"] == "DAAMHeatmaps" and isinstance(n["inputs"]["positive"], list)}
    for node_id, node in wf.items():
        inputs, kind = node["inputs"], node["class_type"]
        if args.prompt and node_id in positive_text:
            inputs["value"] = args.prompt
        if args.words and kind == "DAAMHeatmaps":
            inputs["words"] = args.words
        if args.steps and kind == "KSampler":
            inputs["steps"] = args.steps
        if args.size and kind == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = args.size

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="daam-demo-") as work:
        ckpts = Path(work) / "checkpoints"
        ckpts.mkdir()
        if ckpt is not None:
            os.symlink(ckpt.resolve(), ckpts / ckpt.name)
        with running_comfyui(os.environ["COMFYUI_DIR"], sys.executable, work_dir=work, checkpoints_dir=ckpts) as client:
            print(f"ComfyUI {client.system_stats()['system']['comfyui_version']} on {client.base_url}; "
                  f"running {wf_path.name} with {ckpt.name if ckpt else 'the shapes model'}", flush=True)
            entry = client.wait(client.queue(wf), timeout=args.timeout)
            if entry["error"]:
                print(entry["error"], file=sys.stderr)
                return 1
            written = []
            for node_id, node_out in entry.get("outputs", {}).items():
                images = [i for i in node_out.get("images", []) if i.get("type", "output") == "output"]
                names = output_names(wf, node_id, len(images))
                for img, name in zip(images, names or [None] * len(images)):
                    target = out / (name or img["filename"])
                    target.write_bytes(client.view(img["filename"], img.get("subfolder", ""), "output"))
                    written.append(target.name)
    print(json.dumps({"out": str(out.resolve()), "files": sorted(written)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
