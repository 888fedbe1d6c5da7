"""End to end: a real ComfyUI server with the pack runs the example workflows over HTTP."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.images import assert_real_image

pytestmark = [pytest.mark.e2e, pytest.mark.host]
REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "example_workflows" / "api"
CHECKPOINT = "daam_tiny_sd15.safetensors"
DAAM_NODES = {"DAAMTraceModel", "DAAMKSampler", "DAAMShapesLoader", "DAAMHeatmaps", "DAAMMask", "DAAMSaveTrace", "DAAMLoadTrace"}


SIZE, STEPS = 256, 6  # CPU-sized; the workflows themselves default to 512x512 and 20 steps


def load_workflow(name: str, changes: dict | None = None) -> dict:
    """An example workflow with the checkpoint name set (the one thing a user must change), made CPU-sized."""
    text = (WORKFLOWS / f"{name}.json").read_text().replace("CHANGE_ME.safetensors", CHECKPOINT)
    wf = json.loads(text)
    for node in wf.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=SIZE, height=SIZE)
        elif node["class_type"] == "KSampler":
            node["inputs"]["steps"] = STEPS
    for (node, key), value in (changes or {}).items():
        wf[node]["inputs"][key] = value
    return wf


@pytest.fixture(scope="module")
def server(comfyui_dir, sd15_checkpoint, tmp_path_factory):
    from helpers.comfy_server import running_comfyui

    work = tmp_path_factory.mktemp("comfyui")
    ckpts = work / "checkpoints"
    ckpts.mkdir()
    (ckpts / CHECKPOINT).symlink_to(sd15_checkpoint)
    pack_link = Path(comfyui_dir) / "custom_nodes" / "comfyui-daam"
    if not pack_link.exists():
        pytest.fail(f"the pack is not installed in {pack_link}: run tools/setup_host.sh")
    with running_comfyui(comfyui_dir, sys.executable, work_dir=work, checkpoints_dir=ckpts) as client:
        yield client


def images_of(client, entry, prefix: str) -> list[np.ndarray]:
    return [a.astype(np.float32) / 255.0 for a in client.saved_images(entry, prefix)]


def test_object_info_lists_every_daam_node(server):
    info = server.object_info()
    assert DAAM_NODES <= set(info)
    for name in DAAM_NODES:
        assert info[name]["category"] == "DAAM"
        for section in ("required", "optional"):  # not "hidden": the host's PROMPT etc. have no tooltips
            for spec in info[name]["input"].get(section, {}).values():
                assert len(spec) > 1 and spec[1].get("tooltip"), (name, spec)


def combo_options(spec) -> list | None:
    """A combo's options from an object_info input spec: V1 puts them first, V3 under COMBO's "options"."""
    if isinstance(spec[0], list):
        return spec[0]
    return spec[1].get("options") if spec[0] == "COMBO" else None


def test_node_interfaces_are_those_of_0_1(server):
    """Every node as the host serves it (V3 schema, registered through comfy_entrypoint) has the V1 nodes' id,
    display name, category, description, inputs (order, type, default, min/max/step, tooltip...) and outputs, as
    recorded from the V1 classes in tests/data/node_interface_v1.json; saved workflows depend on all of it. Inputs
    added since are optional and come after the recorded ones, so a saved workflow's widget values still line up;
    a tooltip reworded for new model families (or a combo option appended, HiDream's `llama` segment) is
    changed in the file with it."""
    golden = json.loads((REPO / "tests" / "data" / "node_interface_v1.json").read_text())
    info = server.object_info()
    sampler = info["KSampler"]["input"]["required"]  # the host's own lists
    host = {"host:KSampler.SAMPLERS": combo_options(sampler["sampler_name"]),
            "host:KSampler.SCHEDULERS": combo_options(sampler["scheduler"])}
    for name, want in golden.items():
        got = info[name]
        assert (got["display_name"], got["category"], got["description"], got["output_node"]) == \
            (want["display_name"], want["category"], want["description"], want["output_node"]), name
        assert (got["output"], got["output_name"], got["output_tooltips"]) == \
            (want["output"], want["output_name"], want["output_tooltips"]), name
        for section in ("required", "optional"):
            rows = want["inputs"].get(section, [])
            names = list(got["input"].get(section, {}))
            known = names if section == "required" else names[:len(rows)]
            assert known == [r[0] for r in rows], (name, section)
            assert got["input_order"].get(section, [])[:len(rows)] == [r[0] for r in rows], (name, section)
            for input_name, kind, opts in rows:
                spec = got["input"][section][input_name]
                if isinstance(kind, list) or kind.startswith("host:"):
                    options = combo_options(spec)
                    assert options is not None, (name, input_name, spec)
                    if isinstance(kind, list):
                        assert options == kind, (name, input_name)
                    elif kind != "host:trace files":  # the files in output/daam: whatever is there
                        assert options == host[kind], (name, input_name)
                else:
                    assert spec[0] == kind, (name, input_name, spec)
                extra = {k: v for k, v in spec[1].items() if k not in opts and k != "options"}
                assert {k: spec[1].get(k) for k in opts} == opts, (name, input_name)
                assert not any(extra.values()), (name, input_name, extra)  # only V3's explicit False defaults


def test_txt2img_heatmaps_workflow(server):
    entry = server.run_ok(load_workflow("txt2img_heatmaps"))
    (image,) = images_of(server, entry, "daam/image")
    heat = images_of(server, entry, "daam/heatmap")
    over = images_of(server, entry, "daam/overlay")
    masks = [m[..., 0] for m in images_of(server, entry, "daam/mask")]
    assert len(heat) == len(over) == len(masks) == 4  # cat, dog, red sofa + negative 'blurry'
    for m in masks + heat + over:
        assert m.shape[:2] == image.shape[:2] == (SIZE, SIZE)
    for word, m in zip(("cat", "dog", "red sofa", "neg: blurry"), masks):
        assert 0.0 < m.mean() < 1.0, f"mask of {word!r} is empty or full"
    assert_real_image(image, "the generated image")
    assert not np.array_equal(masks[0], masks[1]), "masks of 'cat' and 'dog' are the same"
    assert not np.array_equal(heat[0], heat[1]), "heat maps of 'cat' and 'dog' are the same"
    node_ui = entry["outputs"]["8"]
    (payload,) = node_ui["daam_preview"]  # the browser preview's maps (nodes/preview.py, tests/browser)
    assert payload["image_hw"] == [SIZE, SIZE] and {"cat", "dog", "red sofa"} <= {e["key"] for e in payload["entries"]}


def test_inpaint_workflow_repaints_inside_the_word_mask(server):
    entry = server.run_ok(load_workflow("inpaint_word_mask"))
    (source,) = images_of(server, entry, "daam/inpaint_source")
    (result,) = images_of(server, entry, "daam/inpainted")
    (mask,) = images_of(server, entry, "daam/inpaint_mask")
    m = mask[..., 0]
    assert result.shape == source.shape and 0 < (m > 0.5).mean() < 1
    diff = np.abs(result - source).mean(-1)
    assert diff[m > 0.99].mean() > 0.02  # repainted inside the mask of "dog" ...
    assert diff[m < 0.01].max() <= 2 / 255  # ... and untouched outside it


def test_composite_workflow_pastes_the_word_region(server):
    entry = server.run_ok(load_workflow("composite_word_mask"))
    (source,) = images_of(server, entry, "daam/composite_source")
    (background,) = images_of(server, entry, "daam/composite_background")
    (composite,) = images_of(server, entry, "daam/composite")
    (mask,) = images_of(server, entry, "daam/composite_mask")
    m = mask[..., 0]
    inside, outside = m >= 1.0, m <= 0.0  # the feathered rim is blended; the PNG mask is 8-bit
    assert 0 < inside.mean() < 1 and outside.any()
    assert np.abs(composite[inside] - source[inside]).max() <= 2 / 255
    assert np.abs(composite[outside] - background[outside]).max() <= 2 / 255


def test_bad_word_gives_node_error_and_server_keeps_running(server):
    wf = load_workflow("txt2img_heatmaps", {("8", "words"): "zebra", ("5", "width"): 256, ("5", "height"): 256,
                                              ("6", "steps"): 4})
    entry = server.wait(server.queue(wf), timeout=600)
    assert entry["error"] is not None and "DAAMHeatmaps" in entry["error"]
    assert "zebra" in entry["error"] and "dog" in entry["error"]  # names the word and lists the prompt's words
    ok = load_workflow("txt2img_heatmaps", {("5", "width"): 256, ("5", "height"): 256, ("6", "steps"): 4,
                                              ("6", "seed"): 5})
    entry = server.run_ok(ok)
    assert len(images_of(server, entry, "daam/mask")) == 4


def test_save_and_load_trace_round_trip(server):
    wf = load_workflow("txt2img_heatmaps", {("5", "width"): 256, ("5", "height"): 256, ("6", "steps"): 4})
    wf["50"] = {"class_type": "DAAMSaveTrace", "inputs": {"maps": ["8", 3], "filename_prefix": "../../evil/run"}}
    entry = server.run_ok(wf)
    (saved,) = entry["outputs"]["50"]["text"]
    assert saved.startswith("daam/run_") and saved.endswith(".safetensors")  # traversal stripped
    wf2 = {
        "1": {"class_type": "DAAMLoadTrace", "inputs": {"trace": Path(saved).name}},
        "2": {"class_type": "DAAMMask", "inputs": {"maps": ["1", 0], "words": "dog", "prompt": "positive",
              "operation": "union", "threshold_mode": "otsu", "threshold": 0.4, "open_px": 0, "close_px": 0,
              "grow_px": 0, "feather_px": 0}},
        "3": {"class_type": "MaskToImage", "inputs": {"mask": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "daam/loaded_mask"}},
    }
    entry = server.run_ok(wf2)
    (mask,) = images_of(server, entry, "daam/loaded_mask")
    assert mask.shape[:2] == (256, 256) and 0 < mask.mean() < 1, "the loaded trace's mask is empty or full"


def test_shapes_workflow_masks_the_named_object(server):
    """No checkpoint at all: the shipped shapes model draws the prompt, and the word's mask is its object."""
    from daam_core.engine import metrics
    from daam_core.shapes import scenes

    wf = json.loads((WORKFLOWS / "shapes_heatmaps.json").read_text())
    assert wf["1"]["class_type"] == "DAAMShapesLoader" and "a red circle" in wf["20"]["inputs"]["value"]
    entry = server.run_ok(wf)
    (image,) = images_of(server, entry, "daam/shapes_image")
    (mask,) = images_of(server, entry, "daam/shapes_circle_mask")
    heat = images_of(server, entry, "daam/shapes_heatmap")
    # the 256x256 empty latent is the model's 32x32 canvas on every host (ComfyUI >= 0.10 rescales empty latents
    # to the model's latent format): each cell is shown as an 8x8 block
    assert image.shape == mask.shape == (256, 256, 3)
    assert np.array_equal(image, np.kron(image[::8, ::8], np.ones((8, 8, 1))))
    assert len(heat) == 4 and all(h.shape == (256, 256, 3) for h in heat)  # circle, square, red, blue
    image, mask = image[4::8, 4::8], mask[4::8, 4::8]  # cell centres
    found = {c: (shape, m) for c, shape, m in scenes.detect_objects((image * 255).round().astype(np.uint8))}
    assert found["red"][0] == "circle" and found["blue"][0] == "square", {c: s for c, (s, _) in found.items()}
    import torch

    word_mask = torch.from_numpy(mask[..., 0] > 0.5)
    right = metrics.iou(word_mask, torch.from_numpy(found["red"][1]))
    wrong = metrics.iou(word_mask, torch.from_numpy(found["blue"][1]))
    assert right >= 0.5 and wrong <= 0.1, (right, wrong)


def test_shapes_inpaint_workflow_repaints_the_named_object(server):
    """The mask of "circle" drives inpainting: the red circle becomes a yellow square, nothing else changes."""
    from daam_core.shapes import scenes

    entry = server.run_ok(json.loads((WORKFLOWS / "shapes_inpaint_word_mask.json").read_text()))
    (source,) = images_of(server, entry, "daam/shapes_inpaint_source")
    (result,) = images_of(server, entry, "daam/shapes_inpainted")
    (mask,) = images_of(server, entry, "daam/shapes_inpaint_mask")
    assert source.shape == result.shape == mask.shape == (256, 256, 3)
    source, result, mask = source[4::8, 4::8], result[4::8, 4::8], mask[4::8, 4::8]  # cell centres (8x8 blocks)
    inside = mask[..., 0] > 0.5
    assert 0.05 < inside.mean() < 0.5
    np.testing.assert_allclose(result[~inside], source[~inside], atol=1 / 255)  # pasted back through the mask
    before = {c: s for c, s, _ in scenes.detect_objects((source * 255).round().astype(np.uint8))}
    after = {c: (s, m) for c, s, m in scenes.detect_objects((result * 255).round().astype(np.uint8))}
    assert before == {"red": "circle", "blue": "square"}
    assert "red" not in after and after["blue"][0] == "square", {c: s for c, (s, _) in after.items()}
    assert after["yellow"][0] == "square" and inside[after["yellow"][1]].mean() > 0.9  # drawn inside the mask


def test_ui_workflows_match_the_api_ones(server):
    """The template-browser (UI) workflows queue exactly the API workflows that the tests above run."""
    sys.path.insert(0, str(REPO / "tools"))
    from make_ui_workflows import to_api

    info = server.object_info()
    for api_path in sorted(WORKFLOWS.glob("*.json")):
        ui = json.loads((WORKFLOWS.parent / api_path.name).read_text())
        api = json.loads(api_path.read_text())
        assert {n["type"] for n in ui["nodes"]} - {"Note"} <= set(info)  # a Note describes each workflow
        expected = {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in api.items()}
        assert to_api(ui, info) == expected, api_path.name


def with_attention_backend(after_trace: bool) -> dict:
    """The shapes workflow with ComfyUI's ModelAttentionBackend after DAAM Trace Model (between it and the sampler)
    or before it (between the loader and the trace)."""
    wf = load_workflow("shapes_heatmaps")
    wf["30"] = {"class_type": "ModelAttentionBackend", "inputs": {"attention": "pytorch attention"}}
    if after_trace:
        wf["30"]["inputs"]["model"] = ["2", 0]
        wf["6"]["inputs"]["model"] = ["30", 0]
    else:
        wf["30"]["inputs"]["model"] = ["1", 0]
        wf["2"]["inputs"]["model"] = ["30", 0]
    return wf


def test_trace_model_warns_of_an_attention_backend_after_it(server):
    """ModelAttentionBackend sets its own attention override without calling the one already on the MODEL. After
    DAAM Trace Model it leaves DAAM blind: the trace node says so from the prompt graph before anything samples (the
    server log and its ui text), and DAAM Heatmaps' error names the cause. Before DAAM it is kept and no warning."""
    if "ModelAttentionBackend" not in server.object_info():
        pytest.skip("this ComfyUI has no ModelAttentionBackend node (ComfyUI 0.33 has it: run this file there with "
                    "tools/test_other_host.sh)")
    entry = server.wait(server.queue(with_attention_backend(after_trace=True)), timeout=600)
    assert entry["error"] is not None and "replaced DAAM's attention override" in entry["error"]
    (warning,) = entry["outputs"]["2"]["text"]
    assert "node 30 'ModelAttentionBackend'" in warning and "before DAAM Trace Model" in warning
    log = server.log_text()
    assert log.index("DAAM Trace Model: node 30 'ModelAttentionBackend'") < log.index("replaced DAAM's attention")

    entry = server.run_ok(with_attention_backend(after_trace=False))
    assert "text" not in entry["outputs"].get("2", {})
    assert len(images_of(server, entry, "daam/shapes_word_masks")) == 4  # circle, square, red, blue
