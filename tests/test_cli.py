"""The `daam` command line: outputs written, and clear errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from daam_core import AttentionTrace, cli
from daam_core.shapes import model as shapes_model
from helpers.tiny_pipelines import tiny_sd_pipeline


def run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def read_gray(path):
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert img is not None, path
    return img


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline(seed=0, vae_levels=2).save_pretrained(str(folder), safe_serialization=True)
    return folder


def test_demo_writes_images_maps_overlays_masks_and_trace(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shapes_model, "ASSET_DIR", tmp_path / "no-shapes-model")  # the random tiny pipeline
    out = tmp_path / "out"
    rc, stdout, _ = run(["demo", "--out", out, "--steps", 2, "--width", 64, "--height", 64], capsys)
    assert rc == 0
    summary = json.loads(stdout)
    assert summary["words"] == ["car", "dog", "red"] and "tiny" in summary["model"]
    for name in ("image-0.png", "heat-0-car.png", "overlay-0-dog.png", "grid-0.png", "trace.safetensors",
                 "trace.json", "summary.json"):
        assert (out / name).is_file(), name
    car, dog = read_gray(out / "mask-0-car.png"), read_gray(out / "mask-0-dog.png")
    assert car.shape == (64, 64) and 0 < (car > 127).mean() < 1 and not np.array_equal(car, dog)


def test_demo_uses_a_shapes_folder(tmp_path, capsys):
    unet, text, vae = shapes_model.build_components(seed=1)
    folder = tmp_path / "shapes"
    shapes_model.save_pipeline(shapes_model.assemble_pipeline(unet, text, vae), folder, dtype=torch.float32)
    rc, stdout, _ = run(["demo", "--model", folder, "--out", tmp_path / "o", "--steps", 2], capsys)
    assert rc == 0 and json.loads(stdout)["words"] == ["circle", "square", "red", "blue"]
    assert read_gray(tmp_path / "o" / "mask-0-circle.png").shape == (32, 32)


@pytest.mark.skipif(not shapes_model.available(), reason="no shapes model shipped")
def test_demo_default_is_the_shipped_shapes_model(tmp_path, capsys):
    """Named no model, the demo draws with the shipped one and the mask of "circle" is the red circle."""
    from daam_core.engine import metrics
    from daam_core.shapes import scenes

    rc, stdout, err = run(["demo", "--out", tmp_path], capsys)
    assert rc == 0, err
    assert Path(json.loads(stdout)["model"]) == shapes_model.ASSET_DIR
    from PIL import Image

    image = np.asarray(Image.open(tmp_path / "image-0.png").convert("RGB"))
    found = {c: (s, m) for c, s, m in scenes.detect_objects(image)}
    assert found["red"][0] == "circle" and found["blue"][0] == "square"
    circle = torch.from_numpy(read_gray(tmp_path / "mask-0-circle.png") > 127)
    assert metrics.iou(circle, torch.from_numpy(found["red"][1])) >= 0.5
    assert metrics.iou(circle, torch.from_numpy(found["blue"][1])) <= 0.1
    assert min(read_gray(tmp_path / "grid-0.png").shape) >= 128  # small images enlarged in the grid


def test_generate_from_a_pipeline_folder_and_analyze(sd_folder, tmp_path, capsys):
    out = tmp_path / "gen"
    rc, _, err = run(["generate", "--model", sd_folder, "--prompt", "a cat and a dog on a sofa", "--words", "cat,dog",
                      "--negative", "blurry", "--negative-words", "blurry", "--steps", 2, "--width", 32,
                      "--height", 48, "--out", out], capsys)
    assert rc == 0, err
    assert read_gray(out / "mask-0-dog.png").shape == (48, 32) and (out / "neg-heat-0-blurry.png").is_file()
    rc, stdout, err = run(["analyze", out / "trace.safetensors", "--words", "sofa", "--iou", "cat,dog",
                           "--image", out / "image-0.png", "--threshold", 0.3, "--out", tmp_path / "an"], capsys)
    assert rc == 0, err
    iou = json.loads((tmp_path / "an" / "summary.json").read_text())["iou"]["cat|dog"][0]
    maps = AttentionTrace.load(out / "trace.safetensors").word_maps(["cat", "dog"], image=0).numpy()
    cat, dog = maps[0] >= 0.3 * maps[0].max(), maps[1] >= 0.3 * maps[1].max()  # relative threshold, by hand
    assert iou == pytest.approx((cat & dog).sum() / (cat | dog).sum())
    assert (tmp_path / "an" / "overlay-0-sofa.png").is_file()


def test_clear_errors(sd_folder, tmp_path, capsys):
    rc, _, err = run(["generate", "--model", sd_folder, "--prompt", "a cat and a dog", "--words", "zebra",
                      "--steps", 1, "--width", 32, "--height", 32, "--out", tmp_path / "x"], capsys)
    assert rc == 2 and "zebra" in err and "cat" in err and "dog" in err  # names the word, lists the prompt's
    rc, _, err = run(["generate", "--model", tmp_path / "missing", "--prompt", "a cat", "--out", tmp_path], capsys)
    assert rc == 2 and "model not found" in err
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04not really a pickle")
    rc, _, err = run(["generate", "--model", pickle, "--prompt", "a cat", "--out", tmp_path], capsys)
    assert rc == 2 and "only .safetensors" in err
    rc, _, err = run(["analyze", pickle, "--words", "cat", "--out", tmp_path / "y"], capsys)
    assert rc == 2 and "safetensors" in err
    rc, _, err = run(["generate", "--model", sd_folder, "--prompt", "  ", "--out", tmp_path / "z"], capsys)
    assert rc == 2 and "prompt is empty" in err


@pytest.mark.skipif(not shapes_model.available(), reason="no shapes model shipped")
def test_refined_maps_from_demo_and_analyze(tmp_path, capsys):
    """--propagate / --head-power record their sums while drawing, the image is the plain demo's, and analyze
    gives the same refined masks from the saved trace; a plain trace refuses them with a clear error."""
    plain, refined = tmp_path / "plain", tmp_path / "refined"
    assert run(["demo", "--out", plain, "--steps", 4], capsys)[0] == 0
    rc, stdout, err = run(["demo", "--out", refined, "--steps", 4, "--propagate", 2, "--head-power", 1], capsys)
    assert rc == 0, err
    assert np.array_equal(read_gray(plain / "image-0.png"), read_gray(refined / "image-0.png"))
    trace = AttentionTrace.load(refined / "trace.safetensors")
    assert set(trace.self_sums) == {"16x16", "8x8"} and set(trace.head_sums) == set(trace.sums)
    rc, _, err = run(["analyze", refined / "trace.safetensors", "--words", "circle", "--out", tmp_path / "a",
                      "--propagate", 2, "--head-power", 1], capsys)
    assert rc == 0, err
    assert np.array_equal(read_gray(tmp_path / "a" / "mask-0-circle.png"), read_gray(refined / "mask-0-circle.png"))
    assert not np.array_equal(read_gray(plain / "mask-0-circle.png"), read_gray(refined / "mask-0-circle.png"))
    rc, _, err = run(["analyze", plain / "trace.safetensors", "--words", "circle", "--out", tmp_path / "b",
                      "--propagate", 1], capsys)
    assert rc == 2 and "self-attention sums" in err
