"""The DAAM extension on a real Forge server over its HTTP API (loopback), one server for the whole module.

The extension is installed the way a user's clone is: ``extensions/comfyui-daam`` -> this checkout. Every request
uses the random-weight SD1.5-shaped checkpoint, 2 steps and small sizes. The first request (plain txt2img on the
fresh server) is the reference the later ones are compared with, bit for bit.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from helpers import forge_env
from helpers.images import assert_real_image, assert_same_image
from helpers.checkpoints import cached_sd15_checkpoint

FILLER = ", ".join(f"word{i}" for i in range(40))  # pushes what follows into the second 75-token chunk
PROMPT = f"a photo of a dog, {FILLER}, a red ball"
BASE = dict(prompt=PROMPT, negative_prompt="blurry, lowres", steps=2, width=256, height=192, seed=7,
            sampler_name="Euler", scheduler="Simple", cfg_scale=5.0, batch_size=2, n_iter=1)
KINDS = ("overlay", "heat map", "mask")


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    forge_env.require_forge()
    from helpers.forge_server import running_forge

    with running_forge(tmp_path_factory.mktemp("forge"), cached_sd15_checkpoint(), extension=forge_env.REPO) as f:
        yield f


@pytest.fixture(scope="module")
def plain(forge):
    """Plain txt2img on the fresh server (no DAAM): the reference images."""
    return arrays(forge.txt2img(**BASE))


@pytest.fixture(scope="module")
def traced(forge, plain):
    from helpers.forge_server import daam_args

    r = forge.txt2img(**BASE, alwayson_scripts=daam_args(words="dog, ball, zebra", negative_words="blurry"))
    return r, json.loads(r["info"])


def arrays(response) -> list[np.ndarray]:
    from helpers.forge_server import decode_image

    return [np.asarray(decode_image(b).convert("RGB")) for b in response["images"]]


def daam_images(response, info, first: int):
    """The DAAM gallery entries: (caption, array) after the ``first`` generated images."""
    return list(zip(info["infotexts"][first:], arrays(response)[first:]))


def test_extension_is_listed_with_its_args(forge):
    scripts = forge.ok("/sdapi/v1/scripts")
    assert "daam" in scripts["txt2img"] and "daam" in scripts["img2img"]
    info = [s for s in forge.ok("/sdapi/v1/script-info") if s["name"] == "daam"]
    assert {s["is_img2img"] for s in info} == {False, True}
    labels = [a["label"] for a in info[0]["args"]]
    assert len(labels) == 10 and labels[0].startswith("Enable DAAM"), labels
    log = forge.log_text()
    assert "Error loading script" not in log and "Error running" not in log, log[-3000:]
    assert "daam_forge.py" not in log and "daam_core" not in log, log[-3000:]  # no traceback through DAAM


def test_traced_images_equal_plain_ones(traced, plain):
    r, info = traced
    got = arrays(r)
    assert len(plain) == 2
    for i, (a, b) in enumerate(zip(plain, got[:2])):
        assert a.shape == (192, 256, 3)
        assert_same_image(a, b, f"Forge traced image {i + 1}")


def test_labelled_maps_for_each_image_word_and_kind(traced):
    r, info = traced
    entries = daam_images(r, info, 2)
    expected = [f"DAAM {w} (image {i}, sampling) {k}" for i in (1, 2) for w in ("dog", "ball", "neg: blurry")
                for k in KINDS]
    captions = [c.split(" (threshold")[0] for c, _ in entries]
    assert captions == expected
    for caption, img in entries:
        assert img.shape == (192, 256, 3), caption
    for caption, img in entries:
        if " mask" in caption:
            values = set(np.unique(img).tolist())
            assert values <= {0, 255}, f"{caption}: not a binary mask ({sorted(values)[:8]})"
            assert 255 in values and 0 in values, f"{caption}: the mask is {'empty' if 255 not in values else 'full'}"
        else:
            assert_real_image(img, caption)
    overlays = [img for c, img in entries if c.endswith("overlay")]
    assert not np.array_equal(overlays[0], overlays[1 + 0])  # dog and ball differ


def test_missing_word_is_a_clear_error_and_the_rest_is_served(forge, traced):
    r, info = traced
    err = info["extra_generation_params"]["DAAM error"]
    assert "'zebra' is not in the prompt" in err and "'ball'" in err  # names the word and lists the prompt's
    assert err.count("'zebra' is not in the prompt") == 1  # one message for the batch's one prompt
    assert forge.alive()


def test_saved_trace_reproduces_the_served_masks(forge, traced):
    """Masks served in the gallery equal the engine's threshold of maps recomputed from the saved trace files."""
    from daam_core import load_trace
    from daam_core.engine import masks as mask_ops

    r, info = traced
    out = forge.data_dir / "outputs" / "txt2img-images" / "daam"
    traces = sorted(out.glob("*.safetensors"))
    assert len(traces) == 1 and traces[0].with_suffix(".json").is_file()
    trace = load_trace(traces[0])
    assert trace.num_images == 2 and trace.image_hw == (192, 256) and trace.latent_hw == (24, 32)
    assert min(trace.layout(0).positions("ball")) >= 77  # the second chunk
    served = {c.split(" (threshold")[0]: img for c, img in daam_images(r, info, 2)}
    for i in (0, 1):
        for word, branch, tag in (("dog", "cond", "dog"), ("ball", "cond", "ball"), ("blurry", "uncond", "neg: blurry")):
            heat = trace.word_maps([word], image=i, branch=branch)[0]
            mask = mask_ops.threshold(heat, 0.4).numpy().astype(bool)
            got = served[f"DAAM {tag} (image {i + 1}, sampling) mask"][..., 0] > 127
            assert got.shape == mask.shape and np.array_equal(got, mask), f"mask of {word!r}, image {i + 1}"
    pngs = sorted(p.name for p in out.glob("*-mask.png"))
    assert len(pngs) == 6, pngs


def test_bad_option_is_reported_and_the_image_kept(forge):
    from helpers.forge_server import daam_args

    r = forge.txt2img(**{**BASE, "batch_size": 1, "width": 128, "height": 128},
                      alwayson_scripts=daam_args(words="dog", threshold=2.0))
    info = json.loads(r["info"])
    assert len(r["images"]) == 1  # the generation, nothing else
    assert "threshold must be in [0, 1]" in info["extra_generation_params"]["DAAM error"]


def test_interrupt_then_plain_equals_fresh_server(forge, plain):
    from helpers.forge_server import daam_args

    box = {}

    def run():
        box["r"] = forge.request("/sdapi/v1/txt2img", {**BASE, "steps": 8, "batch_size": 1,
                                                        "alwayson_scripts": daam_args(words="dog")})

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = forge.ok("/sdapi/v1/progress?skip_current_image=true")["state"]
        if state.get("sampling_step", 0) >= 1:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the generation did not start sampling")
    forge.ok("/sdapi/v1/interrupt", {})
    t.join(600)
    status, body = box["r"]
    assert status == 200, body
    assert json.loads(body["info"])["steps"] == 8
    again = arrays(forge.txt2img(**BASE))
    for i, (a, b) in enumerate(zip(plain, again)):
        assert_same_image(a, b, f"image {i + 1} after an interrupted DAAM run")


def test_img2img_inpaints_with_a_daam_mask(forge, traced, plain):
    from PIL import Image

    from helpers.forge_server import daam_args, encode_image

    r, info = traced
    dog_mask = dict(daam_images(r, info, 2))[
        next(c for c in info["infotexts"][2:] if c.startswith("DAAM dog (image 1, sampling) mask"))]
    out = forge.img2img(init_images=[encode_image(Image.fromarray(plain[0]))],
                        mask=encode_image(Image.fromarray(dog_mask)), mask_blur=0, inpainting_fill=1, inpaint_full_res=False,
                        denoising_strength=0.6, **{k: v for k, v in BASE.items() if k != "batch_size"}, batch_size=1,
                        alwayson_scripts=daam_args(words="dog, ball"))
    oi = json.loads(out["info"])
    assert "DAAM error" not in oi["extra_generation_params"], oi["extra_generation_params"]
    imgs = arrays(out)
    assert imgs[0].shape == (192, 256, 3)
    outside = dog_mask[..., 0] == 0
    assert np.array_equal(imgs[0][outside], plain[0][outside])  # inpainting kept everything outside the mask
    entries = daam_images(out, oi, 1)
    assert [c.split(" (threshold")[0] for c, _ in entries] == [
        f"DAAM {w} (image 1, sampling) {k}" for w in ("dog", "ball") for k in KINDS]
    assert all(img.shape == (192, 256, 3) for _, img in entries)


def test_hires_fix_both_passes_with_batch_count(forge):
    from helpers.forge_server import daam_args

    r = forge.txt2img(**{**BASE, "batch_size": 1, "n_iter": 2, "width": 128, "height": 128}, enable_hr=True,
                      hr_scale=1.5, hr_upscaler="Latent", hr_second_pass_steps=2, denoising_strength=0.5,
                      hr_cfg=5.0, hr_additional_modules=["Use same choices"],  # the API leaves them unset
                      alwayson_scripts=daam_args(words="dog", hires_pass="both", outputs=["overlays"]))
    info = json.loads(r["info"])
    assert "DAAM error" not in info["extra_generation_params"], info["extra_generation_params"]
    imgs = arrays(r)
    assert [i.shape for i in imgs[:2]] == [(192, 192, 3)] * 2
    captions = info["infotexts"][2:]
    assert captions == [f"DAAM dog (image 1, {p}) overlay" for _ in range(2)
                        for p in ("first pass, before hires fix", "hires pass")]
    assert all(i.shape == (192, 192, 3) for i in imgs[2:])
    out = forge.data_dir / "outputs" / "txt2img-images" / "daam"
    from daam_core import load_trace

    latents = sorted(load_trace(p).latent_hw for p in out.glob("*-first.safetensors")
                     if load_trace(p).image_hw == (192, 192))
    hires = sorted(load_trace(p).latent_hw for p in out.glob("*-hires.safetensors"))
    assert latents == [(16, 16)] * 2 and hires == [(24, 24)] * 2
