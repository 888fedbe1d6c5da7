"""The DAAM preview in a real browser: the real ComfyUI server and frontend, headless Chromium, workflows loaded
and run from the UI, and every check made on what the page shows (canvas pixels, the hover list, widgets)."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from helpers.browser import CHECKPOINT, REPO

pytestmark = [pytest.mark.e2e, pytest.mark.host]
WORKFLOWS = REPO / "example_workflows"
SHAPES = "shapes_heatmaps"


def workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def output_images(client, entry, prefix: str) -> list[np.ndarray]:
    """The images a SaveImage with ``prefix`` wrote in a run, as float RGB arrays."""
    return [a.astype(np.float32) / 255 for a in client.saved_images(entry, prefix)]


class Preview:
    """The preview widget of the DAAM Heatmaps node, read and driven the way a person uses it."""

    def __init__(self, cp, node_id: int):
        self.cp, self.page, self.node_id = cp, cp.page, node_id
        self.root = self.page.locator(".daam-preview").first

    def wait_loaded(self, timeout=60_000):
        self.page.wait_for_function("id => !!app.graph.getNodeById(id).daamPreview?.data", arg=self.node_id,
                                    timeout=timeout)
        self.page.wait_for_timeout(300)

    def pixels(self) -> np.ndarray:
        """The canvas as shown, [H, W, 4] uint8 (its pixels are the image's pixels)."""
        data = self.page.evaluate("""id => { const c = app.graph.getNodeById(id).daamPreview.canvas;
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let s = ''; for (let i = 0; i < d.length; i += 8192) s += String.fromCharCode(...d.subarray(i, i + 8192));
            return [c.height, c.width, btoa(s)]; }""", self.node_id)
        h, w, b64 = data
        return np.frombuffer(base64.b64decode(b64), np.uint8).reshape(h, w, 4)

    def chip(self, key: str, prompt: str = "positive"):
        return self.root.locator(f'.daam-chip[data-key="{key}"][data-prompt="{prompt}"]')

    def selected(self) -> list[str]:
        return self.root.locator(".daam-chip.daam-on").evaluate_all("cs => cs.map(c => c.dataset.key)")

    def select_only(self, keys: list[str]):
        for key in self.selected():
            if key not in keys:
                self.chip(key).click()
        for key in keys:
            if key not in self.selected():
                self.chip(key).click()
        assert sorted(self.selected()) == sorted(keys)

    def slide(self, name: str, value: int):
        """Move a slider with the keyboard, as a person would: Home, then `value` steps right."""
        slider = self.root.locator(f"input.daam-{name}")
        slider.focus()
        slider.press("Home")
        for _ in range(value):
            slider.press("ArrowRight")
        assert int(slider.input_value()) == value

    def mode(self, mode: str):
        button = self.root.locator("button.daam-mode")
        if button.inner_text().strip() == mode:  # the button names the other mode
            button.click()

    def mask(self) -> np.ndarray:
        """The previewed mask: in mask view a pixel is lit where the MASK is 1."""
        return self.pixels()[..., :3].sum(-1) > 0

    def hover(self, x: float, y: float) -> list[tuple[str, float]]:
        """Move the mouse over image pixel (x, y); returns the ranked words the preview lists."""
        box = self.root.locator("canvas.daam-canvas").bounding_box()
        h, w = self.pixels().shape[:2]
        self.page.mouse.move(box["x"] + (x + 0.5) * box["width"] / w, box["y"] + (y + 0.5) * box["height"] / h)
        self.page.wait_for_timeout(100)
        ranks = self.root.locator(".daam-hover .daam-rank")
        return ranks.evaluate_all("rs => rs.map(r => [r.dataset.key, Number(r.dataset.value), r.textContent])")


def colour_centroid(image: np.ndarray, channel: int) -> tuple[float, float]:
    """Centre (x, y) of the pixels where one colour channel dominates (the drawn red circle / blue square)."""
    others = [c for c in range(3) if c != channel]
    hit = (image[..., channel] > 0.5) & (image[..., others].max(-1) < 0.35)
    assert hit.sum() >= 6, "the shapes model drew no such object"
    ys, xs = np.nonzero(hit)
    return float(xs.mean()), float(ys.mean())


def overlaps(boxes: dict) -> list[tuple]:
    """Pairs of (name, name) whose boxes [x, y, w, h] intersect with positive area."""
    items = list(boxes.items())
    out = []
    for i, (a, (ax, ay, aw, ah)) in enumerate(items):
        for b, (bx, by, bw, bh) in items[i + 1:]:
            if min(ax + aw, bx + bw) - max(ax, bx) > 1 and min(ay + ah, by + bh) - max(ay, by) > 1:
                out.append((a, b))
    return out


def node_boxes(cp, vue: bool) -> dict:
    if vue:
        return cp.page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('.lg-node[data-node-id]')]
            .map(e => { const r = e.getBoundingClientRect(); return [e.dataset.nodeId, [r.x, r.y, r.width, r.height]]; }))""")
    return cp.page.evaluate("() => Object.fromEntries(app.graph._nodes.map(n => [n.id + ':' + n.type, "
                            "Array.from(n.getBounding())]))")


def run_shapes(cp):
    """Load the shapes demo, run it with the Run button, and wait for DAAM Heatmaps' preview: (node id, the queue
    entry of the run, the preview)."""
    cp.load(workflow(SHAPES))
    heat_id = cp.node("DAAMHeatmaps")
    entry = cp.run()
    preview = Preview(cp, heat_id)
    preview.wait_loaded()
    cp.focus(heat_id)
    return heat_id, entry, preview


def linked_prompt_rows(cp, node_id: int) -> dict:
    """What the frontend has for DAAM Heatmaps' prompt texts: per input its type, whether it is linked and its
    slot's height on the node, and where the first unlinked widget ('words') starts."""
    return cp.page.evaluate("""id => { const n = app.graph.getNodeById(id);
        const row = name => { const i = n.inputs.findIndex(s => s.name === name), s = n.inputs[i];
            return {type: s.type, linked: s.link != null, widget: s.widget?.name ?? null,
                    y: n.getInputPos(i)[1] - n.pos[1]}; };
        return {positive: row("positive"), negative: row("negative"),
                words: n.widgets.find(w => w.name === "words").y, height: n.size[1]}; }""", node_id)


def assert_linked_prompts_are_input_rows(rows: dict):
    """Linked, positive and negative are one input row each, right above the widgets: not the multiline text box's
    height of blank node that frontend 1.58 keeps for a linked DOM widget (174 px each on the shapes demo)."""
    for name in ("positive", "negative"):
        assert rows[name]["linked"] and rows[name]["type"] == "STRING" and rows[name]["widget"] == name, rows
    assert 0 < rows["negative"]["y"] - rows["positive"]["y"] <= 30, rows
    assert 0 < rows["words"] - rows["negative"]["y"] <= 30, rows


# -- the shapes demo: every interaction ---------------------------------------------------------------------------

def test_shapes_preview_hover_chips_threshold_time_and_write_back(comfy_page, server, artifacts):
    cp = comfy_page.open()
    assert cp.page.evaluate("app.extensions.some(e => e.name === 'comfyui-daam.preview')")
    heat_id, entry, preview = run_shapes(cp)
    assert cp.widget(cp.node("DAAMTraceModel"), "time_buckets") == 8  # the demo traces with time buckets (scrub)
    assert sorted(preview.selected()) == ["blue", "circle", "red", "square"]  # the node's words start selected
    assert overlaps(node_boxes(cp, vue=False)) == []
    cp.screenshot("preview-shapes-canvas")
    cp.screenshot("preview-shapes", preview.root)

    # hover: the words under the cursor, ranked
    (image,) = output_images(server, entry, "daam/shapes_image")
    circle, square = colour_centroid(image, 0), colour_centroid(image, 2)
    at_circle, at_square = preview.hover(*circle), preview.hover(*square)
    assert at_circle[0][0] == "circle", at_circle  # among the shown words: circle, square, red, blue
    assert at_square[0][0] == "square", at_square
    assert len(at_circle) == 4 and [v for _, v, _ in at_circle] == sorted((v for _, v, _ in at_circle), reverse=True)
    assert re.fullmatch(r"circle \d+%", at_circle[0][2])  # the list says how much of the attention there

    # a chip switches its overlay instantly; switching it back restores the pixels
    before = preview.pixels()
    assert cp.page.locator('.daam-label[data-key="circle"]').count() == 1  # every overlay has its label
    preview.chip("circle").click()
    assert "circle" not in preview.selected()
    toggled = preview.pixels()
    assert (np.abs(toggled.astype(int) - before).max(-1) > 8).sum() > 20
    assert cp.page.locator('.daam-label[data-key="circle"]').count() == 0
    preview.chip("circle").click()
    assert np.array_equal(preview.pixels(), before)

    # time scrub: the maps of an early and a late part of the sampling differ from each other and from the sum
    preview.select_only(["circle"])
    whole = preview.pixels()
    preview.slide("time", 1)
    early = preview.pixels()
    preview.slide("time", 8)
    late = preview.pixels()
    assert not np.array_equal(early, late) and not np.array_equal(early, whole)
    cp.screenshot("preview-shapes-time-early", preview.root)
    preview.slide("time", 0)
    assert np.array_equal(preview.pixels(), whole)

    # threshold: a higher threshold previews a smaller mask
    preview.slide("threshold", 20)
    low = preview.mask()
    preview.slide("threshold", 60)
    high = preview.mask()
    assert high.sum() < low.sum() and (high & ~low).sum() == 0 and high.sum() > 0
    preview.slide("threshold", 55)
    previewed = preview.mask()
    cp.screenshot("preview-shapes-mask", preview.root)

    # write-back, then the next run's MASK is the previewed mask
    preview.root.locator("button.daam-apply").click()
    assert cp.widget(heat_id, "words") == "circle"
    assert cp.widget(heat_id, "negative_words") == ""
    assert abs(cp.widget(heat_id, "threshold") - 0.55) < 1e-9
    again = cp.run()
    (mask,) = output_images(server, again, "daam/shapes_word_masks")
    produced = mask[..., 0] > 0.5
    iou = (produced & previewed).sum() / max((produced | previewed).sum(), 1)
    assert iou >= 0.99, iou
    assert np.array_equal(produced, previewed)  # in fact exact: the browser reads the engine's own threshold levels
    assert cp.pack_errors() == []


def test_preview_switches_to_refined_maps_and_the_next_run_outputs_them(comfy_page, server, artifacts):
    """The demo traces with self-attention and head sums: the preview switches between plain and refined maps
    without a new run, and writing the refined view back makes the next run's MASK the previewed mask."""
    cp = comfy_page.open()
    heat_id, _, preview = run_shapes(cp)
    trace_id = cp.node("DAAMTraceModel")
    assert cp.widget(trace_id, "record_self_attention") is True and cp.widget(trace_id, "record_head_sums") is True
    button = preview.root.locator("button.daam-refine")
    assert button.is_visible() and button.inner_text().strip() == "plain"
    preview.select_only(["circle"])
    preview.slide("threshold", 40)  # the slider shows the mask
    plain = preview.mask()
    button.click()
    assert button.inner_text().strip() == "refined (propagate 4, heads 2)"
    refined = preview.mask()
    assert refined.sum() > 0 and not np.array_equal(plain, refined)
    cp.screenshot("preview-shapes-refined", preview.root)
    preview.root.locator("button.daam-apply").click()
    assert (cp.widget(heat_id, "propagate_steps"), cp.widget(heat_id, "head_power")) == (4, 2)
    again = cp.run()
    (mask,) = output_images(server, again, "daam/shapes_word_masks")
    assert np.array_equal(mask[..., 0] > 0.5, refined)  # the engine's own levels of the refined maps
    preview.wait_loaded()
    assert button.inner_text().strip() == "refined (propagate 4, heads 2)"  # now the node's own maps
    button.click()
    assert button.inner_text().strip() == "plain"
    preview.slide("threshold", 40)
    assert np.array_equal(preview.mask(), plain)
    assert cp.pack_errors() == []


def test_many_images_are_stepped_through_with_a_slider(comfy_page, server, artifacts):
    """A batch of more images than the preview has buttons for (a video's frames) gets a slider; each step shows
    that image's mask, the one the node outputs for it."""
    cp = comfy_page.open()
    cp.load(workflow(SHAPES))
    cp.set_widget(cp.node("EmptyLatentImage"), "batch_size", 10)
    heat_id = cp.node("DAAMHeatmaps")
    entry = cp.run()
    preview = Preview(cp, heat_id)
    preview.wait_loaded()
    cp.focus(heat_id)
    assert preview.root.locator("button.daam-image").count() == 0
    slider = preview.root.locator("input.daam-frame")
    assert slider.is_visible() and preview.root.locator(".daam-frame-value").inner_text() == "1 / 10"
    preview.select_only(["circle"])
    preview.slide("threshold", 40)
    masks = [m[..., 0] > 0.5 for m in output_images(server, entry, "daam/shapes_word_masks")]
    assert len(masks) == 10 * 4  # image-major: 4 words per image, circle first
    first = preview.mask()
    assert np.array_equal(first, masks[0])
    slider.focus()
    for _ in range(4):
        slider.press("ArrowRight")
    assert preview.root.locator(".daam-frame-value").inner_text() == "5 / 10"
    fifth = preview.mask()
    assert np.array_equal(fifth, masks[4 * 4]) and not np.array_equal(fifth, first)
    cp.screenshot("preview-shapes-many-images", preview.root)
    assert cp.pack_errors() == []


def test_linked_prompt_texts_draw_as_inputs(comfy_page, artifacts):
    cp = comfy_page.open()
    cp.load(workflow(SHAPES))
    heat_id = cp.node("DAAMHeatmaps")
    cp.focus(heat_id)
    assert_linked_prompts_are_input_rows(linked_prompt_rows(cp, heat_id))
    cp.screenshot("heatmaps-linked-prompts")
    assert cp.pack_errors() == []


# -- Nodes 2.0 (the Vue node view) ----------------------------------------------------------------------------------

def test_preview_in_nodes_2(comfy_page, server):
    cp = comfy_page.open()
    if not cp.offers_nodes_2():
        pytest.skip(f"frontend {cp.page.evaluate('window.__COMFYUI_FRONTEND_VERSION__')} has no Nodes 2.0 setting "
                    f"(only a hidden experimental flag)")
    cp = comfy_page.open(vue=True)
    assert cp.page.evaluate("app.extensionManager.setting.get('Comfy.VueNodes.Enabled')") is True
    heat_id, entry, preview = run_shapes(cp)
    cp.page.wait_for_timeout(500)
    assert cp.page.locator(f'[data-node-id="{heat_id}"] .daam-preview').count() == 1  # inside the Vue node
    box = preview.root.locator("canvas.daam-canvas").bounding_box()
    assert box["width"] > 100 and box["height"] > 100  # grows with the node, not 32 px
    (image,) = output_images(server, entry, "daam/shapes_image")
    assert preview.hover(*colour_centroid(image, 0))[0][0] == "circle"
    before = preview.pixels()
    preview.chip("circle").click()
    assert not np.array_equal(preview.pixels(), before)
    cp.screenshot("preview-shapes-nodes2")
    assert overlaps(node_boxes(cp, vue=True)) == []
    assert cp.pack_errors() == []


# -- every example workflow, loaded and run from the UI -------------------------------------------------------------

def example_names() -> list[str]:
    return sorted(p.stem for p in WORKFLOWS.glob("*.json"))


def cpu_sized(cp):
    """What a user of the tiny test checkpoint changes: the checkpoint name, and a CPU-sized image and schedule."""
    for n in cp.page.evaluate("() => app.graph._nodes.map(n => [n.id, n.type])"):
        node_id, kind = n
        if kind == "CheckpointLoaderSimple":
            cp.set_widget(node_id, "ckpt_name", CHECKPOINT)
        elif kind == "EmptyLatentImage" and not cp.node("DAAMShapesLoader"):
            cp.set_widget(node_id, "width", 256)
            cp.set_widget(node_id, "height", 256)
        elif kind in ("KSampler", "KSamplerAdvanced", "DAAMKSampler") and not cp.node("DAAMShapesLoader"):
            cp.set_widget(node_id, "steps", 4)


# Their DiT model files are not in this server's model folders: tests/test_e2e_dit.py runs the SD3 and Flux ones over
# HTTP with tiny DiT files and checks that all these UI files queue exactly the API workflows, with the host's combo
# options (the other families' sampling is tested in process: tests/test_comfy_video.py, test_comfy_dit.py,
# test_comfy_qwen_image.py, test_comfy_lumina.py, test_comfy_hunyuan.py, test_comfy_ltxv.py, test_comfy_flux2.py,
# test_comfy_hidream.py); here they are loaded and laid out.
NEEDS_DIT_FILES = {"sd3_heatmaps", "flux_heatmaps", "wan_video_heatmaps", "chroma_heatmaps", "qwen_image_heatmaps",
                   "z_image_heatmaps", "lumina2_heatmaps", "hunyuan_image_heatmaps", "hunyuan_video_heatmaps",
                   "hunyuan_video15_heatmaps", "ltxv_video_heatmaps", "flux2_heatmaps", "hidream_heatmaps"}


@pytest.mark.parametrize("name", example_names())
def test_example_workflow_runs_from_the_ui(comfy_page, artifacts, name):
    cp = comfy_page.open()
    cp.load(workflow(name))
    if name in NEEDS_DIT_FILES:
        cp.page.wait_for_timeout(400)
        cp.screenshot(f"workflow-{name}")
        assert overlaps(node_boxes(cp, vue=False)) == []
        assert cp.pack_errors() == []
        return
    cpu_sized(cp)
    cp.run(timeout=900)
    heat_id = cp.node("DAAMHeatmaps")
    if heat_id is not None:
        preview = Preview(cp, heat_id)
        preview.wait_loaded()
        cp.focus(heat_id)
        preview.root.locator("canvas.daam-canvas").screenshot(path=str(artifacts / f"thumbnail-{name}.png"))
    cp.page.evaluate("() => app.canvas.ds.scale = 0.5")  # the whole graph, after the run
    cp.page.evaluate("() => { const c = app.canvas; c.ds.offset[0] = 20; c.ds.offset[1] = 90; c.setDirty(true, true); }")
    cp.page.wait_for_timeout(400)
    cp.screenshot(f"workflow-{name}")
    assert overlaps(node_boxes(cp, vue=False)) == []
    assert cp.pack_errors() == []


# -- the frontend of ComfyUI 0.3.64 -------------------------------------------------------------------------------

def test_preview_on_the_frontend_of_comfyui_0_3_64(browser, comfyui_dir, tmp_path_factory, artifacts):
    """ComfyUI 0.3.64 pins comfyui-frontend-package 1.27.10; serve that frontend (--front-end-root) and use the
    preview there."""
    import os

    from helpers.browser import ComfyPage, frontend_1_27, start_server

    root = frontend_1_27()
    if root is None:
        if os.environ.get("DAAM_REQUIRE_BROWSER") == "1":
            pytest.fail("the 1.27.10 frontend is not set up: run tools/setup_browser.sh")
        pytest.skip("the 1.27.10 frontend is not set up: run tools/setup_browser.sh")
    with start_server(comfyui_dir, tmp_path_factory.mktemp("comfyui-fe127"), None, front_end_root=root) as client:
        context = browser.new_context(viewport={"width": 1600, "height": 1000})
        try:
            cp = ComfyPage(context.new_page(), client, artifacts).open()
            assert cp.page.evaluate("window.__COMFYUI_FRONTEND_VERSION__") == "1.27.10"
            heat_id, entry, preview = run_shapes(cp)
            assert_linked_prompts_are_input_rows(linked_prompt_rows(cp, heat_id))
            (image,) = output_images(client, entry, "daam/shapes_image")
            assert preview.hover(*colour_centroid(image, 0))[0][0] == "circle"
            assert preview.hover(*colour_centroid(image, 2))[0][0] == "square"
            before = preview.pixels()
            preview.chip("square").click()
            assert not np.array_equal(preview.pixels(), before)
            cp.screenshot("preview-shapes-frontend-1.27.10")
            assert cp.pack_errors() == []
        finally:
            context.close()
