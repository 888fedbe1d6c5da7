"""daam_core: host-independent DAAM engine.

Data flows one way: host hook -> :class:`CrossAttentionRecorder` (running sums) -> :class:`AttentionTrace`
(token and word maps) -> masks, pictures and metrics. ComfyUI is never imported here.
"""

from .recorder import CrossAttentionRecorder, LayerInfo, RecordFilter, Stream
from .tokens import TokenLayout, Word, WordNotFoundError, parse_query, tokenize
from .trace import AttentionTrace, WordHeatMap
from .io import TraceFormatError, load_trace, save_trace
from .diffusers_adapter import DiffusersTrace, trace

__version__ = "0.1.0"

__all__ = [
    "AttentionTrace", "CrossAttentionRecorder", "DiffusersTrace", "LayerInfo", "RecordFilter", "Stream",
    "TokenLayout", "TraceFormatError", "Word", "WordHeatMap", "WordNotFoundError", "load_trace", "parse_query",
    "save_trace", "tokenize", "trace",
]
