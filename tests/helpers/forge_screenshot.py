"""Open Forge's Gradio UI in a real browser (Debian chromium via Playwright), expand the DAAM section of txt2img,
check its controls, and save a screenshot of it.

Used by tests/test_forge_ui.py; run by hand to refresh the README picture:
    python tests/helpers/forge_screenshot.py docs/forge-daam-section.png
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

LABELS = ("Enable DAAM: heat maps and masks of words", "Words or phrases of the prompt",
          "Words of the negative prompt", "Mask threshold (fraction of the word's maximum)",
          "Layer resolutions (of the image size)", "Time window start", "Time window end",
          "With hires fix, maps of the pass", "Add to the gallery")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("no chromium found (apt-get install -y chromium)")


def capture(base_url: str, out: Path, driver=None, timeout_ms: int = 240_000) -> dict:
    """Screenshot of the txt2img DAAM section; returns what was seen (visible labels, section size).

    ``driver`` is a running sync Playwright (the tests' session one); without it one is started here."""
    if driver is None:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as own:
            return capture(base_url, out, own, timeout_ms)
    seen: dict = {}
    browser = driver.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(base_url, timeout=timeout_ms, wait_until="domcontentloaded")
        section = page.locator("#daam_txt2img")
        section.wait_for(state="attached", timeout=timeout_ms)
        section.scroll_into_view_if_needed(timeout=timeout_ms)
        section.locator(".label-wrap").first.click(timeout=timeout_ms)  # expand the accordion
        page.locator("#daam_txt2img_words textarea").wait_for(state="visible", timeout=timeout_ms)
        page.locator("#daam_txt2img_words textarea").fill("dog, red car")
        page.locator("#daam_txt2img_negative_words textarea").fill("blurry")
        page.locator("#daam_txt2img_enabled input").check()
        text = section.inner_text()
        seen["labels"] = [label for label in LABELS if label in text]
        seen["enabled"] = page.locator("#daam_txt2img_enabled input").is_checked()
        seen["img2img_section"] = page.locator("#daam_img2img").count()
        box = section.bounding_box()
        seen["box"] = box
        out.parent.mkdir(parents=True, exist_ok=True)
        section.screenshot(path=str(out))
    finally:
        browser.close()
    return seen


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from helpers import forge_env
    from helpers.checkpoints import cached_sd15_checkpoint
    from helpers.forge_server import running_forge
    import tempfile

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/forge-daam-section.png")
    with tempfile.TemporaryDirectory() as tmp:
        with running_forge(Path(tmp), cached_sd15_checkpoint(), extension=forge_env.REPO, webui=True) as forge:
            print(capture(forge.base_url, target))
