"""Write the shapes model's card: README.md, a loss curve and a sample grid, into its pipeline folder.

    python tools/shapes_model_card.py --work RUN_DIR --model daam_core/shapes/assets/shapes [--attribution results.json]

Reads the training log (RUN_DIR/log.jsonl) and the exported folder (training.json); draws held-out prompts
with the folder's pipeline. Images are drawn with OpenCV (no matplotlib).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daam_core.engine import render  # noqa: E402
from daam_core.shapes import model as shapes_model, scenes  # noqa: E402


def loss_curve(records: list[dict], size=(360, 640)) -> np.ndarray:
    import cv2

    pts = [(r["step"], r["loss"]) for r in records if r.get("phase") == "unet"]
    h, w = size
    img = np.full((h, w, 3), 255, np.uint8)
    if len(pts) < 2:
        cv2.putText(img, "fewer than 2 loss records", (50, h // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1)
        return img
    steps, losses = np.array(pts, dtype=np.float64).T
    logl = np.log10(losses)
    lo, hi = logl.min(), logl.max() + 1e-9
    x = 50 + (steps - steps.min()) / max(steps.max() - steps.min(), 1) * (w - 70)
    y = h - 40 - (logl - lo) / (hi - lo) * (h - 70)
    cv2.polylines(img, [np.stack([x, y], 1).astype(np.int32)], False, (200, 60, 30), 2, cv2.LINE_AA)
    cv2.rectangle(img, (50, 30), (w - 20, h - 40), (0, 0, 0), 1)
    for text, org in ((f"loss {10 ** hi:.3f}", (55, 25)), (f"{10 ** lo:.3f}", (55, h - 45)),
                      (f"step {int(steps.min())}", (50, h - 15)), (f"{int(steps.max())}", (w - 80, h - 15))):
        cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return img


@torch.no_grad()
def sample_grid(pipe, prompts: list[str], seed: int, steps: int, guidance: float, scale: int = 4) -> np.ndarray:
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                  generator=torch.Generator().manual_seed(seed)).images
    tiles = [np.kron(im, np.ones((scale, scale, 1))) for im in images]
    return render.grid(tiles, [p.replace("a ", "").replace(" on the", "") for p in prompts])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=shapes_model.ASSET_DIR)
    ap.add_argument("--attribution", type=Path, help="bench/attribution.py output (a JSON line) to quote")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--hardware", help="where it trained (default: the run's logged config, else unknown)")
    ap.add_argument("--batch", type=int, help="batch size (default: the run's logged config)")
    ap.add_argument("--how", default="", help="one more line on how the run went (its phases, say)")
    ap.add_argument("--extra", type=Path, help="markdown appended to the card (the exact commands, say)")
    args = ap.parse_args(argv)
    records = [json.loads(line) for line in (args.work / "log.jsonl").read_text().splitlines() if line.strip()]
    meta = json.loads((args.model / "training.json").read_text())
    pipe = shapes_model.load_shapes_pipeline(args.model)
    held = scenes.held_out_prompts()
    prompts = [f"a {c} {s}" for c, s in (("red", "circle"), ("green", "square"), ("blue", "triangle"),
                                         ("yellow", "square"))]
    prompts += [f"a {a} {b} on the left and a {c} {d} on the right" for a, b, c, d in held]
    render.save_png(args.model / "loss.png", loss_curve(records) / 255.0)  # save_png takes floats in [0, 1]
    render.save_png(args.model / "samples.png", sample_grid(pipe, prompts, args.seed, 20, 4.0))
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    text_params = sum(p.numel() for p in pipe.text_encoder.parameters())
    size = sum(f.stat().st_size for f in args.model.rglob("*") if f.is_file())
    last = [r for r in records if r.get("phase") == "unet"][-1:]
    configs = [r for r in records if r.get("phase") == "config"]
    hardware = args.hardware or (configs[-1]["device"] if configs else "unknown hardware")
    batch = args.batch or (configs[-1]["batch"] if configs else "?")
    quality = ""
    if args.attribution:
        res = json.loads(args.attribution.read_text().strip().splitlines()[-1])
        quality = "\n## Quality (bench/attribution.py)\n\n```json\n" + json.dumps(
            {k: res[k] for k in ("real", "generated", "baselines", "head_dependent") if k in res}, indent=1) + "\n```\n"
    card = f"""# shapes: a small text-to-image model for DAAM

Trained by `tools/train_shapes.py` on synthetic scenes from `daam_core/shapes/scenes.py` (32x32, one or two coloured
circles, squares and triangles on plain backgrounds; captions such as "a red circle on the left and a blue square
on the right"; the two-object colour/shape pairs {held} are held out). A diffusers `StableDiffusionPipeline`
folder: UNet {unet_params / 1e6:.2f}M parameters (channels {list(pipe.unet.config.block_out_channels)},
cross-attention at 16x16 and 8x8), CLIP text encoder {text_params / 1e6:.2f}M parameters (width
{pipe.text_encoder.config.hidden_size}, {pipe.text_encoder.config.num_hidden_layers} layers, real CLIP BPE
vocabulary), identity VAE (pixels are the latents), epsilon prediction. Noise schedule: cosine
(`squaredcos_cap_v2`) over 1000 steps in training; the folder's scheduler keeps its first
{pipe.scheduler.config.num_train_timesteps} steps as `trained_betas` (sigma_max 14.6, as SD1.x), because the last
ones reach sigma 2e4, where Euler and DPM-Solver++ turn tiny epsilon errors into noise.

- training: {meta['step']} steps at batch {batch} on {hardware}, {meta['seconds'] / 60:.1f} minutes, final loss
  {last[0]['loss'] if last else float('nan'):.4f}; AdamW, bf16 autocast, min-SNR-5 weighting, 10% empty captions,
  EMA 0.999. {args.how}
- folder size: {size / 2 ** 20:.1f} MiB (fp16 safetensors)

![loss](loss.png)

![samples](samples.png) (seed {args.seed}, 20 DPM-Solver++ steps, guidance 4)
{quality}"""
    if args.extra:
        card += "\n" + args.extra.read_text()
    (args.model / "README.md").write_text(card)
    print(json.dumps({"card": str(args.model / "README.md"), "bytes": size}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
