"""DAAM Word Relations: the prompt's syntax relations and how much their words' maps overlap (spaCy)."""

from __future__ import annotations

import json

import torch
from comfy_api.v0_0_2 import io

from ..daam_core.analysis.plots import table_image
from ..daam_core.analysis.relations import relation_pairs, relation_table
from ..daam_core.analysis.syntax import DEFAULT_MODEL, SyntaxUnavailableError, load_parser, parse_layout

BRANCH = {"positive": "cond", "negative": "uncond"}


class DAAMWordRelations(io.ComfyNode):
    """Head/dependent pairs of the prompt (spaCy) with IoU, IoD and IoH of their thresholded maps."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DAAMWordRelations", display_name="DAAM Word Relations", category="DAAM",
            description="Which words of the prompt are syntactically related (spaCy) and how much of their heat maps "
                        "they share: IoU, IoD (how much of the dependent lies in the head) and IoH. Needs the syntax "
                        "extra.",
            inputs=[
                io.Custom("DAAM_MAPS").Input("maps", tooltip="Maps from 'DAAM Heatmaps' or 'DAAM Load Trace'; the "
                                             "prompt is read from them, as the text encoder saw it."),
                io.Combo.Input("prompt", options=["positive", "negative"], default="positive",
                               tooltip="Which prompt to parse."),
                io.Float.Input("threshold", default=0.4, min=0.01, max=1.0, step=0.01,
                               tooltip="Masks at this fraction of each map's maximum (the paper: 0.4)."),
                io.Boolean.Input("include_unrelated", default=False,
                                 tooltip="Also list word pairs with no relation (the paper's baseline)."),
                io.String.Input("spacy_model", default=DEFAULT_MODEL, optional=True,
                                tooltip="An installed spaCy pipeline with a parser (package name or folder)."),
            ],
            outputs=[
                io.Image.Output("table", display_name="table",
                                tooltip="The relations table as a picture (one per image)."),
                io.String.Output("text", display_name="text", tooltip="The same as a Markdown table."),
                io.String.Output("json", display_name="json",
                                 tooltip="Per image: every pair and the table by relation, as JSON."),
            ],
        )

    @classmethod
    def execute(cls, maps, prompt="positive", threshold=0.4, include_unrelated=False, spacy_model=DEFAULT_MODEL):
        try:
            nlp = load_parser(spacy_model.strip() or DEFAULT_MODEL)
        except SyntaxUnavailableError as e:
            raise RuntimeError(f"DAAM Word Relations needs the syntax extra: {e}") from None
        trace, branch = maps.trace, BRANCH[prompt]
        pictures, texts, out = [], [], []
        for i in range(trace.num_images):
            parsed = parse_layout(trace.layout(i, branch), nlp)
            rows = relation_pairs(parsed, trace, i, branch, tau=threshold, unrelated=include_unrelated,
                                  normalize=maps.normalize, combine=maps.combine)
            if not rows:
                raise ValueError(f"DAAM Word Relations: no related word pair in the {prompt} prompt "
                                 f"{parsed.text!r} of image {i}")
            cells = [[r["relation"], r["head"], r["dependent"], f"{r['iou']:.2f}", f"{r['iod']:.2f}",
                      f"{r['ioh']:.2f}"] for r in rows]
            header = ["relation", "head", "dependent", "IoU", "IoD", "IoH"]
            pictures.append(torch.from_numpy(table_image(cells, header, f"image {i}: {parsed.text}")))
            texts.append(f"image {i}: {parsed.text}\n\n| " + " | ".join(header) + " |\n|" + "---|" * len(header)
                         + "\n" + "\n".join("| " + " | ".join(c) + " |" for c in cells))
            out.append({"image": i, "text": parsed.text, "pairs": rows,
                        "table": relation_table(rows)})
        h = max(p.shape[0] for p in pictures)
        w = max(p.shape[1] for p in pictures)
        batch = torch.ones(len(pictures), h, w, 3)
        for i, p in enumerate(pictures):
            batch[i, : p.shape[0], : p.shape[1]] = p
        text, data = "\n\n".join(texts), json.dumps(out, indent=1)
        return io.NodeOutput(batch, text, data, ui={"text": [text], "daam_relations": out})
