"""Write the UI-format workflows (example_workflows/*.json) from the API-format ones.

The node definitions come from a running ComfyUI's /object_info, so widget order, control widgets
and input types are the host's own:

    python tools/make_ui_workflows.py            # starts the host (tools/setup_host.sh first)
    python tools/make_ui_workflows.py --object-info info.json
    python tools/make_ui_workflows.py --object-info info.json --thumbnails DIR

``--thumbnails DIR`` also writes the template browser's cards, ``example_workflows/<name>.jpg``, from the
``thumbnail-<name>.png`` screenshots of the DAAM preview that the browser tests save (tests/browser, in
``$DAAM_OUT_ARTIFACTS/browser``): the real output of each workflow with its one-line description.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
API_DIR = REPO / "example_workflows" / "api"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COLUMN_GAP, ROW_GAP = 60, 50
# Room for what a node shows after a run, so that nothing covers another node then: the DAAM preview on
# DAAM Heatmaps, the image previews of SaveImage/PreviewImage.
NODE_SIZES = {"DAAMHeatmaps": (460, 1150), "SaveImage": (320, 470), "PreviewImage": (320, 470)}
NODE_WIDTH = 320
VIRTUAL_NODES = {"Note", "MarkdownNote"}  # frontend-only nodes: not part of the queued prompt
# One line per workflow for its note and its template thumbnail: what it shows, and whether it needs a checkpoint.
DESCRIPTIONS = {
    "shapes_heatmaps": ("No checkpoint needed", "The shipped shapes model draws 'a red circle on the left and a "
                        "blue square on the right'; heat maps, overlays and masks of circle, square, red and blue. "
                        "Hover, toggle and threshold them in the preview on DAAM Heatmaps."),
    "shapes_inpaint_word_mask": ("No checkpoint needed", "The mask of 'circle' (refined: propagated through the "
                                 "model's self-attention, heads weighted, competing with 'square') repaints the red "
                                 "circle as a yellow square (VAEEncodeForInpaint); every pixel outside the mask "
                                 "stays."),
    "txt2img_heatmaps": ("Needs a checkpoint", "Per-word heat maps, overlays and masks of 'a cat and a dog on a "
                         "red sofa' and of the negative word 'blurry' (set ckpt_name to your SD1.x/SD2.x/SDXL model)."),
    "inpaint_word_mask": ("Needs a checkpoint", "The mask of 'dog' repaints the dog as a sleeping fox; only the "
                          "dog's region changes (set ckpt_name)."),
    "composite_word_mask": ("Needs a checkpoint", "The dog of one generation pasted onto another through its word "
                            "mask with ImageCompositeMasked (set ckpt_name)."),
    "sd3_heatmaps": ("Needs an SD3 / SD3.5 checkpoint", "Per-word heat maps and masks on SD3's joint attention "
                     "(every joint block; set ckpt_name to your SD3 or SD3.5 model)."),
    "flux_heatmaps": ("Needs Flux.1 files", "Per-word heat maps and masks on Flux.1's double and single blocks "
                      "(set the UNet, CLIP-L, T5-XXL and AE file names; cfg 1, so no negative words)."),
    "wan_video_heatmaps": ("Needs Wan 2.1 files", "A text-to-video sampling and the heat map, overlay and mask of "
                           "'dog' on every frame, saved as animations (set the Wan UNet, umT5 and VAE file names)."),
    "chroma_heatmaps": ("Needs Chroma files", "Per-word heat maps and masks on Chroma's double and single blocks, "
                        "and of the negative word 'blurry' (set the Chroma UNet, T5-XXL and AE file names)."),
    "qwen_image_heatmaps": ("Needs Qwen-Image files", "Per-word heat maps and masks on Qwen-Image's joint blocks, "
                            "and of the negative word 'blurry' (set the UNet, Qwen2.5-VL and VAE file names)."),
    "z_image_heatmaps": ("Needs Z-Image files", "Per-word heat maps and masks on Z-Image Turbo's main layers "
                         "(set the UNet, Qwen3 and AE file names; cfg 1, so no negative words)."),
    "lumina2_heatmaps": ("Needs Lumina 2 files", "Per-word heat maps and masks on Lumina Image 2.0's main layers; "
                         "the system prompt of CLIP Text Encode for Lumina2 is no word (set the UNet, Gemma and AE "
                         "file names)."),
    "hunyuan_image_heatmaps": ("Needs HunyuanImage 2.1 files", "Per-word heat maps and masks on HunyuanImage 2.1's "
                               "double and single blocks (set the UNet, Qwen2.5-VL, byT5 and VAE file names)."),
    "hunyuan_video_heatmaps": ("Needs HunyuanVideo files", "A text-to-video sampling and the heat map, overlay and "
                               "mask of 'dog' on every frame, saved as animations (set the HunyuanVideo UNet, CLIP-L, "
                               "llava-llama-3 and VAE file names; cfg 1)."),
    "hunyuan_video15_heatmaps": ("Needs HunyuanVideo 1.5 files", "A text-to-video sampling at real CFG and the heat "
                                 "map, overlay and mask of 'dog' (and of the negative word 'blurry') on every frame, "
                                 "saved as animations (set the HunyuanVideo 1.5 UNet, Qwen2.5-VL, byT5 and VAE file "
                                 "names)."),
    "ltxv_video_heatmaps": ("Needs LTX-Video files", "A text-to-video sampling and the heat map, overlay and mask of "
                            "'dog' on every frame, saved as animations (set the LTX-Video checkpoint and T5-XXL file "
                            "names)."),
    "flux2_heatmaps": ("Needs Flux.2 files", "Per-word heat maps and masks on Flux.2 dev's double and single "
                       "blocks; the Mistral system prompt is no word (set the UNet, Mistral Small 3 and VAE file "
                       "names; guidance distilled, so no negative words)."),
    "hidream_heatmaps": ("Needs HiDream files", "Per-word heat maps and masks on HiDream-I1's double and single "
                         "blocks (T5 and Llama 3.1 positions), and of the negative word 'blurry' (set the UNet, "
                         "CLIP-L, CLIP-G, T5-XXL, Llama 3.1 and AE file names)."),
}


def is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def has_control(name: str, spec) -> bool:
    """The frontend adds a 'control after generate' widget to seed-like INT inputs."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return spec[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed"))


def ordered_inputs(info: dict) -> list[tuple[str, list]]:
    out = []
    for section in ("required", "optional"):
        out.extend(info["input"].get(section, {}).items())
    order = info.get("input_order")
    if order:
        names = order.get("required", []) + order.get("optional", [])
        lookup = dict(out)
        out = [(n, lookup[n]) for n in names if n in lookup]
    return out


def depth_of(api: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(nid: str) -> int:
        if nid not in depth:
            ups = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2]
            depth[nid] = 1 + max((visit(u) for u in ups), default=-1)
        return depth[nid]

    for nid in api:
        visit(nid)
    return depth


def node_size(class_type: str, inputs: list, widgets: list, info: dict) -> tuple[int, int]:
    if class_type in NODE_SIZES:
        return NODE_SIZES[class_type]
    multiline = sum(1 for _, spec in ordered_inputs(info)
                    if spec[0] == "STRING" and len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("multiline"))
    rows = max(len(inputs), len(info["output"])) + len(widgets)  # slots share rows with the outputs
    return NODE_WIDTH, 80 + 30 * rows + 100 * multiline  # Nodes 2.0 draws taller


def to_ui(api: dict, object_info: dict, description: tuple[str, str] | None = None) -> dict:
    links, nodes = [], []
    outputs_links: dict[tuple[str, int], list[int]] = {}
    for nid, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2:
                link_id = len(links) + 1
                src, slot = value
                kind = object_info[api[src]["class_type"]]["output"][slot]
                links.append([link_id, int(src), slot, int(nid), name, kind])
                outputs_links.setdefault((src, slot), []).append(link_id)
    depth = depth_of(api)
    order = sorted(api, key=lambda n: (depth[n], int(n)))
    for index, nid in enumerate(order):
        node = api[nid]
        info = object_info.get(node["class_type"])
        if info is None:
            raise KeyError(f"node type {node['class_type']!r} is not known to this host")
        inputs, widgets = [], []
        for name, spec in ordered_inputs(info):
            value = node["inputs"].get(name)
            linked = isinstance(value, list) and len(value) == 2
            if is_widget(spec):
                default = spec[1].get("default") if len(spec) > 1 and isinstance(spec[1], dict) else None
                if isinstance(spec[0], list) and default is None and spec[0]:
                    default = spec[0][0]
                if default is None and spec[0] == "STRING":
                    default = ""
                widgets.append(default if linked or value is None else value)
                if has_control(name, spec):
                    widgets.append("fixed")
                if linked:
                    inputs.append({"name": name, "type": "COMBO" if isinstance(spec[0], list) else spec[0],
                                   "widget": {"name": name}, "link": None})
            elif linked or name in info["input"].get("required", {}):
                inputs.append({"name": name, "type": spec[0], "link": None})
        for link in links:
            if link[3] == int(nid):
                for slot in inputs:
                    if slot["name"] == link[4]:
                        slot["link"] = link[0]
        outputs = [{"name": oname, "type": otype, "links": outputs_links.get((nid, i), []), "slot_index": i}
                   for i, (oname, otype) in enumerate(zip(info["output_name"], info["output"]))]
        ui_node = {"id": int(nid), "type": node["class_type"], "pos": [0, 0],
                   "size": list(node_size(node["class_type"], inputs, widgets, info)), "flags": {}, "order": index, "mode": 0, "inputs": inputs,
                   "outputs": outputs, "properties": {"Node name for S&R": node["class_type"]},
                   "widgets_values": widgets}
        title = node.get("_meta", {}).get("title")
        if title and title != info.get("display_name"):
            ui_node["title"] = title
        nodes.append(ui_node)
    # links refer to input slots by index in the UI format
    for link in links:
        target = next(n for n in nodes if n["id"] == link[3])
        link[4] = next(i for i, s in enumerate(target["inputs"]) if s["name"] == link[4])
    last_id = max(int(n) for n in api)
    if description is not None:
        last_id += 1
        nodes.append({"id": last_id, "type": "Note", "pos": [0, 0], "size": [NODE_WIDTH, 150], "flags": {},
                      "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {},
                      "widgets_values": [f"{description[0]}. {description[1]}"], "color": "#432", "bgcolor": "#653"})
        depth[str(last_id)] = 0
    place(nodes, depth)
    nodes.sort(key=lambda n: n["id"])
    return {"last_node_id": last_id, "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def place(nodes: list[dict], depth: dict[str, int]) -> None:
    """Columns by depth in the graph (the note first), stacked top-down; each column as wide as its widest node."""
    columns: dict[int, list[dict]] = {}
    for n in nodes:
        columns.setdefault(depth[str(n["id"])], []).append(n)
    x = 40
    for c in sorted(columns):
        y = 40
        for n in sorted(columns[c], key=lambda n: (n["type"] != "Note", n["order"])):
            n["pos"] = [x, y]
            y += n["size"][1] + ROW_GAP
        x += max(n["size"][0] for n in columns[c]) + COLUMN_GAP


def to_api(ui: dict, object_info: dict) -> dict:
    """The API prompt the frontend would queue for a UI workflow (the inverse of :func:`to_ui`)."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        info = object_info[node["type"]]
        linked = {}
        for slot in node["inputs"]:
            if slot.get("link") is not None:
                _, src, src_slot, *_ = links[slot["link"]]
                linked[slot["name"]] = [str(src), src_slot]
        inputs, values = {}, iter(node["widgets_values"])
        for name, spec in ordered_inputs(info):
            if is_widget(spec):
                value = next(values)
                if has_control(name, spec):
                    next(values)
                inputs[name] = linked.get(name, value)
            elif name in linked:
                inputs[name] = linked[name]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def thumbnail(shot: Path, out: Path, name: str, size: int = 512) -> None:
    """A square JPEG card: the preview screenshot (scaled crisply) above a caption band with the description."""
    from PIL import Image, ImageDraw, ImageFont

    need, text = DESCRIPTIONS.get(name, ("", name))
    band = 132
    card = Image.new("RGB", (size, size), (24, 24, 24))
    picture = Image.open(shot).convert("RGB")
    scale = min(size / picture.width, (size - band) / picture.height)
    resample = Image.NEAREST if scale >= 2 else Image.LANCZOS
    picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), resample)
    card.paste(picture, ((size - picture.width) // 2, (size - band - picture.height) // 2))
    draw = ImageDraw.Draw(card)
    head = ImageFont.load_default(size=30)
    body = ImageFont.load_default(size=19)
    colour = (120, 220, 120) if need.startswith("No") else (240, 190, 90)
    draw.text((16, size - band + 8), need, font=head, fill=colour)
    words, lines, line = text.split(), [], ""
    for w in words:
        if draw.textlength(f"{line} {w}".strip(), font=body) > size - 32:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    for i, line in enumerate(lines[:4]):
        draw.text((16, size - band + 46 + 21 * i), line, font=body, fill=(230, 230, 230))
    card.save(out, "JPEG", quality=88)


def fetch_object_info() -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from helpers.comfy_server import running_comfyui

    comfy = os.environ.get("COMFYUI_DIR")
    if not comfy:
        raise SystemExit("set COMFYUI_DIR (tools/setup_host.sh prints it) or pass --object-info")
    with running_comfyui(comfy, sys.executable) as client:
        return client.object_info()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--object-info", type=Path, help="a saved /object_info JSON instead of starting the host")
    p.add_argument("--thumbnails", type=Path, help="folder with the browser tests' thumbnail-<name>.png shots")
    args = p.parse_args(argv)
    info = json.loads(args.object_info.read_text()) if args.object_info else fetch_object_info()
    for api_path in sorted(API_DIR.glob("*.json")):
        ui = to_ui(json.loads(api_path.read_text()), info, DESCRIPTIONS.get(api_path.stem))
        out = API_DIR.parent / api_path.name
        out.write_text(json.dumps(ui, indent=1) + "\n")
        print(f"wrote {out.relative_to(REPO)} ({len(ui['nodes'])} nodes, {len(ui['links'])} links)")
        shot = args.thumbnails / f"thumbnail-{api_path.stem}.png" if args.thumbnails else None
        if shot is not None:
            if not shot.is_file():  # the browser tests shoot the workflows they can run (no DiT checkpoints)
                print(f"no {shot.name} in {args.thumbnails}: {api_path.stem} keeps its card (or has none)")
                continue
            thumbnail(shot, out.with_suffix(".jpg"), api_path.stem)
            print(f"wrote {out.with_suffix('.jpg').relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
