"""DAAM Word Relations on the real ComfyUI server: the shapes workflow, its relations table and its errors."""

from __future__ import annotations

import copy
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.host]
pytest.importorskip("spacy", reason="the [syntax] extra (spaCy) is not installed")
REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "example_workflows" / "api" / "shapes_heatmaps.json"


@pytest.fixture(scope="module")
def server(comfyui_dir, tmp_path_factory):
    from helpers.comfy_server import running_comfyui

    pack_link = Path(comfyui_dir) / "custom_nodes" / "comfyui-daam"
    if not pack_link.exists():
        pytest.fail(f"the pack is not installed in {pack_link}: run tools/setup_host.sh")
    with running_comfyui(comfyui_dir, sys.executable, work_dir=tmp_path_factory.mktemp("comfyui")) as client:
        yield client


def relations_workflow(spacy_model: str | None = None) -> dict:
    """The shipped shapes workflow plus DAAM Word Relations (table saved) and the masks of "circle" and "red"."""
    wf = json.loads(WORKFLOW.read_text())
    wf["30"] = {"class_type": "DAAMWordRelations",
                "inputs": {"maps": ["8", 3], "prompt": "positive", "threshold": 0.4, "include_unrelated": True}}
    if spacy_model is not None:
        wf["30"]["inputs"]["spacy_model"] = spacy_model
    wf["31"] = {"class_type": "SaveImage", "inputs": {"images": ["30", 0], "filename_prefix": "daam/relations"}}
    for node, word in (("32", "red"), ("34", "circle")):
        wf[node] = copy.deepcopy(wf["10"])
        wf[node]["inputs"]["words"] = word
        wf[str(int(node) + 1)] = {"class_type": "MaskToImage", "inputs": {"mask": [node, 0]}}
        wf[f"{node}s"] = {"class_type": "SaveImage",
                          "inputs": {"images": [str(int(node) + 1), 0], "filename_prefix": f"daam/rel_{word}"}}
    return wf


def image_of(client, entry, prefix: str) -> np.ndarray:
    from PIL import Image

    (name, sub, kind), = [f for f in client.output_images(entry) if f[0].startswith(prefix + "_")]
    return np.asarray(Image.open(io.BytesIO(client.view(name, sub, kind))).convert("RGB")).astype(np.float32) / 255


def test_word_relations_node_over_http(server):
    entry = server.wait(server.queue(relations_workflow()), timeout=600)
    assert entry["error"] is None, entry["error"]
    ui = entry["outputs"]["30"]
    (data,) = ui["daam_relations"]
    assert data["text"] == "a red circle on the left and a blue square on the right"
    pairs = {(p["relation"], p["head"], p["dependent"]): p for p in data["pairs"]}
    amod = pairs[("amod", "circle", "red")]
    # reference: the same two words' masks from DAAM Mask, saved as images, compared pixel by pixel here
    red = image_of(server, entry, "rel_red")[..., 0] > 0.5
    circle = image_of(server, entry, "rel_circle")[..., 0] > 0.5
    inter = (red & circle).sum()
    assert amod["iou"] == pytest.approx(inter / (red | circle).sum(), abs=1e-6)
    assert amod["iod"] == pytest.approx(inter / red.sum(), abs=1e-6)
    assert amod["ioh"] == pytest.approx(inter / circle.sum(), abs=1e-6)
    assert ("det", "circle", "a") in pairs and any(k[0] == "unrelated" for k in pairs)
    groups = [r["group"] for r in data["table"]]
    assert groups[:2] == ["unrelated", "all related"] and "amod" in groups
    assert "| amod | circle | red |" in ui["text"][0]
    table = image_of(server, entry, "relations")
    assert table.shape[0] > 100 and table.shape[1] > 200 and 0.5 < table.mean() < 1.0  # text on white


def test_missing_parser_is_a_node_error_and_the_server_keeps_running(server):
    entry = server.wait(server.queue(relations_workflow("no_such_spacy_model")), timeout=600)
    assert entry["error"] is not None
    assert "DAAMWordRelations" in entry["error"] and "needs the syntax extra" in entry["error"]
    assert "pip install" in entry["error"] and "no_such_spacy_model" in entry["error"]
    again = server.wait(server.queue(relations_workflow()), timeout=600)
    assert again["error"] is None, again["error"]
