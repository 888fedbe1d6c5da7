"""Studies: a prompt list x seeds -> images, traces and one record per item in a dataset folder.

Layout of a dataset folder::

    study.json                 the settings (checked again on resume)
    images/<id>.png            the generated image
    traces/<id>.safetensors    the trace (+ .json)
    records/<id>.json          one record per item: prompt, seed, status, error, analyses, run facts
    records.jsonl, summary.json  the merge, written once at the end by rank 0

An item is done when its record says ``"status": "ok"``; a rerun skips done items and retries failed ones. Runs
shard over processes with ``torch.distributed`` (``torchrun``, ``accelerate launch``: gloo on CPU, NCCL on GPU):
rank ``r`` of ``n`` takes items ``r, r + n, ...`` and writes only their files; after a barrier rank 0 merges.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

SETTINGS_THAT_MATTER = ("model", "steps", "guidance", "height", "width", "negative", "threshold", "analyses",
                        "parser")


class StudyError(Exception):
    """A study that cannot run as asked (bad prompt file, settings that differ from the dataset's)."""


@dataclass(frozen=True)
class StudyItem:
    """One prompt at one seed. ``id`` names its files: ``p<prompt index>-s<seed>``."""

    id: str
    index: int
    prompt: str
    seed: int
    meta: Mapping[str, Any] = field(default_factory=dict)


def read_prompts(path: str | Path) -> list[dict]:
    """Prompts of a ``.jsonl`` file (objects with ``"prompt"`` and any other fields, kept as metadata) or of a text
    file (one prompt a line; blank lines and lines starting with ``#`` skipped)."""
    p = Path(path)
    if not p.is_file():
        raise StudyError(f"prompt file {p} does not exist")
    out = []
    lines = p.read_text(encoding="utf-8").splitlines()
    if p.suffix == ".jsonl":
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise StudyError(f"{p}:{n}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise StudyError(f"{p}:{n}: each line must be an object with a string \"prompt\"")
            out.append(obj)
    else:
        out = [{"prompt": line.strip()} for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not out:
        raise StudyError(f"{p} holds no prompts")
    return out


def make_items(prompts: Sequence[Mapping], seeds: Sequence[int]) -> list[StudyItem]:
    """Every prompt at every seed, prompt-major; ids stay the same when seeds are added later."""
    if not seeds:
        raise StudyError("no seeds given")
    return [StudyItem(f"p{i:05d}-s{s}", i, str(p["prompt"]), int(s), {k: v for k, v in p.items() if k != "prompt"})
            for i, p in enumerate(prompts) for s in seeds]


# -- processes ------------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    """This process's place in a (possibly one-process) run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @classmethod
    def from_env(cls, timeout_hours: float = 48.0) -> "Dist":
        """Join the process group that ``torchrun`` / ``accelerate launch`` describe in the environment."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(hours=timeout_hours))
        return cls(dist.get_rank(), dist.get_world_size(), local, backend)

    @property
    def device(self) -> str:
        import torch

        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


class Progress:
    """A one-line progress report with rate and ETA, at most every ``every`` seconds (and at the end)."""

    def __init__(self, total: int, label: str = "", stream=None, every: float = 2.0):
        self.total, self.label, self.every = total, label, every
        self.stream = stream or sys.stderr
        self.done = self.failed = 0
        self.t0 = time.monotonic()
        self.last = -1e9

    def step(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def line(self) -> str:
        elapsed = time.monotonic() - self.t0
        rate = elapsed / self.done if self.done else float("nan")
        eta = rate * (self.total - self.done) if self.done else float("nan")
        width = 24
        filled = int(width * self.done / self.total) if self.total else width
        bar = "#" * filled + "." * (width - filled)
        return (f"{self.label}[{bar}] {self.done}/{self.total} items, {self.failed} failed, "
                f"{rate:.2f} s/item, elapsed {_clock(elapsed)}, ETA {_clock(eta)}")


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# -- files ----------------------------------------------------------------------------------------------------------


def _write_json(path: Path, obj) -> None:
    """Write atomically: a killed run leaves either the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def record_path(out: Path, item_id: str) -> Path:
    return out / "records" / f"{item_id}.json"


def read_record(out: Path, item_id: str) -> dict | None:
    p = record_path(out, item_id)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def check_settings(out: Path, settings: Mapping[str, Any]) -> None:
    """Write ``study.json`` or check that the dataset was made with the same settings."""
    p = out / "study.json"
    if p.is_file():
        old = json.loads(p.read_text(encoding="utf-8"))
        diff = {k: (old.get(k), settings.get(k)) for k in SETTINGS_THAT_MATTER if old.get(k) != settings.get(k)}
        if diff:
            listed = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise StudyError(f"{out} holds a study made with other settings ({listed}); use another --out folder")
    else:
        _write_json(p, dict(settings))


# -- running --------------------------------------------------------------------------------------------------------


Generate = Callable[[StudyItem], tuple[np.ndarray, Any]]  # -> (image [H, W, 3] uint8, AttentionTrace)
Analyse = Callable[[StudyItem, np.ndarray, Any], dict]


def run_items(items: Sequence[StudyItem], out: str | Path, generate: Generate, analyse: Analyse | None = None,
              dist: Dist | None = None, retry_failed: bool = True, progress: bool = True,
              save_traces: bool = True) -> dict:
    """Run this rank's share of ``items`` into the dataset folder ``out``; rank 0 merges once all are done.

    Returns this rank's counts (``todo``, ``skipped``, ``ok``, ``failed``) and, on rank 0, ``merged``
    (the :func:`merge` summary).
    """
    from ..engine.render import save_png

    dist = dist or Dist()
    out = Path(out)
    for sub in ("images", "traces", "records"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    mine = list(items)[dist.rank::dist.world]
    todo, skipped = [], 0
    for it in mine:
        rec = read_record(out, it.id)
        if rec is not None and (rec.get("status") == "ok" or (rec.get("status") == "error" and not retry_failed)):
            skipped += 1
        else:
            todo.append(it)
    run_id = uuid.uuid4().hex[:12]
    label = f"rank {dist.rank}/{dist.world}: " if dist.world > 1 else ""
    bar = Progress(len(todo), label) if progress else None
    if progress:
        sys.stderr.write(f"{label}{len(mine)} items, {skipped} already done, {len(todo)} to run\n")
    counts = {"todo": len(todo), "skipped": skipped, "ok": 0, "failed": 0}
    for it in todo:
        t0 = time.monotonic()
        rec: dict[str, Any] = {"id": it.id, "index": it.index, "prompt": it.prompt, "seed": it.seed,
                               "meta": dict(it.meta)}
        try:
            image, trace = generate(it)
            image_file = out / "images" / f"{it.id}.png"
            save_png(image_file, image.astype(np.float32) / 255.0)
            rec["files"] = {"image": f"images/{it.id}.png"}
            if save_traces:
                trace.save(out / "traces" / f"{it.id}.safetensors")
                rec["files"]["trace"] = f"traces/{it.id}.safetensors"
            rec["analysis"] = analyse(it, image, trace) if analyse else {}
            rec["status"] = "ok"
        except Exception as e:  # recorded, and the run goes on with the next item
            rec["status"] = "error"
            rec["error"] = f"{type(e).__name__}: {e}"
            rec["traceback"] = traceback.format_exc(limit=6)
        rec["run"] = {"rank": dist.rank, "world": dist.world, "run_id": run_id,
                      "seconds": round(time.monotonic() - t0, 3), "finished": time.time()}
        _write_json(record_path(out, it.id), rec)
        counts["ok" if rec["status"] == "ok" else "failed"] += 1
        if bar:
            bar.step(rec["status"] == "ok")
    dist.barrier()
    if dist.rank == 0:
        counts["merged"] = merge(out, items)
    dist.barrier()
    return counts


def merge(out: str | Path, items: Sequence[StudyItem]) -> dict:
    """Gather the per-item records of ``items`` into ``records.jsonl`` (item order) and ``summary.json``."""
    out = Path(out)
    ok = failed = missing = 0
    tmp = out / f".records.jsonl.{os.getpid()}.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for it in items:
            rec = read_record(out, it.id)
            if rec is None:
                missing += 1
                continue
            ok += rec.get("status") == "ok"
            failed += rec.get("status") == "error"
            f.write(json.dumps(rec, sort_keys=True) + "\n")
    os.replace(tmp, out / "records.jsonl")
    summary = {"items": len(items), "ok": ok, "failed": failed, "missing": missing}
    _write_json(out / "summary.json", summary)
    return summary


def load_records(out: str | Path) -> list[dict]:
    """The merged records of a dataset folder (or, before the merge, its per-item records in id order)."""
    out = Path(out)
    merged = out / "records.jsonl"
    if merged.is_file():
        return [json.loads(line) for line in merged.read_text(encoding="utf-8").splitlines() if line.strip()]
    files = sorted((out / "records").glob("*.json"))
    if not files:
        raise StudyError(f"{out} holds no study records (records.jsonl or records/*.json)")
    return [json.loads(p.read_text(encoding="utf-8")) for p in files]


# -- the diffusers study ------------------------------------------------------------------------------------------


def diffusers_generator(pipe, steps: int, guidance: float, height: int | None = None, width: int | None = None,
                        negative: str | None = None, device: str = "cpu") -> Generate:
    """Draw an item with a traced diffusers pipeline: ``(image uint8 [H, W, 3], AttentionTrace)``."""
    import torch

    from ..hosts.diffusers.tracing import trace

    def generate(it: StudyItem):
        gen = torch.Generator(device="cpu").manual_seed(it.seed)
        with torch.no_grad(), trace(pipe) as tc:
            img = pipe(it.prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                       height=height, width=width, generator=gen, output_type="np").images[0]
        result = tc.result()
        result.meta.update(prompt=it.prompt, seed=it.seed, steps=steps, guidance=guidance)
        return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), result

    return generate


def item_analyser(analyses: Sequence[str], tau: float = 0.4, parser_model: str | None = None) -> Analyse:
    """Per-item analyses: ``relations`` (syntax pairs, needs spaCy) and ``shapes`` (scores against the shapes
    model's drawn objects; objects from the item's ``objects`` field or read from the prompt)."""
    unknown = set(analyses) - {"relations", "shapes"}
    if unknown:
        raise StudyError(f"unknown analyses {sorted(unknown)}; known: relations, shapes")
    nlp = None
    if "relations" in analyses:
        from .syntax import DEFAULT_MODEL, load_parser

        nlp = load_parser(parser_model or DEFAULT_MODEL)  # fails now, not once per item

    def analyse(it: StudyItem, image: np.ndarray, trace) -> dict:
        out: dict[str, Any] = {}
        if nlp is not None:
            from .relations import relation_pairs
            from .syntax import parse_layout

            parsed = parse_layout(trace.layout(0), nlp)
            out["relations"] = relation_pairs(parsed, trace, 0, tau=tau)
        if "shapes" in analyses:
            from .shapes_truth import objects_in_prompt, score_item

            objects = it.meta.get("objects") or objects_in_prompt(it.prompt)
            out["shapes"] = score_item(trace, image, objects, tau)
        return out

    return analyse
