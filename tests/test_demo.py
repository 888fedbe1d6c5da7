"""The first command of the README: the no-checkpoint demo on a real ComfyUI server, its files named by word."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.images import assert_real_image

pytestmark = [pytest.mark.e2e, pytest.mark.host]
REPO = Path(__file__).resolve().parents[1]
WORDS = ("circle", "square", "red", "blue")  # the shapes workflow's DAAM Heatmaps words


def test_demo_writes_the_image_and_per_word_files(comfyui_dir, tmp_path):
    from PIL import Image

    out = tmp_path / "daam_out"
    run = subprocess.run([sys.executable, str(REPO / "tools" / "run_workflow.py"), "--out", str(out)],
                         env=dict(os.environ, COMFYUI_DIR=str(comfyui_dir)), capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads(run.stdout[run.stdout.index("{"):])
    files = set(report["files"])
    expected = {f"{kind}_{w}_00001.png" for kind in ("heatmap", "overlay", "mask") for w in WORDS}
    expected.add("daam-mask_circle_00001.png")  # the DAAM Mask node's output
    assert expected <= files, sorted(files)
    assert {f for f in files if f.startswith("shapes_image")}, sorted(files)  # the generated image keeps its name

    def load(name):
        return np.asarray(Image.open(out / name).convert("RGB"))

    image = load(next(f for f in files if f.startswith("shapes_image")))
    assert_real_image(image, "the demo's generated image")
    for w in WORDS:
        assert_real_image(load(f"heatmap_{w}_00001.png"), f"heat map of {w!r}")
        mask = load(f"mask_{w}_00001.png")[..., 0]
        assert set(np.unique(mask).tolist()) <= {0, 255}, f"mask of {w!r} is not binary"
        assert 0 < (mask > 127).mean() < 1, f"mask of {w!r} is empty or full"
    assert np.array_equal(load("daam-mask_circle_00001.png"), load("mask_circle_00001.png")), \
        "DAAM Mask of 'circle' at the Heatmaps' threshold differs from the Heatmaps mask of 'circle'"
