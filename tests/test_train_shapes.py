"""The shapes training script end to end at toy scale: train, resume, export, load, trace."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import train_shapes  # noqa: E402

from daam_core import shapes_model, trace  # noqa: E402


def test_train_resume_export_and_trace(tmp_path):
    work, out = tmp_path / "run", tmp_path / "model"
    common = ["--work", str(work), "--batch", "4", "--vae-steps", "2", "--save-every", "2", "--threads", "1"]
    assert train_shapes.main(common + ["--steps", "2"]) == 0
    log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log][:2] == ["vae", "vae"]
    assert train_shapes.main(common + ["--steps", "3"]) == 0  # resumes at step 2, one more step
    assert json.loads((work / "log.jsonl").read_text().splitlines()[-1])["phase"] == "vae"  # no 50-step line yet
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
