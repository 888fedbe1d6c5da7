"""The browser preview's payload: what DAAM Heatmaps sends to the frontend once per run.

The ``ui`` dict of DAAM Heatmaps carries one ``daam_preview`` entry (ComfyUI's ui values are lists). Per image
of the batch it holds, for every chip the preview offers (each word of the positive and negative prompt, each
occurrence ``dog#2`` of a repeated word, and every phrase the node was asked for):

- ``maps``: the word maps at the latent's resolution (float32), not normalised: mean head-summed probabilities,
  comparable across words, for the hover ranking; the browser normalises them for the overlays as the node does
  (``normalize``) and upsamples them itself;
- ``levels``: at image size, for every pixel, how many of the slider's thresholds ``0.00, 0.01, ..., 1.00`` keep
  it in the mask, computed with :func:`masks.threshold` on the very maps the node's MASK output is cut from.
  The browser's mask at slider step ``i`` is ``levels > i``: exactly the MASK of the next run at that threshold;
- ``time`` (when the model was traced with time buckets): the same maps per part of the sampling (uint8, each
  part scaled by its largest value over all words), for the time scrub; plain DAAM (the refinements' sums are
  kept for the whole sampling only);
- ``other`` (when the trace holds the refinements' sums): ``maps`` and ``levels`` of the other refinement
  setting, so the preview switches between plain and refined maps without a new run: plain DAAM when the node
  refined its maps, else output similarity where it was recorded (joint attention), else the refinements the
  trace allows at :data:`DEFAULT_REFINE` (``refine`` says which).

Binary arrays travel as base64 (``levels`` and ``time`` zlib-compressed), row-major, little-endian.
"""

from __future__ import annotations

import base64
import re
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..daam_core.engine import masks as mask_ops
from ..daam_core.engine.aggregate import finish_maps
from ..daam_core.engine.trace import AttentionTrace
from ..daam_core.hosts.comfy.maps import refined_word_maps

DEFAULT_REFINE = {"propagate_steps": 4, "head_power": 2.0}  # the shown alternative (best one-object fit, docs/benchmarks.md)
PLAIN = {"propagate_steps": 0, "head_power": 0.0, "map_source": "attention", "propagate_at": "each resolution",
         "exclusive": False}
THRESHOLD_STEPS = 100  # the slider's thresholds are i / 100, i = 0..100 (the node's widget step is 0.01)
PAYLOAD_VERSION = 1
_EDGE_PUNCT = re.compile(r"^[^\w]+|[^\w]+$")


@dataclass(frozen=True)
class Entry:
    """One chip of the preview.

    Attributes
    ----------
    key : str
        The query as the node's ``words`` field takes it (``"dog"``, ``"dog#2"``, ``"red car"``).
    prompt : str
        ``"positive"`` or ``"negative"``.
    kind : str
        ``"word"`` (every occurrence), ``"occurrence"`` (one of several) or ``"phrase"`` (asked for by the node).
    """

    key: str
    prompt: str
    kind: str


def _occurrences(layout, text: str, segments: str | None = None) -> int:
    n = 0
    while True:
        try:
            layout.positions(text, n, segments)
        except ValueError:  # WordNotFoundError is a ValueError too
            return n
        n += 1


def prompt_entries(layout, prompt: str, asked: list[str], segments: str | None = None) -> list[Entry]:
    """The chips of one prompt: its words in order (punctuation stripped), the occurrences of repeated words,
    then the node's own queries that are not among them (phrases, occurrences). With ``segments`` (SD3's
    ``"clip"`` or ``"t5"``, HiDream's ``"t5"`` or ``"llama"``) a word counts where it has positions in those
    segments."""
    out: list[Entry] = []
    seen: set[str] = set()

    def add(key, kind):
        if key not in seen:
            seen.add(key)
            out.append(Entry(key, prompt, kind))

    for word in layout.words:
        text = _EDGE_PUNCT.sub("", word.text)
        if not text or text.lower() in seen:
            continue
        n = _occurrences(layout, text, segments)
        if n == 0:
            continue
        add(text, "word")
        seen.add(text.lower())
        if n > 1:
            for k in range(n):
                add(f"{text}#{k + 1}", "occurrence")
    for key in asked:
        add(key, "occurrence" if re.search(r"#\d+\s*$", key) else "phrase" if " " in key.strip() else "word")
    return out


def _b64(data: bytes, compress: bool = False) -> str:
    return base64.b64encode(zlib.compress(data, 6) if compress else data).decode("ascii")


def _time_maps(trace: AttentionTrace, entries: list[Entry], combine: str, image: int,
               segments: str | None = None) -> np.ndarray | None:
    """``[K, E, h, w]`` maps per time bucket from the trace's time sums, or None when traced without them."""
    if not trace.time_sums:
        return None
    out = np.zeros((trace.time_buckets, len(entries), *trace.latent_hw), np.float32)
    for b in range(trace.time_buckets):
        part = trace.at_time(b)
        if part is not None:  # None: nothing recorded in this part of the sampling (e.g. outside the time window)
            out[b] = torch.cat(_latent_maps(part, entries, combine, image, segments)).numpy()
    return out


def _latent_maps(trace: AttentionTrace, entries: list[Entry], combine: str, image: int,
                 segments: str | None = None, asked: dict | None = None, exclusive: bool = False,
                 **refine) -> list[torch.Tensor]:
    """Per prompt (positive, then negative) the ``[E_p, h, w]`` unnormalised maps of its entries at the latent;
    with ``exclusive`` the node's own words (``asked``: prompt -> words) compete as in the node, the other chips
    do not."""
    parts = []
    for prompt, branch in (("positive", "cond"), ("negative", "uncond")):
        keys = [e.key for e in entries if e.prompt == prompt]
        if keys:
            how = dict(image=image, branch=branch, combine=combine, normalize="none", size=trace.latent_hw,
                       missing="zeros", segments=segments, **refine)
            part = refined_word_maps(trace, keys, **how)
            own = [k for k in (asked or {}).get(prompt, []) if k in keys]
            if exclusive and own:
                part[[keys.index(k) for k in own]] = refined_word_maps(trace, own, exclusive=True, **how)
            parts.append(part)
    return parts or [torch.zeros(0, *trace.latent_hw)]


def other_refinement(trace: AttentionTrace, node: dict) -> dict | None:
    """The refinement setting the preview offers besides the node's (``node``, keys as :data:`PLAIN`): plain DAAM
    after refined maps, else output similarity where the trace holds it, else :data:`DEFAULT_REFINE` for the sums
    the trace holds; None when it holds none. Where to propagate does not matter without propagation steps."""
    if {**node, "propagate_at": node["propagate_at"] if node["propagate_steps"] else PLAIN["propagate_at"]} != PLAIN:
        return dict(PLAIN)
    if trace.output_sums:
        return {**PLAIN, "map_source": "output similarity"}
    other = {**PLAIN, "propagate_steps": DEFAULT_REFINE["propagate_steps"] if trace.self_sums else 0,
             "head_power": DEFAULT_REFINE["head_power"] if trace.head_sums else 0.0}
    return other if other != PLAIN else None


def _maps_and_levels(trace, entries, combine, image, segments, normalize, image_hw, asked, **refine) -> dict:
    parts = _latent_maps(trace, entries, combine, image, segments, asked, **refine)  # once; full-size maps from it
    low = torch.cat(parts).float().contiguous()
    full = torch.cat([finish_maps(p, image_hw, normalize) for p in parts])
    if refine.get("exclusive"):  # the node's words compete at image size, as its MASK is cut
        for prompt, branch in (("positive", "cond"), ("negative", "uncond")):
            rows = [i for i, e in enumerate(entries) if e.prompt == prompt and e.key in asked.get(prompt, [])]
            if rows:
                full[rows] = refined_word_maps(trace, [entries[i].key for i in rows], image=image, branch=branch,
                                               combine=combine, normalize=normalize, size=image_hw,
                                               missing="zeros", segments=segments, **refine)
    levels = mask_ops.threshold_levels(full, THRESHOLD_STEPS)  # one pass for all 101 thresholds
    return {"maps": _b64(low.numpy().astype("<f4").tobytes()),
            "levels": _b64(levels.cpu().numpy().tobytes(), compress=True)}


def build_payload(trace: AttentionTrace, words: list[str], negative_words: list[str], *, threshold: float,
                  normalize: str, combine: str, images: list[dict] | None = None, alpha: float = 0.5,
                  segments: str | None = None, propagate_steps: int = 0, head_power: float = 0.0,
                  map_source: str = "attention", propagate_at: str = "each resolution",
                  exclusive: bool = False) -> dict:
    """The ``daam_preview`` payload of one DAAM Heatmaps run.

    Parameters
    ----------
    trace : AttentionTrace
        The run's trace (``image_hw`` is the size of the MASK output); its time sums (when traced with time
        buckets) feed the scrub.
    words, negative_words : list of str
        The node's queries; they start selected.
    threshold, normalize, combine, alpha
        The node's settings, so the preview shows what the node computed.
    images : list of dict, optional
        Per batch image, the ``/view`` reference (filename, subfolder, type) of the decoded image.
    segments : {"both", "clip", "t5", "llama"}, optional
        The node's choice of text segments (SD3), so the chips' maps are the node's.
    propagate_steps, head_power, map_source, propagate_at, exclusive
        The node's refinements (:data:`PLAIN`: plain DAAM); the other setting (:func:`other_refinement`)
        travels as ``other``.
    """
    layouts = [("positive", "cond")] + ([("negative", "uncond")] if "uncond" in trace.branches() else [])
    entries: list[Entry] = []
    for prompt, branch in layouts:
        asked = words if prompt == "positive" else negative_words
        entries += prompt_entries(trace.layout(0, branch), prompt, asked, segments)
    latent_hw, image_hw = tuple(trace.latent_hw), tuple(trace.image_hw)
    per_image = []
    time_meta = None
    mine = {"propagate_steps": int(propagate_steps), "head_power": float(head_power), "map_source": map_source,
            "propagate_at": propagate_at, "exclusive": bool(exclusive)}
    other = other_refinement(trace, mine)
    asked = {"positive": list(words), "negative": list(negative_words)}
    for b in range(trace.num_images):
        item = _maps_and_levels(trace, entries, combine, b, segments, normalize, image_hw, asked, **mine)
        if other is not None:
            item["other"] = _maps_and_levels(trace, entries, combine, b, segments, normalize, image_hw, asked,
                                             **other)
        stack = _time_maps(trace, entries, combine, b, segments)  # [K, E, h, w]
        if stack is not None:
            peak = stack.reshape(stack.shape[0], -1).max(-1)[:, None, None, None]
            q = np.round(np.clip(stack / np.maximum(peak, 1e-12), 0, 1) * 255).astype(np.uint8)
            item["time"] = _b64(q.tobytes(), compress=True)
            k = stack.shape[0]
            time_meta = {"buckets": k, "edges": [round(i / k, 4) for i in range(k + 1)]}
        if images and b < len(images):
            item["image"] = images[b]
        per_image.append(item)
    return {
        "version": PAYLOAD_VERSION,
        "entries": [{"key": e.key, "prompt": e.prompt, "kind": e.kind,
                     "selected": e.key in (words if e.prompt == "positive" else negative_words)} for e in entries],
        "map_hw": list(latent_hw),
        "image_hw": list(image_hw),
        "threshold": float(threshold),
        "threshold_steps": THRESHOLD_STEPS,
        "normalize": normalize,
        "combine": combine,
        "segments": segments or "both",
        "alpha": float(alpha),
        "refine": {"node": mine, "other": other},
        "time": time_meta,
        "images": per_image,
    }
