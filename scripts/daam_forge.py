"""DAAM for Stable Diffusion WebUI Forge: the extension's only script (Forge runs every ``scripts/*.py``).

It adds the always-visible "DAAM" section to txt2img and img2img and hands every hook to
``daam_core.hosts.forge.extension``. Only the ``daam_core`` package of this repository is imported (under its own
name, from this checkout), so the ComfyUI pack, tests and tools beside it never run inside Forge.
"""

import importlib.util
import os
import sys

import gradio as gr

from modules import scripts


def _import_daam_core():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    package = os.path.join(root, "daam_core")
    loaded = sys.modules.get("daam_core")
    if loaded is not None:
        if os.path.dirname(os.path.abspath(loaded.__file__)) != package:
            raise ImportError(f"another daam_core is already imported from {loaded.__file__}; "
                              f"DAAM's extension needs its own at {package}")
        return
    spec = importlib.util.spec_from_file_location("daam_core", os.path.join(package, "__init__.py"),
                                                  submodule_search_locations=[package])
    module = importlib.util.module_from_spec(spec)
    sys.modules["daam_core"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["daam_core"]
        raise


_import_daam_core()

from daam_core.hosts.forge.extension import TITLE, DaamForge, build_ui  # noqa: E402


class Script(scripts.Script):
    sorting_priority = 20

    def __init__(self):
        super().__init__()
        self.daam = DaamForge()

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return build_ui(gr, is_img2img)

    def process(self, p, *args):
        self.daam.process(p, *args)

    def process_before_every_sampling(self, p, *args, **kwargs):
        self.daam.process_before_every_sampling(p, *args, **kwargs)

    def post_sample(self, p, ps, *args):
        self.daam.post_sample(p)

    def postprocess_batch(self, p, *args, **kwargs):
        self.daam.postprocess_batch(p, images=kwargs.get("images"), batch_number=kwargs.get("batch_number"))

    def postprocess(self, p, processed, *args):
        self.daam.postprocess(p, processed, *args)
