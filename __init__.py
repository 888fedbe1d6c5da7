"""comfyui-daam: per-word cross-attention heat maps and masks (DAAM) for ComfyUI."""

from comfy_api.v0_0_2 import ComfyExtension

from .nodes import NODES

WEB_DIRECTORY = "./web"


class DaamExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)


async def comfy_entrypoint() -> DaamExtension:
    """The V3 entry point (ComfyUI >= 0.3.6x): the host registers NODES by their schemas' ids and display names."""
    return DaamExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
