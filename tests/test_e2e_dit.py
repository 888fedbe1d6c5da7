"""End to end: a real ComfyUI server runs the SD3 and Flux example workflows over HTTP, stock loaders only.

Models (``helpers/dit_checkpoints.py``): an SD3 checkpoint the host detects as SD3 (depth-2 MMDiT + CLIP-L + the
16-channel AE) for ``CheckpointLoaderSimple``; a full-width Flux.1 dev diffusion model with 1 double + 1 single
block (~1.1 GB, generated once into the cache) for ``UNETLoader``; CLIP-L alone for ``CLIPLoader(type="sd3")``
(the full T5-XXL that ``DualCLIPLoader(type="flux")`` builds cannot run here, so the test swaps that one node:
SD3's encoder pads CLIP-L to Flux's 4096-wide text input); the 16-channel AE for ``VAELoader``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.images import assert_same_image

pytestmark = [pytest.mark.e2e, pytest.mark.host]
REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "example_workflows" / "api"
SD3_FILE, FLUX_FILE, CLIP_FILE, VAE_FILE = ("daam_tiny_sd3.safetensors", "daam_tiny_flux_dev.safetensors",
                                            "daam_tiny_clip_l.safetensors", "daam_tiny_ae.safetensors")


@pytest.fixture(scope="module")
def server(comfyui_dir, comfy_host, tmp_path_factory):
    from helpers.comfy_server import running_comfyui
    from helpers.dit_checkpoints import cached_clip_l, cached_flux_unet, cached_flux_vae, cached_sd3_checkpoint

    work = tmp_path_factory.mktemp("comfyui-dit")
    folders = {"checkpoints": (SD3_FILE, cached_sd3_checkpoint()), "diffusion_models": (FLUX_FILE, cached_flux_unet()),
               "text_encoders": (CLIP_FILE, cached_clip_l()), "vae": (VAE_FILE, cached_flux_vae())}
    lines = ["daam_dit_tests:"]
    for folder, (name, path) in folders.items():
        d = work / folder
        d.mkdir()
        (d / name).symlink_to(path)
        lines.append(f"    {folder}: {json.dumps(str(d))}")
    config = work / "extra_model_paths.yaml"
    config.write_text("\n".join(lines) + "\n")
    with running_comfyui(comfyui_dir, sys.executable, work_dir=work,
                         extra_args=["--extra-model-paths-config", str(config)], timeout=300) as client:
        yield client


def workflow(name: str, width: int, height: int, batch: int = 1, steps: int = 2) -> dict:
    """An example workflow with the test's files and a CPU-sized, non-square latent."""
    wf = json.loads((WORKFLOWS / f"{name}.json").read_text())
    for node in wf.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = SD3_FILE
        elif node["class_type"] == "UNETLoader":
            inputs["unet_name"] = FLUX_FILE
        elif node["class_type"] == "VAELoader":
            inputs["vae_name"] = VAE_FILE
        elif node["class_type"] == "DualCLIPLoader":
            node["class_type"] = "CLIPLoader"
            node["inputs"] = {"clip_name": CLIP_FILE, "type": "sd3"}
        elif node["class_type"] == "EmptySD3LatentImage":
            inputs.update(width=width, height=height, batch_size=batch)
        elif node["class_type"] in ("KSampler", "DAAMKSampler"):
            inputs["steps"] = steps
    return wf


def add_plain_sampler(wf: dict, model, prefix: str) -> None:
    """The stock KSampler with the same inputs on the untraced model, decoded and saved next to the traced one."""
    sampler = next(k for k, n in wf.items() if n["class_type"] in ("KSampler", "DAAMKSampler"))
    decode = next(k for k, n in wf.items() if n["class_type"] == "VAEDecode")
    inputs = {k: v for k, v in wf[sampler]["inputs"].items()}
    inputs["model"] = model
    wf["90"] = {"class_type": "KSampler", "inputs": inputs}
    wf["91"] = {"class_type": "VAEDecode", "inputs": {"samples": ["90", 0], "vae": wf[decode]["inputs"]["vae"]}}
    wf["92"] = {"class_type": "SaveImage", "inputs": {"images": ["91", 0], "filename_prefix": f"daam/{prefix}"}}


def images_of(client, entry, prefix: str) -> list[np.ndarray]:
    return client.saved_images(entry, f"daam/{prefix}")


def test_sd3_workflow_maps_words_and_keeps_the_image(server):
    wf = workflow("sd3_heatmaps", width=192, height=128, batch=2)
    add_plain_sampler(wf, ["1", 0], "sd3_plain")
    entry = server.run_ok(wf, timeout=1500)
    traced, plain = images_of(server, entry, "sd3_image"), images_of(server, entry, "sd3_plain")
    assert len(traced) == len(plain) == 2
    for i, (a, b) in enumerate(zip(plain, traced)):  # the traced sampling is the stock one
        assert_same_image(a, b, f"SD3 traced image {i}")
    masks = [m[..., 0] for m in images_of(server, entry, "sd3_mask")]
    heat = images_of(server, entry, "sd3_heatmap")
    assert len(masks) == len(heat) == 2 * 4  # 2 images x (cat, dog, red sofa, negative 'blurry')
    words = ("cat", "dog", "red sofa", "neg: blurry")
    for i, m in enumerate(masks):
        label = f"mask of {words[i % 4]!r} (image {i // 4 + 1})"
        assert m.shape == (128, 192) and 0 < (m > 127).mean() < 1, f"{label} is empty or full"
    assert not np.array_equal(masks[0], masks[1]), "masks of 'cat' and 'dog' are the same"
    (payload,) = entry["outputs"]["8"]["daam_preview"]  # the browser preview lists the prompt's words
    assert "sofa" in {e["key"] for e in payload["entries"]}


def test_flux_workflow_maps_words_and_refuses_negative_words(server):
    wf = workflow("flux_heatmaps", width=128, height=96, batch=2, steps=1)
    add_plain_sampler(wf, ["1", 0], "flux_plain")
    entry = server.run_ok(wf, timeout=1500)
    traced, plain = images_of(server, entry, "flux_image"), images_of(server, entry, "flux_plain")
    assert len(traced) == len(plain) == 2
    for i, (a, b) in enumerate(zip(plain, traced)):
        assert_same_image(a, b, f"Flux traced image {i}")
    masks = [m[..., 0] for m in images_of(server, entry, "flux_mask")]
    assert len(masks) == 2 * 3 and all(m.shape == (96, 128) and 0 < (m > 127).mean() < 1 for m in masks)

    bad = workflow("flux_heatmaps", width=128, height=96, steps=1)
    bad["8"]["inputs"]["negative_words"] = "blurry"
    entry = server.wait(server.queue(bad), timeout=1500)
    assert entry["error"] is not None and "DAAMHeatmaps" in entry["error"]
    assert "distilled" in entry["error"] and "no negative branch" in entry["error"]


def test_unsupported_options_are_node_errors(server):
    wf = workflow("flux_heatmaps", width=64, height=64, steps=1)
    wf["30"] = {"class_type": "DAAMTraceModel", "inputs": {"model": ["1", 0], "resolutions": "all",
                "unet_parts": "down", "start_percent": 0.0, "end_percent": 1.0, "heads": "", "record_negative": True}}
    wf["6"]["inputs"]["model"] = ["30", 0]
    entry = server.wait(server.queue(wf), timeout=600)
    assert entry["error"] is not None and "DAAMTraceModel" in entry["error"] and "Flux.1" in entry["error"]
    assert server.system_stats()  # the server keeps running


DIT_WORKFLOWS = ("sd3_heatmaps", "flux_heatmaps", "wan_video_heatmaps", "chroma_heatmaps", "qwen_image_heatmaps",
                 "z_image_heatmaps", "lumina2_heatmaps", "hunyuan_image_heatmaps", "hunyuan_video_heatmaps",
                 "hunyuan_video15_heatmaps", "ltxv_video_heatmaps", "flux2_heatmaps", "hidream_heatmaps")


def test_ui_workflows_match_the_api_ones(server):
    """The UI files of the DiT workflows (one per family) queue exactly their API workflows."""
    sys.path.insert(0, str(REPO / "tools"))
    from make_ui_workflows import to_api

    info = server.object_info()
    for name in DIT_WORKFLOWS:
        ui = json.loads((WORKFLOWS.parent / f"{name}.json").read_text())
        api = json.loads((WORKFLOWS / f"{name}.json").read_text())
        assert {n["type"] for n in ui["nodes"]} - {"Note"} <= set(info)  # a Note describes each workflow
        assert to_api(ui, info) == {k: {"class_type": n["class_type"], "inputs": n["inputs"]} for k, n in api.items()}


def test_example_workflows_use_only_the_hosts_inputs_and_options(server):
    """Every example workflow names inputs this host's nodes have (all of a DAAM node's, every required one of the
    others), and every combo value is one of the host's options; only model file names may be missing, and those
    are the CHANGE_ME placeholders that the user replaces."""
    info = server.object_info()
    paths = sorted(WORKFLOWS.glob("*.json"))
    assert {p.stem for p in paths} >= set(DIT_WORKFLOWS)
    for path in paths:
        for nid, node in json.loads(path.read_text()).items():
            where = f"{path.stem} node {nid} ({node['class_type']})"
            spec = info[node["class_type"]]["input"]
            required, optional = spec.get("required", {}), spec.get("optional", {})
            inputs = node["inputs"]
            assert set(inputs) <= set(required) | set(optional), f"{where}: unknown inputs"
            expected = set(required) | (set(optional) if node["class_type"].startswith("DAAM") else set())
            assert expected <= set(inputs), f"{where} leaves out {sorted(expected - set(inputs))}"
            for name, value in inputs.items():
                kind, *opts = {**optional, **required}[name]
                options = kind if isinstance(kind, list) else opts[0].get("options") if kind == "COMBO" else None
                if options is None or isinstance(value, list):  # not a combo, or a link
                    continue
                if value in options:
                    continue
                assert isinstance(value, str) and value.startswith("CHANGE_ME"), \
                    f"{where}: {name}={value!r} is not among the host's options {options[:8]}"
                assert all(not str(v).startswith("CHANGE_ME") for v in options)  # a placeholder, not a real file
