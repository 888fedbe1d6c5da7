"""A real ComfyUI server and a real headless Chromium driven by Playwright.

Chromium is Debian's (``tools/setup_browser.sh`` installs it and Playwright when missing; Playwright's own browser
downloads are not reachable here). Without them the browser tests are skipped, unless ``DAAM_REQUIRE_BROWSER=1``
(CI) makes that a failure. Screenshots go to ``$DAAM_OUT_ARTIFACTS/browser`` or a pytest temporary folder.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from helpers.browser import CHROMIUM_FLAGS, ComfyPage, frontend_root, start_server

# The frontend every test in tests/browser/ runs on: the host's own (its pinned comfyui-frontend-package) and the
# newest on PyPI, served with --front-end-root. ComfyUI 0.3.64's 1.27.10 has its own test in test_preview_ui.py.
FRONTEND_PARAMS = ["host", "1.58.1"]

def _missing(reason: str):
    if os.environ.get("DAAM_REQUIRE_BROWSER") == "1":
        pytest.fail(reason + " (DAAM_REQUIRE_BROWSER=1)")
    pytest.skip(reason + ": run tools/setup_browser.sh")


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        _missing("no chromium on PATH")
    return path


@pytest.fixture(scope="session")
def browser(chromium_path, playwright_driver):
    if playwright_driver is None:
        _missing("playwright is not installed")
    b = playwright_driver.chromium.launch(executable_path=chromium_path, args=CHROMIUM_FLAGS, headless=True)
    yield b
    b.close()


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    root = os.environ.get("DAAM_OUT_ARTIFACTS")
    out = Path(root) / "browser" if root else tmp_path_factory.mktemp("browser-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser screenshots: {out}", file=sys.stderr)
    return out


@pytest.fixture(scope="module", params=FRONTEND_PARAMS)
def frontend(request) -> str | None:
    """None for the host's own frontend, else the comfyui-frontend-package version served."""
    if request.param == "host":
        return None
    if frontend_root(request.param) is None:
        _missing(f"the {request.param} frontend is not set up")
    return request.param


@pytest.fixture(scope="module")
def server(comfyui_dir, sd15_checkpoint, tmp_path_factory, browser, frontend):
    root = frontend_root(frontend) if frontend else None
    with start_server(comfyui_dir, tmp_path_factory.mktemp("comfyui-ui"), sd15_checkpoint,
                      front_end_root=root) as client:
        yield client


@pytest.fixture
def comfy_page(browser, server, artifacts, request, frontend):
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    cp = ComfyPage(page, server, artifacts, frontend)
    yield cp
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        cp.screenshot(f"FAILED-{request.node.name}")
    context.close()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep
