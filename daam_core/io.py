"""Saving and loading traces: running sums as safetensors, facts as JSON.

A trace is written as ``NAME.safetensors`` (the sums, with the JSON metadata also embedded in the
header, so this one file is enough to load) and ``NAME.json`` beside it for people and tools.
Only safetensors is ever read; nothing is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .recorder import LayerInfo, Stream
from .tokens import TokenLayout

FORMAT = "daam-trace"
VERSION = 1


class TraceFormatError(ValueError):
    """A file that is not a DAAM trace in safetensors format."""


def trace_paths(path) -> tuple[Path, Path]:
    """``(tensors, json)`` paths for a trace name given with or without the ``.safetensors`` suffix."""
    p = Path(path)
    if p.suffix == ".json":
        p = p.with_suffix("")
    if p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    return p, p.with_suffix(".json")


def _metadata(trace) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "layers": [asdict(trace.layers[n]) for n in sorted(trace.sums, key=lambda n: trace.layers[n].order)],
        "calls": {n: trace.calls.get(n, 0) for n in trace.sums},
        "streams": [asdict(s) for s in trace.streams],
        "layouts": [layout.to_dict() for layout in trace.layouts],
        "latent_hw": list(trace.latent_hw),
        "image_hw": list(trace.image_hw),
        "meta": trace.meta,
        "warnings": trace.warnings,
    }


def save_trace(trace, path) -> Path:
    """Write a trace; returns the ``.safetensors`` path. Parent folders must exist."""
    from safetensors.torch import save_file

    tensors_path, json_path = trace_paths(path)
    meta = _metadata(trace)
    text = json.dumps(meta)
    tensors = {f"sums/{i}": trace.sums[layer["name"]].detach().contiguous().cpu()
               for i, layer in enumerate(meta["layers"])}
    save_file(tensors, str(tensors_path), metadata={"daam": text})
    json_path.write_text(json.dumps(meta, indent=1))
    return tensors_path


def load_trace(path):
    """Read a trace written by :func:`save_trace`.

    Raises
    ------
    TraceFormatError
        For any file that is not a safetensors DAAM trace (pickles and other formats are refused).
    FileNotFoundError
        When the file does not exist.
    """
    from safetensors import safe_open

    from .trace import AttentionTrace

    p = Path(path)
    if p.suffix != ".safetensors":
        raise TraceFormatError(f"{p.name}: only .safetensors traces can be loaded (refusing {p.suffix or 'no suffix'})")
    if not p.is_file():
        raise FileNotFoundError(f"no trace at {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
            if "daam" not in header:
                raise TraceFormatError(f"{p.name} is a safetensors file but not a DAAM trace (no 'daam' metadata)")
            meta = json.loads(header["daam"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except TraceFormatError:
        raise
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise TraceFormatError(f"{p.name} is not a valid safetensors file: {e}") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise TraceFormatError(f"{p.name}: unsupported trace format {meta.get('format')} v{meta.get('version')}")
    layers = {d["name"]: LayerInfo(**{**d, "hw": tuple(d["hw"])}) for d in meta["layers"]}
    sums = {d["name"]: tensors[f"sums/{i}"] for i, d in enumerate(meta["layers"])}
    return AttentionTrace(
        sums=sums, layers=layers, calls={k: int(v) for k, v in meta["calls"].items()},
        streams=[Stream(**s) for s in meta["streams"]],
        layouts=[TokenLayout.from_dict(d) for d in meta["layouts"]],
        latent_hw=tuple(meta["latent_hw"]), image_hw=tuple(meta["image_hw"]),
        meta=meta.get("meta", {}), warnings=list(meta.get("warnings", [])))
