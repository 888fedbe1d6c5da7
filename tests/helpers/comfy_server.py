"""Start a real ComfyUI server for end-to-end tests and talk to it over HTTP.

    with running_comfyui(comfyui_dir, sys.executable, work_dir=tmp_path, checkpoints_dir=ckpt_dir) as client:
        prompt_id = client.queue(api_prompt)
        entry = client.wait(prompt_id, timeout=120)
        assert entry["error"] is None, entry["error"]
        png = client.view(*client.output_images(entry)[0])

The server runs in its own process group on a free 127.0.0.1 port, CPU only, with output/temp/input/user
folders and its database under ``work_dir``; it is always terminated on exit (also on errors and Ctrl-C).
Its stdout/stderr go to ``client.log_path``.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path


class ComfyServerError(RuntimeError):
    pass


def read_log(path, tail_chars: int | None = None) -> str:
    """A server's log file (its last ``tail_chars`` characters), or "" when it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-tail_chars:] if tail_chars else text


# What numpy/torch print when a host turns NaN or inf into pixels: a failure, never a passing black image.
NUMERIC_WARNING = re.compile(r"RuntimeWarning: (invalid value|overflow|divide by zero) encountered[^\n]*")


def numeric_warnings(log: str) -> list[str]:
    """The NaN/inf warnings in a slice of a server log."""
    return [m.group(0) for m in NUMERIC_WARNING.finditer(log)]


def check_numeric_warnings(log: str, what: str) -> None:
    found = numeric_warnings(log)
    assert not found, f"{what}: the host's log warns of non-finite values: {found[:3]}\n{log[-3000:]}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyClient:
    def __init__(self, base_url: str, proc: subprocess.Popen, log_path: Path):
        self.base_url = base_url
        self.proc = proc
        self.log_path = log_path
        self.client_id = uuid.uuid4().hex

    # -- plumbing ------------------------------------------------------------------------------------------

    def _request(self, path: str, data: bytes | None = None, timeout: float = 30.0) -> bytes:
        headers = {"Content-Type": "application/json"} if data is not None else {}
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()

    def _json(self, path: str, timeout: float = 30.0):
        return json.loads(self._request(path, timeout=timeout))

    def log_text(self, tail_chars: int | None = None) -> str:
        return read_log(self.log_path, tail_chars)

    def _check_alive(self):
        if self.proc.poll() is not None:
            raise ComfyServerError(f"ComfyUI exited with code {self.proc.returncode}; log tail:\n"
                                   f"{self.log_text(4000)}")

    # -- API -------------------------------------------------------------------------------------------

    def system_stats(self) -> dict:
        return self._json("/system_stats")

    def object_info(self) -> dict:
        return self._json("/object_info", timeout=60)

    def queue(self, prompt: dict) -> str:
        """POST an API-format workflow; returns its prompt_id. A rejected prompt raises with the server's
        validation errors."""
        body = json.dumps({"prompt": prompt, "client_id": self.client_id}).encode()
        try:
            out = json.loads(self._request("/prompt", data=body))
        except urllib.error.HTTPError as e:
            raise ComfyServerError(f"prompt rejected ({e.code}): {e.read().decode(errors='replace')}") from None
        return out["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self._json(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.2) -> dict:
        """Poll /history until the prompt has finished. Returns its history entry with an added ``error`` key:
        None on success, else the execution error message (node type, id, exception)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            entry = self.history(prompt_id)
            status = (entry or {}).get("status") or {}
            if status.get("completed") or status.get("status_str") == "error":
                entry["error"] = self._error_message(status)
                return entry
            time.sleep(poll)
        try:
            self._request("/interrupt", data=b"{}", timeout=5)
        except OSError:
            pass
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s; log tail:\n{self.log_text(4000)}")

    @staticmethod
    def _error_message(status: dict) -> str | None:
        if status.get("status_str") != "error":
            return None
        for kind, data in status.get("messages", []):
            if kind == "execution_error":
                return (f"{data.get('node_type')} (node {data.get('node_id')}): "
                        f"{data.get('exception_type')}: {data.get('exception_message')}\n"
                        + "".join(data.get("traceback") or []))
        return "execution failed: " + json.dumps(status.get("messages", []))

    @staticmethod
    def output_images(entry: dict) -> list[tuple[str, str, str]]:
        """(filename, subfolder, type) of every image in a history entry's outputs."""
        out = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                out.append((img["filename"], img.get("subfolder", ""), img.get("type", "output")))
        return out

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        return self._request("/view?" + query)

    def run_ok(self, workflow: dict, timeout: float = 900) -> dict:
        """Queue an API workflow, wait for it and fail (with the log's tail) unless it ran without error."""
        start = len(self.log_text())
        entry = self.wait(self.queue(workflow), timeout=timeout)
        assert entry["error"] is None, entry["error"] + "\n" + self.log_text(3000)
        check_numeric_warnings(self.log_text()[start:], "ComfyUI workflow")
        return entry

    def saved_images(self, entry: dict, prefix: str) -> list:
        """``[H, W, 3]`` uint8 arrays of the images a SaveImage with ``filename_prefix=prefix`` (``"daam/mask"``)
        wrote in a run, in order."""
        import numpy as np
        from PIL import Image

        folder, _, name = prefix.rpartition("/")
        pattern = re.compile(re.escape(name) + r"_\d{5}_\.png")
        return [np.asarray(Image.open(io.BytesIO(self.view(filename, subfolder, kind))).convert("RGB"))
                for filename, subfolder, kind in self.output_images(entry)
                if pattern.fullmatch(filename) and subfolder == folder and kind == "output"]


def write_extra_model_paths(path, checkpoints_dir) -> Path:
    """An extra_model_paths.yaml that adds ``checkpoints_dir`` to the host's checkpoint folders."""
    path = Path(path)
    path.write_text(f"daam_tests:\n    checkpoints: {json.dumps(str(Path(checkpoints_dir).resolve()))}\n")
    return path


def _stop(proc: subprocess.Popen, grace: float = 10.0):
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def running_comfyui(comfyui_dir, python, extra_args=(), timeout: float = 180.0, work_dir=None,
                    checkpoints_dir=None):
    """Run ``python main.py --cpu`` in ``comfyui_dir`` and yield a ``ComfyClient`` once /system_stats answers.

    ``work_dir`` (default: a new temporary folder) receives output/, temp/, input/, user/, the database and
    comfyui-server.log. ``checkpoints_dir`` is added as a checkpoint folder through an extra_model_paths.yaml.
    ``timeout`` bounds the start-up.
    """
    comfyui_dir = Path(comfyui_dir)
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="comfyui-e2e-"))
    dirs = {name: work / name for name in ("output", "temp", "input", "user")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
            "--disable-auto-launch",
            "--output-directory", str(dirs["output"]), "--temp-directory", str(dirs["temp"]),
            "--input-directory", str(dirs["input"]), "--user-directory", str(dirs["user"]),
            "--database-url", f"sqlite:///{work / 'comfyui.db'}"]
    if checkpoints_dir is not None:
        args += ["--extra-model-paths-config", str(write_extra_model_paths(work / "extra_model_paths.yaml",
                                                                            checkpoints_dir))]
    args += [str(a) for a in extra_args]

    log_path = work / "comfyui-server.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, cwd=comfyui_dir, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    client = ComfyClient(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            client._check_alive()
            try:
                client._request("/system_stats", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ComfyUI did not answer in {timeout} s; log tail:\n"
                                       f"{client.log_text(4000)}") from None
                time.sleep(0.5)
        yield client
    finally:
        _stop(proc)
