"""Start a real Forge (API only, or with its Gradio UI) on loopback for tests, and talk to it over HTTP.

    with running_forge(work_dir, checkpoint, extension=REPO) as forge:
        r = forge.txt2img(prompt="a dog", steps=2, width=256, height=256)

The server runs from the cached Forge copy with its own venv (``tools/setup_forge.sh``), in its own process group,
on a free 127.0.0.1 port, CPU only, fp32, offline. Everything it writes (config, outputs, models, the extension
link) lives under ``work_dir`` through ``--data-dir``; the extension is a symlink ``extensions/comfyui-daam`` ->
``extension``, the way a clone into ``extensions/`` is laid out. Always terminated on exit. Log: ``forge.log_path``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from . import forge_env
from .comfy_server import check_numeric_warnings, free_port, read_log  # one set of server helpers for both hosts

EXTENSION_NAME = "comfyui-daam"


class ForgeServerError(RuntimeError):
    pass


class ForgeClient:
    def __init__(self, base_url: str, proc: subprocess.Popen, log_path: Path, data_dir: Path):
        self.base_url = base_url
        self.proc = proc
        self.log_path = log_path
        self.data_dir = data_dir

    def request(self, path: str, payload=None, timeout: float = 600.0) -> tuple[int, dict]:
        """``(status, json)``; an HTTP error status is returned, not raised."""
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base_url + path, data=data,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, {"raw": body.decode(errors="replace")}

    def ok(self, path: str, payload=None, timeout: float = 600.0) -> dict:
        status, body = self.request(path, payload, timeout)
        if status != 200:
            raise ForgeServerError(f"{path} -> HTTP {status}: {str(body)[:2000]}\n--- log ---\n{self.log_text(4000)}")
        return body

    def txt2img(self, **payload) -> dict:
        return self.generate("/sdapi/v1/txt2img", payload)

    def img2img(self, **payload) -> dict:
        return self.generate("/sdapi/v1/img2img", payload)

    def generate(self, path: str, payload: dict) -> dict:
        """A generation request; NaN/inf warnings in what the server logged meanwhile fail it."""
        start = len(self.log_text())
        out = self.ok(path, payload)
        check_numeric_warnings(self.log_text()[start:], f"Forge {path}")
        return out

    def alive(self) -> bool:
        try:
            return self.request("/sdapi/v1/samplers", timeout=10)[0] == 200
        except OSError:
            return False

    def log_text(self, tail_chars: int | None = None) -> str:
        return read_log(self.log_path, tail_chars)


def decode_image(b64: str):
    """A base64 PNG from the API as a PIL image."""
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64.split(",", 1)[-1])))


def encode_image(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def daam_args(**values) -> dict:
    """``alwayson_scripts`` entry for the DAAM section (values by name, in the documented order)."""
    names = ("enabled", "words", "negative_words", "threshold", "resolutions", "start", "end", "hires_pass",
             "outputs", "save_trace")
    defaults = dict(enabled=True, words="", negative_words="", threshold=0.4,
                    resolutions=["1/8", "1/16", "1/32", "1/64"], start=0.0, end=1.0, hires_pass="hires",
                    outputs=["heat maps", "overlays", "masks"], save_trace=True)
    unknown = set(values) - set(names)
    if unknown:
        raise KeyError(f"unknown DAAM args {sorted(unknown)}")
    defaults.update(values)
    return {"daam": {"args": [defaults[n] for n in names]}}


@contextmanager
def running_forge(work_dir: Path, checkpoint: Path, extension: Path | None = None, webui: bool = False,
                  timeout: float = 600.0):
    reason = forge_env.missing()
    if reason:
        raise ForgeServerError(reason)
    work_dir = Path(work_dir)
    data_dir = work_dir / "forge-data"
    ckpt_dir = data_dir / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    link = ckpt_dir / Path(checkpoint).name
    if not link.exists():
        link.symlink_to(Path(checkpoint).resolve())
    ext_dir = data_dir / "extensions"
    ext_dir.mkdir(exist_ok=True)
    if extension is not None:
        target = ext_dir / EXTENSION_NAME
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(Path(extension).resolve(), target_is_directory=True)
    port = free_port()
    args = [str(forge_env.forge_python()), "launch.py", "--skip-prepare-environment", "--skip-install",
            "--skip-torch-cuda-test", "--skip-version-check", "--skip-python-version-check", "--always-cpu",
            "--all-in-fp32", "--api", "--server-name", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir),
            "--ckpt-dir", str(ckpt_dir), "--no-download-sd-model", "--disable-nan-check"]
    if not webui:
        args.append("--nowebui")
    log_path = work_dir / "forge.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(args, cwd=forge_env.forge_dir(), stdout=log, stderr=subprocess.STDOUT,
                            env=forge_env.offline_env(), start_new_session=True)
    client = ForgeClient(f"http://127.0.0.1:{port}", proc, log_path, data_dir)
    try:
        deadline = time.monotonic() + timeout
        while not client.alive():
            if proc.poll() is not None:
                raise ForgeServerError(f"Forge exited with {proc.returncode}:\n{client.log_text(6000)}")
            if time.monotonic() > deadline:
                raise ForgeServerError(f"Forge did not answer within {timeout:.0f} s:\n{client.log_text(6000)}")
            time.sleep(1.0)
        yield client
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
