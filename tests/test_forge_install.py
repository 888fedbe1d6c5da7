"""install.py in a host that already has an OpenCV wheel: any of the four provides cv2, none is added.

Each case is a throwaway venv (no pip, no packages) whose site-packages holds the ``.dist-info`` metadata a real
install of the listed distributions leaves; ``importlib.metadata`` in that venv's interpreter sees exactly them.
``DAAM_INSTALL_DRY_RUN=1`` makes install.py print what it would install instead of calling pip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OPENCV = ("opencv-python", "opencv-contrib-python", "opencv-python-headless", "opencv-contrib-python-headless")
BASE = {"numpy": "1.26.2", "safetensors": "0.4.2"}


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    py = root / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    return py, Path(purelib)


def fake_dist(site: Path, name: str, version: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text("")


def run_install(py: Path, site: Path, dists: dict[str, str]):
    for child in site.glob("*.dist-info"):
        for f in child.iterdir():
            f.unlink()
        child.rmdir()
    for name, version in dists.items():
        fake_dist(site, name, version)
    env = dict(os.environ, DAAM_INSTALL_DRY_RUN="1")
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(py), str(REPO / "install.py")], capture_output=True, text=True, env=env, cwd=REPO)


@pytest.mark.parametrize("opencv", OPENCV)
def test_any_opencv_wheel_satisfies_the_requirement(bare_venv, opencv):
    py, site = bare_venv
    r = run_install(py, site, {**BASE, opencv: "4.11.0.86"})
    assert r.returncode == 0, r.stderr
    assert "nothing to install" in r.stdout, r.stdout
    if opencv != "opencv-python-headless":
        assert f"satisfied by the installed {opencv} 4.11.0.86" in r.stdout


def test_headless_is_installed_when_no_opencv_is_there(bare_venv):
    py, site = bare_venv
    r = run_install(py, site, dict(BASE))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("would install opencv-python-headless>=4.8"), r.stdout


def test_only_the_missing_requirements_are_listed(bare_venv):
    py, site = bare_venv
    r = run_install(py, site, {"opencv-contrib-python": "4.10.0.84"})
    assert "would install numpy>=1.24 safetensors>=0.4" in r.stdout, r.stdout
    assert "opencv" not in r.stdout.split("would install", 1)[1]


def test_the_venv_sees_only_its_fake_metadata(bare_venv):
    """The check above is meaningful only if the bare venv does not see the project's own packages."""
    py, site = bare_venv
    run_install(py, site, {})
    # cwd outside the checkout: `-c` puts the cwd on sys.path, and an editable install leaves its egg-info there
    r = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(sorted(d.metadata['Name'] for d in "
                        "m.distributions()))"], capture_output=True, text=True, cwd=site)
    assert r.stdout.strip() == "[]", r.stdout


def test_forge_venv_needs_nothing(tmp_path):
    """With Forge's own interpreter (its venv ships opencv-python), install.py adds no second OpenCV wheel."""
    from helpers import forge_env

    forge_env.require_forge()
    env = dict(forge_env.offline_env(), DAAM_INSTALL_DRY_RUN="1")
    r = subprocess.run([str(forge_env.forge_python()), str(REPO / "install.py")], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "satisfied by the installed opencv-python" in r.stdout and "nothing to install" in r.stdout, r.stdout
