"""Run an example workflow on a real ComfyUI server with the pack and copy its outputs to a folder.

Used by tools/demo.sh (which sets up the host first). The server runs on a free 127.0.0.1 port and is
always stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers.checkpoints import cached_sd15_checkpoint  # noqa: E402
from helpers.comfy_server import running_comfyui  # noqa: E402


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
            for filename, subfolder, kind in client.output_images(entry):
                if kind != "output":
                    continue
                target = out / filename
                target.write_bytes(client.view(filename, subfolder, kind))
                written.append(target.name)
    print(json.dumps({"out": str(out.resolve()), "files": sorted(written)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
