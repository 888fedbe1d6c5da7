"""The shapes training script end to end at toy scale: train, resume, export, load, trace."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import train_shapes  # noqa: E402

from daam_core import trace  # noqa: E402
from daam_core.shapes import model as shapes_model  # noqa: E402


def test_train_resume_export_and_trace(tmp_path):
    work, out = tmp_path / "run", tmp_path / "model"
    common = ["--work", str(work), "--batch", "4", "--vae-steps", "2", "--save-every", "2", "--threads", "1"]
    assert train_shapes.main(common + ["--steps", "2"]) == 0
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log][:3] == ["config", "vae", "vae"]
    assert log[0]["batch"] == 4 and log[0]["device"].startswith("CPU")
    assert train_shapes.main(common + ["--steps", "3"]) == 0  # resumes at step 2, one more step
    last = json.loads((work / "log.jsonl").read_text().splitlines()[-1])
    assert last["phase"] == "config" and last["step"] == 2  # the resumed run; no 50-step line yet
    from safetensors.torch import load_file

    state = load_file(str(work / "state.safetensors"))
    assert float(state["opt.0.step"]) == 3  # the optimizer's moments carried over the resume (fresh ones: 1)
    assert all(k.split(".")[0] in {"unet", "text", "vae", "ema_unet", "ema_text", "opt"} for k in state)
    assert train_shapes.main(common + ["--export", str(out)]) == 0
    meta = json.loads((out / "training.json").read_text())
    assert meta["step"] == 3 and meta["vae_done"]
    assert all((out / sub / "config.json").is_file() for sub in ("unet", "text_encoder", "vae"))
    assert (out / "tokenizer" / "vocab.json").is_file()
    pipe = shapes_model.load_shapes_pipeline(out)
    with trace(pipe) as tc:
        image = pipe("a red circle", num_inference_steps=2, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3)
    assert tc.result().word_maps("circle", image=0).shape == (1, 32, 32)

    import shapes_model_card

    assert shapes_model_card.main(["--work", str(work), "--model", str(out), "--hardware", "a test CPU"]) == 0
    card = (out / "README.md").read_text()
    assert "3 steps at batch 4 on a test CPU" in card and "trained_betas" in card
    from PIL import Image

    samples = np.asarray(Image.open(out / "samples.png").convert("RGB"))
    assert samples.std() > 1  # drawn, not blank
    loss_png = np.asarray(Image.open(out / "loss.png").convert("RGB")).astype(int)
    assert (loss_png < 128).any() and (loss_png > 250).mean() > 0.9  # a white page with a frame and text
    records = [{"phase": "unet", "step": 50 * i, "loss": 0.1 / i} for i in range(1, 40)]
    with open(work / "log.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    assert shapes_model_card.main(["--work", str(work), "--model", str(out)]) == 0
    loss_png = np.asarray(Image.open(out / "loss.png").convert("RGB")).astype(int)
    assert (np.abs(loss_png - (200, 60, 30)).sum(-1) < 30).sum() > 500  # the curve, in its colour, in the file
    curve = shapes_model_card.loss_curve(records)
    line = (np.abs(curve.astype(int) - (200, 60, 30)).sum(-1) < 30).nonzero()
    assert line[1].min() <= 60 and line[1].max() >= 600  # spans the plot from the first step to the last
    assert line[0][line[1].argmin()] < line[0][line[1].argmax()]  # falling loss: the curve goes down
