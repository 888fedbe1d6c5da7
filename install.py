"""Install hook for both hosts: ComfyUI-Manager runs it, and so does Forge / A1111 when it loads the extension.

It runs with the host's own interpreter and installs only the requirements that are missing; torch is never
touched (the host owns it). Any one OpenCV wheel provides ``cv2`` (``opencv-python``, ``opencv-contrib-python``
and their ``-headless`` variants): when one is there, no second one is added, since two OpenCV wheels in one
environment overwrite each other's ``cv2`` files.
Environment: ``DAAM_REQUIREMENTS`` (another requirements file), ``DAAM_INSTALL_DRY_RUN=1`` (print, install nothing).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PROTECTED = {"torch", "torchvision", "torchaudio"}
OPENCV = ("opencv-python", "opencv-contrib-python", "opencv-python-headless", "opencv-contrib-python-headless")


def requirements(path: Path) -> list[str]:
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def installed(name: str) -> str | None:
    """Version of an installed distribution, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def provider(name: str) -> tuple[str, str] | None:
    """``(distribution, version)`` already providing what ``name`` provides (its OpenCV siblings count)."""
    for candidate in (OPENCV if name in OPENCV else (name,)):
        version = installed(candidate)
        if version is not None:
            return candidate, version
    return None


def missing(reqs: list[str]) -> list[str]:
    out = []
    for req in reqs:
        name = name_of(req)
        if name in PROTECTED:
            raise SystemExit(f"install.py: refusing to install {req!r}: torch is provided by the host")
        found = provider(name)
        if found is None:
            out.append(req)
        elif found[0] != name:
            print(f"comfyui-daam: {req} is satisfied by the installed {found[0]} {found[1]} (it provides cv2)")
    return out


def main() -> int:
    path = Path(os.environ.get("DAAM_REQUIREMENTS", Path(__file__).with_name("requirements.txt")))
    todo = missing(requirements(path))
    if not todo:
        print("comfyui-daam: all requirements present, nothing to install")
        return 0
    if os.environ.get("DAAM_INSTALL_DRY_RUN") == "1":
        print(f"comfyui-daam: would install {' '.join(todo)}")
        return 0
    print(f"comfyui-daam: installing {' '.join(todo)}")
    return subprocess.call([sys.executable, "-m", "pip", "install", *todo])


if __name__ == "__main__":
    sys.exit(main())
