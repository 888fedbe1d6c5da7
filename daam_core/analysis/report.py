"""``daam report``: a study's records -> the syntax table, entanglement and segmentation figures.

Writes into the report folder: ``report.md`` (all tables), ``report.json`` (the same numbers), one CSV per table,
and PNG plots (``relations.png``: mIoD vs mIoH per relation, ``entanglement.png``, ``examples.png``).
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from .entanglement import cohyponym_summary, shape_similarity
from .relations import relation_table
from .study import load_records


def _mean(values: Iterable[float]) -> float:
    v = [float(x) for x in values if x is not None]
    return sum(v) / len(v) if v else float("nan")


def _ok(records: Sequence[Mapping]) -> list[Mapping]:
    return [r for r in records if r.get("status") == "ok"]


def syntax_pairs(records: Sequence[Mapping]) -> list[Mapping]:
    return [p for r in _ok(records) for p in r.get("analysis", {}).get("relations", [])]


def _group_of(r: Mapping) -> str:
    meta = r.get("meta", {})
    kind = meta.get("kind") or f"{len(r['analysis']['shapes']['objects'])} object(s)"
    return f"{kind}{', positions' if meta.get('positions') else ''}"


def exact_detection(r: Mapping) -> bool:
    """Whether the item's objects can be found exactly: every object has a named colour, all colours differ.

    ``detect_objects`` finds one object per colour, so two objects of one colour (or of colours the prompt does
    not name) cannot both be told apart; such items count for map-only figures, not for object ones.
    """
    objs = r["analysis"]["shapes"]["objects"]
    colors = [o.get("color") for o in objs]
    return all(colors) and len(set(colors)) == len(colors)


def segmentation_table(records: Sequence[Mapping]) -> list[dict]:
    """Per prompt group: how often the image has every named object, and the maps' IoU with the objects
    (items whose objects :func:`exact_detection` can find)."""
    by: dict[str, list[Mapping]] = defaultdict(list)
    for r in _ok(records):
        if "shapes" in r.get("analysis", {}) and exact_detection(r):
            by[_group_of(r)].append(r)
            by["all"].append(r)
    rows = []
    for g in sorted(by, key=lambda k: (k == "all", k)):
        items = by[g]
        objs = [o for r in items for o in r["analysis"]["shapes"]["objects"]]
        rows.append({"group": g, "items": len(items),
                     "drawn_right": _mean(r["analysis"]["shapes"]["drawn_right"] for r in items),
                     "noun_miou": _mean(o.get("noun_iou") for o in objs),
                     "color_miou": _mean(o.get("color_iou") for o in objs),
                     "noun_wrong_miou": _mean(o.get("noun_wrong_iou") for o in objs)})
    return rows


def cohyponym_rows(records: Sequence[Mapping]) -> list[dict]:
    """One row per two-object item: its group (kind, or the unordered shape pair), overlap, both present."""
    out = []
    for r in _ok(records):
        s = r.get("analysis", {}).get("shapes")
        if not s or "noun_overlap" not in s:
            continue
        shapes = sorted(o["shape"] for o in s["objects"])
        exact = exact_detection(r)
        out.append({"kind": r.get("meta", {}).get("kind", "two"), "pair": " + ".join(shapes), "exact": exact,
                    "similarity": s["similarity"], "overlap": s["noun_overlap"],
                    "both_present": s["both_present"] if exact else None})
    return out


def entanglement_tables(records: Sequence[Mapping]) -> tuple[list[dict], list[dict], dict]:
    """(per kind, per shape pair with its similarity, overlap when both objects appear vs when one is missing).

    Per kind, ``both_present`` is n/a where objects cannot be found exactly; the per-pair table and the split
    use only items whose two objects have different named colours.
    """
    all_rows = cohyponym_rows(records)
    by_kind = cohyponym_summary({"group": r["kind"], **r} for r in all_rows)
    rows = [r for r in all_rows if r["exact"]]
    by_pair = cohyponym_summary({"group": r["pair"], **r} for r in rows)
    for row in by_pair:
        row["similarity"] = shape_similarity(*row["group"].split(" + "))
    by_pair.sort(key=lambda x: -x["similarity"])
    split = {"overlap_both_present": _mean(r["overlap"] for r in rows if r["both_present"]),
             "overlap_one_missing": _mean(r["overlap"] for r in rows if not r["both_present"]),
             "items_both_present": sum(bool(r["both_present"]) for r in rows),
             "items_one_missing": sum(not r["both_present"] for r in rows)}
    return by_kind, by_pair, split


def spread_table(records: Sequence[Mapping]) -> list[dict]:
    """Adjective (colour word) spread: the fraction of its mask outside its object, and outside its noun's mask."""
    by: dict[str, list[Mapping]] = defaultdict(list)
    for r in _ok(records):
        s = r.get("analysis", {}).get("shapes")
        if not s:
            continue
        exact = exact_detection(r)
        for o in s["objects"]:
            if o.get("color"):
                key = "one object" if len(s["objects"]) == 1 else "two objects"
                o = {**o, "spread": o.get("spread") if exact else None}  # its object is known only then
                by[key].append(o)
                by["all"].append(o)
    return [{"group": g, "adjectives": len(v), "spread_outside_object": _mean(o.get("spread") for o in v),
             "spread_outside_noun_map": _mean(o.get("spread_map") for o in v)}
            for g, v in sorted(by.items(), key=lambda kv: (kv[0] == "all", kv[0]))]


# -- output ---------------------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no data)\n"
    cols = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: Sequence[Mapping]) -> None:
    if not rows:
        path.write_text("", encoding="utf-8")
        return
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})


def example_grid(dataset: Path, records: Sequence[Mapping], count: int):
    """Image and noun/colour overlays of up to ``count`` items (one per prompt group first), or None."""
    import numpy as np

    from ..engine.trace import load_trace
    from ..engine.render import grid
    from ..engine.render import as_float_image

    picked, seen = [], set()
    ok = [r for r in _ok(records) if r.get("files", {}).get("trace") and "shapes" in r.get("analysis", {})]
    for r in ok:
        g = _group_of(r)
        if g not in seen:
            seen.add(g)
            picked.append(r)
    picked = (picked + [r for r in ok if r not in picked])[:count]
    if not picked:
        return None
    rows, width = [], 0
    for r in picked:
        from PIL import Image

        image = as_float_image(np.asarray(Image.open(dataset / r["files"]["image"]).convert("RGB")))
        tr = load_trace(dataset / r["files"]["trace"])
        words = [w for o in r["analysis"]["shapes"]["objects"] for w in (o.get("color"), o["shape"]) if w]
        words = [w for i, w in enumerate(words) if w not in words[:i]]
        tiles, names = [image], [f"{r['id']}"]
        for w in words:
            tiles.append(tr.word_map(w, image=0).overlay(image))
            names.append(w)
        rows.append((tiles, names))
        width = max(width, len(tiles))
    blank = np.ones_like(rows[0][0][0])
    tiles, names = [], []
    for t, n in rows:
        tiles += t + [blank] * (width - len(t))
        names += n + [""] * (width - len(n))
    return grid(tiles, names, columns=width, min_side=128)


def write_report(dataset: str | Path, out: str | Path, examples: int = 6, min_pairs: int = 5) -> dict:
    """Write the report of the study in ``dataset`` into ``out``; returns its numbers (also ``report.json``)."""
    from ..engine.render import save_png
    from .plots import bars, scatter

    dataset, out = Path(dataset), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = load_records(dataset)
    settings = json.loads((dataset / "study.json").read_text()) if (dataset / "study.json").is_file() else {}
    ok = _ok(records)
    failed = [r for r in records if r.get("status") == "error"]
    result: dict = {"items": len(records), "ok": len(ok), "failed": len(failed),
                    "prompts": len({r["prompt"] for r in records}), "settings": settings}
    md = [f"# Study report: {dataset.name}\n",
          f"{len(records)} items ({result['prompts']} prompts), {len(ok)} ok, {len(failed)} failed. "
          f"Settings: `{json.dumps(settings, sort_keys=True)}`.\n"]
    if failed:
        md.append("Failed items: " + ", ".join(f"{r['id']} ({r.get('error', '?')})" for r in failed[:10]) + "\n")

    pairs = syntax_pairs(records)
    if pairs:
        table = relation_table(pairs, min_pairs=min_pairs)
        result["syntax"] = table
        write_csv(out / "syntax_table.csv", table)
        md += ["## Head/dependent map overlap (the paper's relation table)\n",
               f"Maps thresholded at {settings.get('threshold', 0.4)} of their maximum; IoD = intersection over the "
               "dependent's mask, IoH = over the head's; delta = mIoH - mIoD. Relations with fewer than "
               f"{min_pairs} pairs are left out.\n", markdown_table(table)]
        points = [(row["miod"], row["mioh"], row["group"]) for row in table]
        save_png(out / "relations.png", scatter(points, "mIoD (dependent inside head)", "mIoH",
                                                "head/dependent overlap per relation"))
        md.append("![mIoD vs mIoH per relation](relations.png)\n")

    seg = segmentation_table(records)
    if seg:
        result["segmentation"] = seg
        write_csv(out / "segmentation.csv", seg)
        md += ["## Segmentation against the drawn objects (shapes model)\n",
               "drawn_right: every named object was found with its colour and shape; mIoU of each noun's and colour "
               "word's mask with its object's exact mask (objects found in the image), and of a noun's mask with "
               "the other object (noun_wrong). Only prompts whose objects all have different named colours: objects "
               "are found by colour, one per colour.\n", markdown_table(seg)]
        by_kind, by_pair, split = entanglement_tables(records)
        if by_kind:
            result["entanglement"] = {"by_kind": by_kind, "by_pair": by_pair, **split}
            write_csv(out / "entanglement.csv", by_kind)
            write_csv(out / "entanglement_pairs.csv", by_pair)
            md += ["## Cohyponym entanglement (two-object prompts)\n",
                   "overlap: IoU of the two nouns' masks (all prompts); both_present: both objects found in the image "
                   "(n/a where the two objects share a colour or have none named: they cannot be told apart).\n",
                   markdown_table(by_kind), "\nPer shape pair, prompts with two different named colours (similarity: "
                   "IoU of the two shapes drawn in the same box):\n\n", markdown_table(by_pair, ["group", "similarity", "prompts", "overlap", "both_present"]),
                   f"\nNoun-map overlap when both objects appear: {_fmt(split['overlap_both_present'])} "
                   f"({split['items_both_present']} items); when one is missing: "
                   f"{_fmt(split['overlap_one_missing'])} ({split['items_one_missing']} items).\n"]
            save_png(out / "entanglement.png", bars([r["group"] for r in by_pair],
                                                   {"similarity": [r["similarity"] for r in by_pair],
                                                    "noun overlap": [r["overlap"] for r in by_pair],
                                                    "both present": [r["both_present"] for r in by_pair]},
                                                   "two-object prompts per shape pair"))
            md.append("![entanglement per shape pair](entanglement.png)\n")
        spread = spread_table(records)
        result["adjective_spread"] = spread
        write_csv(out / "adjective_spread.csv", spread)
        md += ["## Adjective spread (colour words)\n",
               "Fraction of a colour word's mask outside its object's mask (objects found in the image; prompts "
               "with different named colours only), and outside its noun's own mask (all prompts).\n", markdown_table(spread)]
    picture = example_grid(dataset, records, examples)
    if picture is not None:
        save_png(out / "examples.png", picture)
        md += ["## Examples\n", "![examples](examples.png)\n"]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    (out / "report.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    return {"report": str(out / "report.md"), "items": result["items"], "ok": result["ok"],
            "failed": result["failed"]}
