"""The DAAM section in Forge's real Gradio UI, in a real browser (chromium through Playwright)."""

from __future__ import annotations

import pytest

from helpers import forge_env
from helpers.checkpoints import cached_sd15_checkpoint


def test_daam_section_in_txt2img_and_img2img(tmp_path, playwright_driver):
    forge_env.require_forge()
    if playwright_driver is None:
        if forge_env.os.environ.get("DAAM_REQUIRE_FORGE") == "1":
            pytest.fail("playwright is not installed (the browser tests need it)")
        pytest.skip("playwright is not installed; set DAAM_REQUIRE_FORGE=1 to make this a failure")
    from helpers.forge_screenshot import LABELS, capture
    from helpers.forge_server import running_forge

    shot = tmp_path / "daam-section.png"
    with running_forge(tmp_path, cached_sd15_checkpoint(), extension=forge_env.REPO, webui=True) as forge:
        seen = capture(forge.base_url, shot, playwright_driver)
        log = forge.log_text()
    assert seen["labels"] == list(LABELS)
    assert seen["enabled"] is True
    assert seen["img2img_section"] == 1
    assert seen["box"]["width"] > 300 and seen["box"]["height"] > 300  # expanded, not just a header
    assert shot.stat().st_size > 10_000
    # (Forge prints a traceback when a checkout has no "origin" remote; only DAAM's own code matters here)
    assert "Error loading script" not in log and "daam_forge.py" not in log and "daam_core" not in log, log[-3000:]
