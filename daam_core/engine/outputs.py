"""Writing a trace's pictures to a folder: image, heat maps, overlays, masks, a labelled grid, a summary.

One routine for every front end that writes files (the CLI, studies); file names never leave the folder given.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ..text.query import WordNotFoundError, parse_query
from . import masks as mask_ops
from . import render
from .render import as_float_image
from .trace import AttentionTrace


class WordsError(ValueError):
    """Words that cannot be mapped (none given, or not in a prompt)."""


def file_stem(word: str, taken: set[str]) -> str:
    """A safe, unique file name part for a word (no path separators, no dots)."""
    base = re.sub(r"[^a-z0-9]+", "-", word.lower()).strip("-")[:40] or "word"
    stem, i = base, 2
    while stem in taken:
        stem, i = f"{base}-{i}", i + 1
    taken.add(stem)
    return stem


def check_words(trace: AttentionTrace, words: Sequence[str], branch: str) -> None:
    if not words:
        raise WordsError("no words given: name words or phrases of the prompt, comma separated")
    for i in range(trace.num_images):
        layout = trace.layout(i, branch)
        for w in words:
            text, occurrence = parse_query(w)
            try:
                layout.positions(text, occurrence)
            except WordNotFoundError as e:
                raise WordsError(str(e)) from None


def write_outputs(trace: AttentionTrace, words: Sequence[str], out: Path, images: Sequence[np.ndarray] | None = None,
                  *, branch: str = "cond", threshold: float = 0.4, mode: str = "relative", combine: str = "mean",
                  normalize: str = "minmax", cmap: str = "jet", alpha: float = 0.5, save_trace: bool = True,
                  **refinements) -> dict:
    """Write heat maps, overlays, masks, a labelled grid and (optionally) the trace into ``out``.

    ``refinements``: keyword arguments of :meth:`AttentionTrace.word_maps` that refine the maps (``propagate``,
    ``propagate_at``, ``head_power``, ``source``, ``exclusive``); none = plain DAAM.

    Returns a JSON-safe summary: files written and, per image and word, the mask's area fraction.
    """
    out.mkdir(parents=True, exist_ok=True)
    check_words(trace, words, branch)
    maps = trace.word_maps(list(words), branch=branch, combine=combine, normalize=normalize,
                           **refinements)  # [B, W, H, W]
    binary = mask_ops.threshold(maps, threshold, mode)
    taken: set[str] = set()
    stems = [file_stem(w, taken) for w in words]
    prefix = "" if branch == "cond" else "neg-"
    summary = {"words": list(words), "branch": branch, "threshold": threshold, "mode": mode, "images": []}
    for b in range(maps.shape[0]):
        entry = {"files": [], "mask_area": {}}
        image = as_float_image(images[b]) if images is not None else None
        if image is not None:
            path = out / f"image-{b}.png"
            render.save_png(path, image)
            entry["files"].append(path.name)
        tiles, labels = [], []
        for j, (w, stem) in enumerate(zip(words, stems)):
            heat = render.colorize(maps[b, j], cmap)
            files = {f"{prefix}heat-{b}-{stem}.png": heat, f"{prefix}mask-{b}-{stem}.png": binary[b, j].numpy()}
            if image is not None:
                files[f"{prefix}overlay-{b}-{stem}.png"] = render.overlay(image, maps[b, j], alpha, cmap)
            for name, pic in files.items():
                render.save_png(out / name, pic)
                entry["files"].append(name)
            tiles.append(files.get(f"{prefix}overlay-{b}-{stem}.png", heat))
            labels.append(w)
            entry["mask_area"][w] = float(binary[b, j].mean())
        if image is not None:
            tiles.insert(0, image)
            labels.insert(0, "image")
        path = out / f"{prefix}grid-{b}.png"
        render.save_png(path, render.grid(tiles, labels, min_side=128))
        entry["files"].append(path.name)
        summary["images"].append(entry)
    if save_trace:
        trace.save(out / "trace.safetensors")
        summary["trace"] = "trace.safetensors"
    (out / f"{prefix}summary.json").write_text(json.dumps(summary, indent=1))
    return summary


