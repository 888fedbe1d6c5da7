"""DAAM on Forge's real backend, in-process (in Forge's own venv): exact probabilities, identical images.

The work runs in ``tests/helpers/forge_backend_check.py`` under Forge's interpreter (its torch and pins differ
from the project's venv); this side asserts on what it reports. See that file for the reference computation.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import forge_env
from helpers.checkpoints import cached_sd15_checkpoint


@pytest.fixture(scope="module")
def result():
    forge_env.require_forge()
    ckpt = cached_sd15_checkpoint()
    script = forge_env.REPO / "tests" / "helpers" / "forge_backend_check.py"
    proc = subprocess.run([str(forge_env.forge_python()), str(script), str(ckpt)], capture_output=True, text=True,
                          env=forge_env.offline_env(), timeout=1200)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("DAAM_RESULT ")]
    assert proc.returncode == 0 and lines, f"check failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("DAAM_RESULT "):])


def test_layouts_are_the_tokens_forge_encoded(result):
    assert result["model"] == "StableDiffusion"
    assert result["layout_ids_equal_forge"] == [True, True, True, True]
    # "a photo of a dog, BREAK ..." is two chunks; the long prompt three; the negatives one each
    assert result["chunks"] == [2, 3, 1, 1]
    assert result["cond_shape"] == [2, 3 * 77, 768] and result["uncond_shape"] == [2, 77, 768]
    assert result["giraffe_positions"] and min(result["giraffe_positions"]) >= 77 * 2  # the third chunk
    assert result["cat_weight"] == [pytest.approx(1.3)]


def test_embedding_positions_are_where_forge_put_its_vectors(result):
    # BOS, "a", then the 3 vectors of "daamstyle", then "portrait of a dog"
    assert result["embedding_fixes"] == {"2": ["daamstyle", 3]}
    assert result["embedding_positions"] == [2, 3, 4]
    assert result["embedding_dog"] == [8]
    assert result["embedding_cond_shape"] == [1, 77, 768]


def test_recorded_probabilities_equal_fp64_reference(result):
    layers = result["layers"]
    # the slim SD1.5 UNet: input 1, 3, middle, output 2-5 (tests/helpers/checkpoints.py)
    assert layers == ["input.1.0", "input.3.0", "middle.0.0", "output.2.0", "output.3.0", "output.4.0", "output.5.0"]
    assert result["ref_layers"] == layers
    assert all(result["calls"][n] == 2 for n in layers)  # two steps, cond and uncond in one model call each
    for name in layers:
        assert result["ref_max"][name] > 1.0  # probabilities summed over 8 heads and 2 steps
        assert result["max_abs_err"][name] < 1e-5 * result["ref_max"][name], name
    assert result["warnings"] == []


def test_image_identical_and_model_untouched(result):
    assert result["patched_is_clone"]
    for side, st in result["latent_stats"].items():  # equal black/NaN latents would prove nothing
        assert st["finite"] and st["std"] > 1e-3, f"Forge's {side} latent is not a real picture: {st}"
    assert result["image_equal"]


def test_wraps_another_extensions_attention_replace(result):
    assert result["third_party_differs_from_plain"]  # the other implementation is really in use
    assert result["third_party_equal"]  # DAAM on top of it changes nothing
    assert result["third_party_recorded"]


def test_time_window_and_word_maps(result):
    assert set(result["window_calls"].values()) == {1}  # start=0.4: only the second of two steps
    assert result["word_maps_shape"] == [2, 128, 192]
    assert result["giraffe_map_max"] == pytest.approx(1.0)  # a word in the third chunk has a real map


def test_flux_is_refused_with_a_clear_message(result):
    msg = result["flux_refusal"]
    assert msg and "IntegratedFluxTransformer2DModel" in msg and "Flux" in msg and "DAAM is off" in msg


def test_a_failing_hook_is_reported_and_the_image_kept(result):
    assert result["failed_hook_equal"]
    errors = result["failed_hook_errors"]
    assert len(errors) == 1 and errors[0].startswith("DAAM stopped recording at layer input.1.0") and "99" in errors[0]
