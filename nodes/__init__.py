"""ComfyUI adapter of comfyui-daam: V3 node classes over daam_core."""

from .nodes import NODES

__all__ = ["NODES"]
