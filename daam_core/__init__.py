"""daam_core: the DAAM engine, its text side, and one adapter per host.

Data flows one way: host hook -> :class:`AttentionRecorder` (running sums) -> :class:`AttentionTrace`
(token and word maps) -> masks, pictures and metrics.

- :mod:`daam_core.engine`: recording, aggregation, traces, files, masks, pictures, metrics (torch/numpy/OpenCV);
- :mod:`daam_core.text`: prompt syntax, token layouts, word queries;
- :mod:`daam_core.hosts`: one adapter per host (``diffusers``, ``comfy``, ``forge``);
- :mod:`daam_core.shapes`: the project's small shapes model (scenes with exact masks, architecture, weights);
- :mod:`daam_core.cli`: the ``daam`` command.

Importing this package loads the engine and the text side only; ``daam_core.trace`` (the diffusers
``trace(pipe)``) and ``DiffusersTrace`` load the diffusers adapter on first use.
"""

from .engine.geometry import LayerInfo, PatchGrid, UNetGrid
from .engine.recorder import AttentionRecorder, CrossAttentionRecorder, RecordFilter, Recording, Stream
from .engine.io import TraceFormatError
from .engine.trace import AttentionTrace, WordHeatMap, load_trace, save_trace
from .text.layout import TokenLayout, Word
from .text.query import WordNotFoundError, parse_query
from .text.tokenize import tokenize



def _version() -> str:
    """The version in ``pyproject.toml`` (the one place it is written): read beside the package in a checkout or a
    ComfyUI custom-node folder, else from the installed distribution's metadata."""
    import re
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.is_file():
        found = re.search(r'^\[project\][^\[]*?^version\s*=\s*"([^"]+)"', pyproject.read_text(), re.M | re.S)
        if found:
            return found.group(1)
    from importlib import metadata

    try:
        return metadata.version("comfyui-daam")
    except metadata.PackageNotFoundError:
        return "unknown"


__version__ = _version()

_LAZY = {"trace": "trace", "DiffusersTrace": "DiffusersTrace"}  # name -> attribute of hosts.diffusers.tracing
_ALIASES = {"metrics": ".engine.metrics", "masks": ".engine.masks", "render": ".engine.render"}

__all__ = [
    "AttentionTrace", "AttentionRecorder", "CrossAttentionRecorder", "DiffusersTrace", "LayerInfo", "PatchGrid",
    "RecordFilter", "Recording", "Stream", "TokenLayout", "TraceFormatError", "UNetGrid", "Word", "WordHeatMap",
    "WordNotFoundError", "load_trace", "parse_query", "save_trace", "tokenize", "trace",
]


def __getattr__(name):
    import importlib

    if name in _LAZY:
        adapter = importlib.import_module(".hosts.diffusers.tracing", __name__)
        return getattr(adapter, _LAZY[name])
    if name in _ALIASES:  # documented module paths of 0.1 (daam_core.metrics, daam_core.masks, daam_core.render)
        return importlib.import_module(_ALIASES[name], __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
