"""tools/setup_forge.sh's clone route: without the source archive, Forge and the three repositories its launcher
clones are taken from git at fixed commits. Local repositories stand in for the public ones (no network here)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "setup_forge.sh"

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main",
                           *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def make_repo(path: Path, versions: list[dict[str, str]]) -> list[str]:
    """A repository with one commit per ``{file: text}`` version; returns the commit hashes in order."""
    path.mkdir(parents=True)
    git(path, "init", "-q")
    commits = []
    for files in versions:
        for name, text in files.items():
            (path / name).write_text(text)
        git(path, "add", "-A")
        git(path, "commit", "-q", "-m", "v")
        commits.append(git(path, "rev-parse", "HEAD"))
    return commits


def test_clone_route_checks_out_the_pinned_commits(tmp_path):
    forge = make_repo(tmp_path / "forge.git", [{"launch.py": "print('pinned')\n"}, {"launch.py": "print('newer')\n"}])
    subs = {name: make_repo(tmp_path / f"{name}.git", [{"README": f"{name} 1\n"}, {"README": f"{name} 2\n"}])
            for name in ("huggingface_guess", "assets", "BLIP")}
    env = dict(os.environ, DAAM_CACHE=str(tmp_path / "cache"), FORGE_ARCHIVE=str(tmp_path / "absent.tar.gz"),
               FORGE_COMMIT=forge[0][:8], FORGE_GIT_URL=str(tmp_path / "forge.git"),
               FORGE_HF_GUESS_URL=str(tmp_path / "huggingface_guess.git"), FORGE_HF_GUESS_COMMIT=subs["huggingface_guess"][0],
               FORGE_ASSETS_URL=str(tmp_path / "assets.git"), FORGE_ASSETS_COMMIT=subs["assets"][1],
               FORGE_BLIP_URL=str(tmp_path / "BLIP.git"), FORGE_BLIP_COMMIT=subs["BLIP"][0])
    run = subprocess.run(["bash", str(SCRIPT), "--source-only"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    dest = tmp_path / "cache" / f"forge-{forge[0][:8]}"
    assert run.stdout.strip() == f"FORGE_DIR={dest}"  # stdout carries only the result
    assert "cloning instead" in run.stderr
    assert (dest / "launch.py").read_text() == "print('pinned')\n"  # the pinned commit, not the branch head
    expected = {"huggingface_guess": subs["huggingface_guess"][0],
                "stable-diffusion-webui-assets": subs["assets"][1], "BLIP": subs["BLIP"][0]}
    for name, commit in expected.items():
        assert git(dest / "repositories" / name, "rev-parse", "HEAD") == commit, name
    assert not list((tmp_path / "cache").glob("*.partial.*"))  # no half-made folder left behind

    again = subprocess.run(["bash", str(SCRIPT), "--source-only"], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "cloning" not in again.stderr  # idempotent: the source is there


def test_clone_route_failure_names_the_repository_and_leaves_nothing(tmp_path):
    env = dict(os.environ, DAAM_CACHE=str(tmp_path / "cache"), FORGE_ARCHIVE=str(tmp_path / "absent.tar.gz"),
               FORGE_GIT_URL=str(tmp_path / "no-such-repo.git"))
    run = subprocess.run(["bash", str(SCRIPT), "--source-only"], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and run.stdout == ""
    assert f"cloning {tmp_path / 'no-such-repo.git'} failed" in run.stderr
    assert not (tmp_path / "cache" / "forge-dfdcbab6").exists()
    assert not list((tmp_path / "cache").glob("*.partial.*"))
