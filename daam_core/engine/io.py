"""Trace files: running sums as safetensors, facts as JSON. Only safetensors is ever read; nothing is unpickled.

A trace is written as ``NAME.safetensors`` (the tensors, with the JSON metadata also embedded in the header, so
this one file is enough to load) and ``NAME.json`` beside it for people and tools. This module knows files, not
traces: :mod:`daam_core.engine.trace` turns an :class:`AttentionTrace` into tensors + metadata and back.
"""

from __future__ import annotations

import json
from pathlib import Path

FORMAT = "daam-trace"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: UNet traces whose layers say "location" instead of "part"


class TraceFormatError(ValueError):
    """A file that is not a DAAM trace in safetensors format."""


def _checked(path) -> Path:
    if "\x00" in str(path):
        raise TraceFormatError(f"the trace file name {str(path)!r} contains a NUL byte (\\x00), which no file name "
                               f"can hold")
    return Path(path)


def trace_paths(path) -> tuple[Path, Path]:
    """``(tensors, json)`` paths for a trace name given with or without the ``.safetensors`` suffix."""
    p = _checked(path)
    if p.suffix == ".json":
        p = p.with_suffix("")
    if p.suffix != ".safetensors":
        p = p.with_name(p.name + ".safetensors")
    return p, p.with_suffix(".json")


def write_trace_file(path, tensors: dict, meta: dict) -> Path:
    """Write ``tensors`` (name -> CPU tensor) and ``meta`` (JSON-safe); returns the ``.safetensors`` path.

    Parent folders must exist.
    """
    from safetensors.torch import save_file

    tensors_path, json_path = trace_paths(path)
    meta = {"format": FORMAT, "version": VERSION, **meta}
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tensors_path),
              metadata={"daam": json.dumps(meta)})
    json_path.write_text(json.dumps(meta, indent=1))
    return tensors_path


def read_trace_file(path) -> tuple[dict, dict]:
    """``(tensors, meta)`` of a file written by :func:`write_trace_file`.

    Raises
    ------
    TraceFormatError
        For any file that is not a safetensors DAAM trace (pickles and other formats are refused).
    FileNotFoundError
        When the file does not exist.
    """
    from safetensors import safe_open

    p = _checked(path)
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
    if meta.get("format") != FORMAT or meta.get("version") not in READABLE_VERSIONS:
        raise TraceFormatError(f"{p.name}: unsupported trace format {meta.get('format')} v{meta.get('version')}")
    return tensors, meta
