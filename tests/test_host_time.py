"""The host contract's time: steps, time buckets and the time window on the real ComfyUI host, per family.

Expected steps come from the host itself: the sampling's sigmas (``comfy.samplers.calculate_sigmas``, what
KSampler uses) and the model sampling's ``percent_to_sigma`` read the way ``comfy.samplers`` reads a
timestep-range conditioning (a call at sigma ``s`` runs when ``percent_to_sigma(end) <= s <=
percent_to_sigma(start)``). SD1.5 is a tiny checkpoint; SD3 (shifted flow), Flux (sigma timesteps), Chroma,
Wan (video, shifted flow), Qwen-Image, Flux.2 and HiDream are the host's own model classes at a small width.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.host

POS = "a cat and a dog on a red sofa"
NEG = "blurry, low quality"
STEPS = 8


@pytest.fixture(scope="module")
def families(comfy_host, sd15_checkpoint):
    import comfy.sd
    from comfy.text_encoders.flux import FluxTokenizer
    from comfy.text_encoders.pixart_t5 import PixArtTokenizer
    from comfy.text_encoders.sd3_clip import SD3Tokenizer
    from comfy.text_encoders.qwen_image import QwenImageTokenizer
    from helpers.dit_checkpoints import (WAN_TEXT_DIM, build_chroma, build_flux, build_qwen_image, build_sd3,
                                         build_wan, conditioning, qwen_kept_positions, tiny_umt5_tokenizer)

    import nodes as host_nodes

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint), output_vae=True, output_clip=True)

    def dit_cond(tokenizer, text, seed, flux):
        tokens = tokenizer.tokenize_with_weights(text)
        n = sum(len(c) for c in tokens["t5xxl"]) + (sum(len(c) for c in tokens["l"]) if "g" in tokens else 0)
        c = conditioning(n, seed=seed)
        if flux:
            c[0][1]["guidance"] = 3.5
        return c

    sd3_tok, flux_tok, chroma_tok, wan_tok = SD3Tokenizer(), FluxTokenizer(), PixArtTokenizer(), tiny_umt5_tokenizer()

    def wan_cond(text, seed):
        return conditioning(sum(len(c) for c in wan_tok.tokenize_with_weights(text)["umt5xxl"]),
                            context_dim=WAN_TEXT_DIM, seed=seed)

    qwen_tok = QwenImageTokenizer()

    def qwen_cond(text, seed):
        return conditioning(len(qwen_kept_positions(qwen_tok, text)[1]), seed=seed)

    from helpers.flux2_checkpoints import build_tiny_flux2, flux2_tokenizer
    from helpers.hidream_checkpoints import build_tiny_hidream, hidream_conditioning, hidream_tokenizer

    flux2_tok, hidream_tok = flux2_tokenizer(), hidream_tokenizer()

    def flux2_cond(text, seed):
        return conditioning(sum(len(c) for c in flux2_tok.tokenize_with_weights(text)["mistral3_24b"]), seed=seed)

    return {
        "sd15": dict(model=model, clip=clip, channels=4, pos=host_nodes.CLIPTextEncode().encode(clip, POS)[0],
                     neg=host_nodes.CLIPTextEncode().encode(clip, NEG)[0]),
        "sd3": dict(model=build_sd3(seed=1, depth=2), clip=sd3_tok, channels=16, pos=dit_cond(sd3_tok, POS, 1, False),
                    neg=dit_cond(sd3_tok, NEG, 2, False)),
        "flux": dict(model=build_flux(seed=3, dev=True), clip=flux_tok, channels=16,
                     pos=dit_cond(flux_tok, POS, 1, True), neg=dit_cond(flux_tok, NEG, 2, True)),
        "chroma": dict(model=build_chroma(seed=5), clip=chroma_tok, channels=16,
                       pos=dit_cond(chroma_tok, POS, 1, False), neg=dit_cond(chroma_tok, NEG, 2, False)),
        "wan": dict(model=build_wan(seed=7), clip=wan_tok, channels=16, frames=3, pos=wan_cond(POS, 1),
                    neg=wan_cond(NEG, 2)),
        "qwen_image": dict(model=build_qwen_image(seed=8), clip=qwen_tok, channels=16, frames=1,  # one-frame 5-D
                           pos=qwen_cond(POS, 1), neg=qwen_cond(NEG, 2)),
        "flux2": dict(model=build_tiny_flux2(seed=9, context_dim=64), clip=flux2_tok, channels=128,
                      pos=flux2_cond(POS, 1), neg=flux2_cond(NEG, 2)),
        "hidream": dict(model=build_tiny_hidream(seed=10), clip=hidream_tok, channels=16,
                        pos=hidream_conditioning(hidream_tok, POS, 1), neg=hidream_conditioning(hidream_tok, NEG, 2)),
    }


def sample(f, model, cfg=3.0, steps=STEPS):
    import comfy.sample

    latent = torch.zeros(1, f["channels"], *(f["frames"],) if "frames" in f else (), 6, 8)  # Wan, Qwen-Image: 5-D
    noise = comfy.sample.prepare_noise(latent, 1)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", f["pos"], f["neg"], latent, denoise=1.0,
                               seed=1, disable_pbar=True)


def host_steps(model, start, end, steps=STEPS):
    """The steps the host runs a timestep-range conditioning ``start .. end`` in, from its own sigmas."""
    import comfy.samplers

    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", steps).float()
    high, low = ms.percent_to_sigma(start), ms.percent_to_sigma(end)
    return [i for i in range(steps) if not bool(sigmas[i] > high) and not bool(sigmas[i] < low)]


def recording(pack, model, samples):
    return pack.session_of(model).find(samples).recorded


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux", "chroma", "wan", "qwen_image", "flux2", "hidream"])
def test_time_buckets_split_the_steps_evenly(pack, families, family):
    f = families[family]
    traced = pack.DAAMTraceModel.execute(f["model"], time_buckets=4)[0]
    rec = recording(pack, traced, sample(f, traced))
    assert rec.time_calls
    for name, calls in rec.time_calls.items():
        per_step = rec.calls[name] // STEPS
        assert per_step >= 1 and rec.calls[name] == per_step * STEPS
        assert calls == [2 * per_step] * 4, name  # 8 steps in 4 buckets: 2 steps each
        assert (rec.time_sums[name].sum(dim=(1, 2, 3)) > 0).all()
        torch.testing.assert_close(rec.time_sums[name].sum(0), rec.sums[name])


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux", "chroma", "wan", "qwen_image", "flux2", "hidream"])
@pytest.mark.parametrize("window", [(0.0, 0.5), (0.5, 1.0), (0.6, 1.0), (0.25, 0.6)])
def test_time_window_covers_the_steps_of_the_hosts_own_percent(pack, families, family, window):
    f = families[family]
    full_model = pack.DAAMTraceModel.execute(f["model"])[0]
    full = recording(pack, full_model, sample(f, full_model))
    traced = pack.DAAMTraceModel.execute(f["model"], start_percent=window[0], end_percent=window[1])[0]
    samples = sample(f, traced)
    assert torch.equal(samples, sample(f, f["model"]))  # the traced image is the untraced one
    rec = recording(pack, traced, samples)
    expected = host_steps(f["model"], *window)
    assert expected and len(expected) < STEPS  # each window is a real part of the sampling
    for name, n in full.calls.items():
        assert rec.calls[name] == n // STEPS * len(expected), (name, expected)


@pytest.mark.parametrize("family", ["sd15", "sd3", "wan"])
def test_buckets_and_window_together(pack, families, family):
    f = families[family]
    traced = pack.DAAMTraceModel.execute(f["model"], start_percent=0.5, end_percent=1.0, time_buckets=4)[0]
    rec = recording(pack, traced, sample(f, traced))
    expected = host_steps(f["model"], 0.5, 1.0)
    for name, calls in rec.time_calls.items():
        per_step = rec.calls[name] // len(expected)
        assert calls == [per_step * sum(1 for i in expected if i * 4 // STEPS == b) for b in range(4)]


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux", "chroma", "wan", "qwen_image", "flux2", "hidream"])
def test_negative_words_at_cfg_1_are_a_clear_error(pack, families, family):
    f = families[family]
    traced = pack.DAAMTraceModel.execute(f["model"])[0]
    samples = sample(f, traced, cfg=1.0, steps=1)
    heat = pack.DAAMHeatmaps.execute(traced, f["clip"], {"samples": samples}, POS, NEG, "dog").result[0]
    assert heat.shape[0] == f.get("frames", 1)  # one map per (latent) frame
    with pytest.raises(ValueError, match="negative words \\['blurry'\\] cannot be mapped: .*negative"):
        pack.DAAMHeatmaps.execute(traced, f["clip"], {"samples": samples}, POS, NEG, "dog", negative_words="blurry")


# -- clear messages ------------------------------------------------------------------------------------------------
def test_a_clip_of_another_family_is_named_by_its_width(pack, families):
    """A Flux conditioning of 77 T5 tokens (a short prompt padded to 77, as ComfyUI's T5 did before 256) and the
    SD1.5 CLIP: the token counts agree, the widths do not, and the message says so."""
    from helpers.dit_checkpoints import conditioning

    flux, sd15 = families["flux"], families["sd15"]
    pos = conditioning(77, seed=1)
    pos[0][1]["guidance"] = 3.5
    traced = pack.DAAMTraceModel.execute(flux["model"])[0]
    samples = sample(dict(flux, pos=pos), traced, cfg=1.0, steps=1)
    width = sd15["pos"][0][0].shape[-1]
    assert width != 64
    with pytest.raises(ValueError, match=f"encodes to 77 tokens of width {width} but the sampler's positive "
                                         f"conditioning has 77 tokens of width 64: this CLIP is not the text encoder"):
        pack.DAAMHeatmaps.execute(traced, sd15["clip"], {"samples": samples}, POS, "", "dog")


def test_a_block_range_outside_the_recorded_parts_is_an_error(pack, families):
    model = families["flux"]["model"]
    with pytest.raises(ValueError, match="single:0-0 names 'single' blocks, but unet_parts records only double"):
        pack.DAAMTraceModel.execute(model, unet_parts="double (Flux)", blocks="single:0")
    traced = pack.DAAMTraceModel.execute(model, unet_parts="double (Flux)", blocks="double:0")[0]
    assert pack.session_of(traced).recorder.filter.blocks == (("double", 0, 1),)
