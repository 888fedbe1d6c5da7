"""Browser-test plumbing: a ComfyUI server set up for the UI and a Playwright page on its frontend."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = "daam_tiny_sd15.safetensors"
PACK_URL = "/extensions/comfyui-daam/"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# First-run dialogs and banners that would cover the canvas; everything else stays at the frontend's defaults.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.VueNodes.Enabled": False, "Comfy.Minimap.Visible": False,
            "Comfy.Workflow.ShowMissingModelsWarning": False, "Comfy.Workflow.ShowMissingNodesWarning": False}


# comfyui-frontend-package versions tools/setup_browser.sh unpacks, and the variable that names each one's folder
FRONTENDS = {"1.27.10": "DAAM_FRONTEND_1_27", "1.58.1": "DAAM_FRONTEND_1_58"}


def frontend_root(version: str) -> Path | None:
    """The static folder of comfyui-frontend-package ``version`` (one of FRONTENDS), if set up."""
    cache = Path(os.environ.get("DAAM_CACHE") or Path.home() / ".cache" / "comfyui-daam")
    path = Path(os.environ.get(FRONTENDS[version]) or cache / "frontends" / version / "static")
    return path if (path / "index.html").is_file() else None


def frontend_1_27() -> Path | None:
    """The static folder of comfyui-frontend-package 1.27.10 (ComfyUI 0.3.64's pin), if set up."""
    return frontend_root("1.27.10")


def start_server(comfyui_dir, work: Path, checkpoint: Path | None, front_end_root: Path | None = None):
    from helpers.comfy_server import running_comfyui

    pack_link = Path(comfyui_dir) / "custom_nodes" / "comfyui-daam"
    if not pack_link.exists():
        pytest.fail(f"the pack is not installed in {pack_link}: run tools/setup_host.sh")
    user = work / "user" / "default"
    user.mkdir(parents=True, exist_ok=True)
    (user / "comfy.settings.json").write_text(json.dumps(SETTINGS))
    ckpts = None
    if checkpoint is not None:
        ckpts = work / "checkpoints"
        ckpts.mkdir(exist_ok=True)
        (ckpts / CHECKPOINT).symlink_to(checkpoint)
    extra = ["--front-end-root", str(front_end_root)] if front_end_root else []
    return running_comfyui(comfyui_dir, sys.executable, extra_args=extra, work_dir=work, checkpoints_dir=ckpts)


class ComfyPage:
    """One browser tab on the ComfyUI frontend, with the console and failed requests recorded."""

    def __init__(self, page, client, artifacts: Path, frontend: str | None = None):
        """``frontend``: the version served with --front-end-root (None: the host's own), checked on open and
        added to screenshot names."""
        self.page, self.client, self.artifacts, self.frontend = page, client, artifacts, frontend
        self.console: list[dict] = []
        self.failed: list[str] = []
        page.on("console", lambda m: self.console.append({"type": m.type, "text": m.text,
                                                          "url": (m.location or {}).get("url", "")}))
        page.on("pageerror", lambda e: self.console.append({"type": "pageerror", "text": f"{e}\n{e.stack or ''}",
                                                            "url": ""}))
        page.on("response", lambda r: self.failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)

    def open(self, vue: bool = False):
        self.page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")  # covers the canvas
        self.page.goto(self.client.base_url + "/")
        self.page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager",
                                    timeout=90_000)
        if self.frontend is not None:
            assert self.page.evaluate("window.__COMFYUI_FRONTEND_VERSION__") == self.frontend
        # the pack's extension is imported before the app finishes setting up; give the import its time
        self.page.wait_for_function("() => app.extensions.some(e => e.name === 'comfyui-daam.preview')",
                                    timeout=30_000)
        # the setting lives on the server, so an earlier test's choice would carry over: set it every time
        if self.page.evaluate("() => app.extensionManager.setting.get('Comfy.VueNodes.Enabled')") != vue:
            self.set_setting("Comfy.VueNodes.Enabled", vue)
        self.page.evaluate("""() => { window.__daamEvents = [];
            for (const t of ['execution_start', 'execution_success', 'execution_error', 'execution_interrupted'])
                window.comfyAPI.api.api.addEventListener(t, (e) => window.__daamEvents.push({type: t, detail: e.detail})); }""")
        return self

    def offers_nodes_2(self) -> bool:
        """Whether this frontend offers Nodes 2.0 to its users (1.27.x, ComfyUI 0.3.64's, only has it as a hidden
        experimental flag)."""
        return self.page.evaluate("() => app.extensionManager.setting.settings['Comfy.VueNodes.Enabled']?.type") \
            == "boolean"

    def set_setting(self, key, value):
        self.page.evaluate("([k, v]) => app.extensionManager.setting.set(k, v)", [key, value])

    def pack_errors(self) -> list[str]:
        """Console errors and failed requests that come from the pack."""
        out = [f"{m['type']}: {m['text']}" for m in self.console
               if m["type"] in ("error", "pageerror") and ("comfyui-daam" in m["text"] + m["url"]
                                                          or "daam" in m["text"].lower())]
        return out + [f for f in self.failed if PACK_URL in f]

    def close_dialogs(self):
        """Close what the frontend pops up on a first visit (templates, release notes): Escape, as a person would."""
        for _ in range(5):  # PrimeVue's mask up to 1.3x; 1.58 marks its overlay with a test id
            if not self.page.locator('.p-dialog-mask, [data-testid="dialog-overlay"]').count():
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(400)

    def load(self, workflow: dict):
        self.close_dialogs()
        self.page.evaluate("wf => app.loadGraphData(wf)", workflow)
        self.page.wait_for_timeout(500)
        self.close_dialogs()

    def node(self, node_type: str) -> int:
        return self.page.evaluate("t => app.graph._nodes.find(n => n.type === t)?.id ?? null", node_type)

    def set_widget(self, node_id: int, name: str, value):
        self.page.evaluate("""([id, name, value]) => { const n = app.graph.getNodeById(id);
            const w = n.widgets.find(w => w.name === name); w.value = value; w.callback?.(value); }""",
                           [node_id, name, value])

    def widget(self, node_id: int, name: str):
        return self.page.evaluate("([id, name]) => app.graph.getNodeById(id).widgets.find(w => w.name === name).value",
                                  [node_id, name])

    def run(self, timeout: float = 600) -> dict:
        """Click the Run button and wait for that prompt to end; returns its /history entry."""
        before = self.page.evaluate("window.__daamEvents.length")
        self.page.locator('[data-testid="queue-button"]').first.click()
        self.page.wait_for_function(
            """n => window.__daamEvents.slice(n).some(e => ['execution_success', 'execution_error',
                   'execution_interrupted'].includes(e.type))""", arg=before, timeout=timeout * 1000)
        events = self.page.evaluate("n => window.__daamEvents.slice(n)", before)
        end = next(e for e in events if e["type"] != "execution_start")
        prompt_id = end["detail"]["prompt_id"]
        deadline = time.monotonic() + 30
        while (entry := self.client.history(prompt_id)) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert end["type"] == "execution_success", json.dumps(end["detail"])[:3000]
        return entry

    def focus(self, node_id: int):
        """Centre the canvas on a node at a zoom that shows it whole."""
        self.page.evaluate("""id => { const n = app.graph.getNodeById(id), c = app.canvas;
            const r = c.canvas.getBoundingClientRect();
            const s = Math.min(1.4, 0.85 * r.height / (n.size[1] + 40), 0.85 * r.width / (n.size[0] + 40));
            c.ds.scale = s;
            c.ds.offset[0] = r.width / (2 * s) - n.pos[0] - n.size[0] / 2;
            c.ds.offset[1] = r.height / (2 * s) - n.pos[1] - n.size[1] / 2 + 20;
            c.setDirty(true, true); }""", node_id)
        self.page.wait_for_timeout(600)

    def screenshot(self, name: str, locator=None) -> Path:
        path = self.artifacts / (f"{name}-frontend-{self.frontend}.png" if self.frontend else f"{name}.png")
        (locator or self.page).screenshot(path=str(path))
        return path
