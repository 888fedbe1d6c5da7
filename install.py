"""ComfyUI-Manager install hook: installs the pack's missing requirements with the host's interpreter.

Only what is missing is installed, and torch is never touched (the host owns it).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PROTECTED = {"torch", "torchvision", "torchaudio"}


def requirements(path: Path) -> list[str]:
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def missing(reqs: list[str]) -> list[str]:
    out = []
    for req in reqs:
        name = name_of(req)
        if name in PROTECTED:
            raise SystemExit(f"install.py: refusing to install {req!r}: torch is provided by the host")
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            out.append(req)
    return out


def main() -> int:
    path = Path(os.environ.get("DAAM_REQUIREMENTS", Path(__file__).with_name("requirements.txt")))
    todo = missing(requirements(path))
    if not todo:
        print("comfyui-daam: all requirements present, nothing to install")
        return 0
    print(f"comfyui-daam: installing {' '.join(todo)}")
    return subprocess.call([sys.executable, "-m", "pip", "install", *todo])


if __name__ == "__main__":
    sys.exit(main())
