"""Where the Forge copy and its venv are, and how to import Forge's backend in-process.

``tools/setup_forge.sh`` builds both under ``$DAAM_CACHE`` (``forge-<commit>/`` and ``forge-venv/``); ``FORGE_DIR``
and ``FORGE_PY`` override them. This module is imported by the pytest side (project venv) and by the helper
scripts that run inside Forge's venv, so it imports nothing but the standard library.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

FORGE_COMMIT = "dfdcbab6"
FORGE_VERSION = "f2.0.1v1.10.1 (lllyasviel/stable-diffusion-webui-forge @dfdcbab6, 2025-06-26)"
REPO = Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    return Path(os.environ.get("DAAM_CACHE") or Path.home() / ".cache" / "comfyui-daam")


def forge_dir() -> Path:
    return Path(os.environ.get("FORGE_DIR") or cache_dir() / f"forge-{FORGE_COMMIT}")


def forge_python() -> Path:
    return Path(os.environ.get("FORGE_PY") or cache_dir() / "forge-venv" / "bin" / "python")


def missing() -> str | None:
    """Why Forge cannot be used here, or None when it is set up."""
    if not (forge_dir() / "launch.py").is_file():
        return f"Forge is not set up at {forge_dir()} (run tools/setup_forge.sh)"
    if not forge_python().is_file():
        return f"Forge's venv is not set up at {forge_python()} (run tools/setup_forge.sh)"
    return None


def offline_env() -> dict[str, str]:
    """Environment for a Forge process: no hub access, the repository importable for the helpers."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    return env


def import_backend(argv: list[str] | None = None):
    """Make Forge's backend importable in this (Forge venv) process: paths, command line, options.

    Returns the Forge folder. Call before importing ``backend`` or ``modules``.
    """
    root = forge_dir()
    for p in (root / "packages_3rdparty", root / "repositories" / "huggingface_guess", root):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.argv = [sys.argv[0]] + (argv if argv is not None else ["--always-cpu", "--all-in-fp32"])
    os.chdir(root)
    from modules import shared

    class _Options:  # what the text engine reads before modules.shared_init would have run
        emphasis = "Original"

    shared.opts = _Options()
    return root


def require_forge() -> None:
    """Skip (locally) or fail (with ``DAAM_REQUIRE_FORGE=1``, as CI sets it) when Forge is not set up."""
    import pytest

    reason = missing()
    if reason is None:
        return
    if os.environ.get("DAAM_REQUIRE_FORGE") == "1":
        pytest.fail(f"{reason}; DAAM_REQUIRE_FORGE=1 says it must be there")
    pytest.skip(f"{reason}; set DAAM_REQUIRE_FORGE=1 to make this a failure")
