"""install.py (the ComfyUI-Manager hook) installs only what is missing and never torch."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(req_text, tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text(req_text)
    env = dict(os.environ, DAAM_REQUIREMENTS=str(req))
    return subprocess.run([sys.executable, str(REPO / "install.py")], env=env, capture_output=True, text=True)


def test_nothing_to_install_when_present(tmp_path):
    r = run((REPO / "requirements.txt").read_text(), tmp_path)
    assert r.returncode == 0 and "nothing to install" in r.stdout


def test_torch_requirement_is_refused(tmp_path):
    r = run("numpy\ntorch>=2.0\n", tmp_path)
    assert r.returncode != 0 and "refusing" in r.stderr and "torch" in r.stderr
