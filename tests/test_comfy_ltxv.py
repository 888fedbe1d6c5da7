"""LTXV (LTX-Video) in process against the real ComfyUI host: samplers, ModelPatcher, attention.

The model is the host's own ``LTXVModel`` at a small width with seeded random weights, built through the host's
model detection (``helpers/ltxv_models.py``); the text encoder is the host's LTXV one (its T5-XXL code at a tiny
config, its ``LTXVT5Tokenizer`` with the real T5 vocabulary), so the conditionings carry the padding mask the host
makes. Video latents are ``[B, 128, 3, h, w]`` (three latent frames; LTXV's patch is one latent cell).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.images import (assert_planted_video_maps, assert_same_image, assert_tracing_keeps_the_host_image,
                            with_override)

pytestmark = pytest.mark.host

POS = "a video of a dog running in a green park"
NEG = "blurry, low quality"
FRAMES = 3
CHANNELS = 128


@pytest.fixture(scope="module")
def model(comfy_host):
    from helpers.ltxv_models import build_ltxv

    return build_ltxv(seed=1)


@pytest.fixture(scope="module")
def clip(comfy_host):
    from helpers.ltxv_models import build_tiny_ltxv_clip

    return build_tiny_ltxv_clip(seed=2)


def encode(clip, text):
    import nodes as host_nodes

    return host_nodes.CLIPTextEncode().encode(clip, text)[0]


def t5_tokens(clip, text):
    return [t for c in clip.tokenize(text)["t5xxl"] for t in c]


def ksample(model, positive, negative, batch=1, h=6, w=8, seed=1, steps=1, cfg=3.0):
    import comfy.sample

    latent = torch.zeros(batch, CHANNELS, FRAMES, h, w)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent, denoise=1.0,
                               seed=seed, disable_pbar=True)


def test_tiny_model_is_what_the_host_detects_and_its_text_is_masked(model, clip):
    import comfy.model_detection as md
    import comfy.supported_models as sm

    from daam_core.hosts.comfy.families import dit_spec

    assert type(model.model.model_config) is sm.LTXV
    assert type(md.model_config_from_unet(model.model.diffusion_model.state_dict(), "")) is sm.LTXV
    spec = dit_spec(model.model)
    net = model.model.diffusion_model
    assert spec.family.name == "ltxv" and spec.family.attention == "cross" and spec.family.video
    assert (spec.patch, spec.frame_patch, spec.heads, spec.blocks) == (1, 1, 2, (("block", 2),))
    assert tuple(net.patchifier.patch_size) == (1, 1, 1) and net.transformer_blocks[0].attn2.heads == 2
    cond = encode(clip, POS)
    n = len(t5_tokens(clip, POS))
    mask = cond[0][1]["attention_mask"]
    assert cond[0][0].shape == (1, n, 64) and n == 128  # padded to the tokenizer's 128-token minimum
    assert mask.shape == (1, 128) and 0 < int(mask.sum()) < 128  # the prompt and its end token; padding off


# -- the video is the host's ----------------------------------------------------------------------------------------

def test_traced_video_is_identical_also_under_another_override(pack, model, clip):
    pos, neg = encode(clip, POS), encode(clip, NEG)
    traced_model = assert_tracing_keeps_the_host_image(pack, model, lambda m: ksample(m, pos, neg, batch=2),
                                                       "LTXV")
    assert set(pack.session_of(traced_model).records[-1].recorded.sums) == {"block.0", "block.1"}


# -- exactness ------------------------------------------------------------------------------------------------------

def collector(store):
    """Every attention call's q, k, heads and mask (positional, as ``optimized_attention_masked`` passes it)."""
    def collect(func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        mask = args[4] if len(args) > 4 else kwargs.get("mask")
        store.append(dict(q=args[0].detach().clone(), k=args[1].detach().clone(), heads=args[3],
                          mask=None if mask is None else mask.detach().clone(),
                          kinds=list(options.get("cond_or_uncond", []))))
        return func(*args, **kwargs)

    return collect


def reference_sums(calls, lengths, n_img, layers, n_streams, stream_of, masked=True):
    """fp64 softmax of the video queries over the text keys plus the call's mask, summed over heads, per block.

    A call is the text cross-attention when its keys are as many as the call's conditioning (the self-attention's
    keys are the video); the host runs its blocks in order and names none, so the n-th such call of a model call is
    block n. ``masked=False``: the same without the mask (to show that it matters)."""
    out, index = {}, 0
    for c in calls:
        kinds = c["kinds"]
        t = lengths[kinds[0]]
        if c["k"].shape[1] != t or any(lengths[kind] != t for kind in kinds):
            continue
        q, k = c["q"].double(), c["k"].double()
        b, n, _ = q.shape
        q = q.view(b, n, c["heads"], -1).transpose(1, 2)
        k = k.view(b, t, c["heads"], -1).transpose(1, 2)
        assert n == n_img and c["mask"] is not None and c["mask"].shape == (b, 1, 1, t)
        name = f"block.{index % layers}"
        index += 1
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if masked:
            s = s + c["mask"].double()
        p = s.softmax(-1).sum(1)  # [B, N, T]
        acc = out.setdefault(name, torch.zeros(n_streams, n_img, max(lengths.values()), dtype=torch.float64))
        chunk = b // len(kinds)
        for j, kind in enumerate(kinds):
            for i in range(chunk):
                acc[stream_of(kind, i), :, :t] += p[j * chunk + i]
    return out


def test_recorded_probabilities_equal_fp64_masked_softmax_per_frame(pack, model, clip):
    """Two videos; a positive prompt past T5's 128-token minimum (the host then runs it in a call of its own, its
    mask being of another length) and a short padded negative one."""
    from daam_core.engine.recorder import Stream
    from daam_core.engine.trace import AttentionTrace

    long_pos = POS + ", " + ", ".join(["a small wooden house"] * 30)
    pos, neg = encode(clip, long_pos), encode(clip, NEG)
    lengths = {0: pos[0][0].shape[1], 1: neg[0][0].shape[1]}
    assert lengths[0] > 128 == lengths[1]
    store = []
    traced_model = pack.DAAMTraceModel.execute(with_override(model, collector(store)))[0]
    samples = ksample(traced_model, pos, neg, batch=2, steps=2)
    rec = pack.session_of(traced_model).find(samples).recorded
    hw = 6 * 8  # a 6 x 8 latent frame, one token per cell
    layers = len(model.model.diffusion_model.transformer_blocks)
    stream_of = lambda kind, i: kind * 2 + i  # noqa: E731
    expected = reference_sums(store, lengths, FRAMES * hw, layers, 4, stream_of)
    assert set(rec.sums) == set(expected) == {f"block.{i}" for i in range(layers)}
    trace = AttentionTrace.from_recorder(rec, [], (6 * 32, 8 * 32))
    assert trace.num_images == 2 * FRAMES
    assert trace.streams[:FRAMES + 1] == [Stream(0, "cond", 0), Stream(1, "cond", 0), Stream(2, "cond", 0),
                                          Stream(3, "cond", 0)]
    unmasked = reference_sums(store, lengths, FRAMES * hw, layers, 4, stream_of, masked=False)
    pad = int(neg[0][1]["attention_mask"].sum())  # the negative prompt's first padding position
    for name, ref in expected.items():
        err = (rec.sums[name].double() - ref).abs().max().item()
        assert err <= 1e-5, (name, err)
        assert (unmasked[name] - ref).abs().max() > 0.1  # the mask is what the host's softmax applies
        assert rec.sums[name][2:, :, pad:lengths[1]].abs().max() == 0  # padding keys: no weight
        assert rec.layers[name].kind == "cross"
        # the host's tokens are frame after frame (SymmetricPatchifier's "b c f h w -> b (f h w) c"): frame f of
        # video stream s is rows f*hw .. (f+1)*hw, and it is the trace's image s*F + f
        per_frame = ref.view(4, FRAMES, hw, -1).reshape(4 * FRAMES, hw, -1)
        torch.testing.assert_close(trace.sums[name].double(), per_frame, atol=1e-5, rtol=0)
        assert trace.layers[name].hw == (6, 8)


# -- planted attention ------------------------------------------------------------------------------------------

def planter(daam_override, text_length, keys, frame, region, strength=30.0):
    """An override on top of DAAM's: in every text cross-attention the keys at ``keys`` dominate the queries of
    ``region`` (boolean [h, w]) of frame ``frame`` and vanish for every other video query."""
    hw = region.numel()

    def plant(func, *args, **kwargs):
        q, k, heads = args[0], args[1], args[3]
        if k.shape[1] == text_length:
            qh = q.view(q.shape[0], q.shape[1], heads, -1).clone()
            kh = k.view(k.shape[0], k.shape[1], heads, -1).clone()
            u = torch.zeros(qh.shape[-1], dtype=qh.dtype)
            u[0] = strength
            qh[:] = -u
            rows = torch.nonzero(region.flatten()).flatten() + frame * hw
            qh[:, rows] = u
            kh[:, list(keys)] = u
            args = (qh.reshape(q.shape), kh.reshape(k.shape)) + args[2:]
        return daam_override(func, *args, **kwargs)

    return plant


def test_planted_attention_on_one_frame_is_recovered_per_frame(pack, model, clip):
    from daam_core.hosts.comfy.dit import conditioning_layout
    from daam_core.hosts.comfy.families import dit_spec

    tokens = t5_tokens(clip, POS)
    layout = conditioning_layout(clip.tokenizer, POS, len(tokens), family=dit_spec(model.model).family)
    dog = layout.positions("dog")
    hf = clip.tokenizer.clip_t5xxl.tokenizer
    assert "".join(hf.convert_ids_to_tokens([tokens[p][0] for p in dog])) == "▁dog"  # the host's pieces
    grid = (8, 12)  # a 8 x 12 latent frame, one token per cell
    region = torch.zeros(grid, dtype=torch.bool)
    region[2:6, 3:9] = True
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    to = traced_model.model_options["transformer_options"]
    to["optimized_attention_override"] = planter(to["optimized_attention_override"], len(tokens), dog, 1, region)
    pos, neg = encode(clip, POS), encode(clip, NEG)
    samples = ksample(traced_model, pos, neg, h=8, w=12)
    assert_planted_video_maps(pack, traced_model, clip, samples, POS, NEG, region, FRAMES)


def test_decoded_frames_show_the_maps_of_their_latent_frames(pack, model, clip):
    """LTXV's VAE decodes 3 latent frames to 1 + 8 * 2 = 17 frames: decoded frame 0 shows latent frame 0, frames 1-8
    latent frame 1, frames 9-16 latent frame 2; nothing is copied."""
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    pos, neg = encode(clip, POS), encode(clip, NEG)
    samples = ksample(traced_model, pos, neg)
    n = 1 + 8 * (FRAMES - 1)
    decoded = torch.rand(n, 48, 64, 3, generator=torch.Generator().manual_seed(4))
    per_latent = pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, POS, NEG, "dog, park",
                                           images=decoded[:FRAMES]).result
    masks = pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, POS, NEG, "dog, park",
                                      images=decoded).result[2]
    assert masks.shape == (n * 2, 48, 64)
    latent_of = [-(-d // 8) for d in range(n)]
    for j, i in enumerate(latent_of):
        assert torch.equal(masks[2 * j:2 * j + 2], per_latent[2][2 * i:2 * i + 2])


# -- words, options, errors -----------------------------------------------------------------------------------------

def test_word_positions_follow_the_host_t5_tokenizer(clip, comfy_host):
    """Weights, repeated words and a prompt past the 128-token minimum: positions are the host's own tokens."""
    from daam_core.hosts.comfy.dit import conditioning_layout, text_segments
    from daam_core.hosts.comfy.families import FAMILIES as REGISTRY

    ltxv = next(f for f in REGISTRY if f.name == "ltxv")
    text = "a (cat:1.3) and a dog, " + ", ".join(["a small wooden house"] * 30) + ", a golden dragon"
    tokens = t5_tokens(clip, text)
    assert len(tokens) > 128
    layout = conditioning_layout(clip.tokenizer, text, len(tokens), family=ltxv)
    assert layout.length == len(tokens) and [s.name for s in layout.segments] == ["t5"]
    hf = clip.tokenizer.clip_t5xxl.tokenizer
    pieces = lambda ps, ts=tokens: "".join(hf.convert_ids_to_tokens([ts[p][0] for p in ps]))  # noqa: E731
    dragon = layout.positions("dragon")
    assert dragon[0] > 128 - 8 and pieces(dragon) == "▁dragon"
    assert all(tokens[p][1] == pytest.approx(1.3) for p in layout.positions("cat"))
    assert pieces(layout.positions("house#30")) == "▁house"
    short = t5_tokens(clip, NEG)
    assert len(short) == 128 and short[-1][0] == 0 == hf.pad_token_id  # padded with T5's pad id
    quality = conditioning_layout(clip.tokenizer, NEG, 128, family=ltxv).positions("quality")
    assert pieces(quality, short) == "▁quality"
    assert [("t5", "t5xxl", 128)] in text_segments(clip.tokenizer, clip.tokenizer.tokenize_with_weights(NEG))


def test_block_filter_and_refused_variants(pack, model, clip, comfy_host):
    from daam_core.hosts.comfy.families import dit_spec

    traced_model = pack.DAAMTraceModel.execute(model, blocks="block:1")[0]
    samples = ksample(traced_model, encode(clip, POS), encode(clip, NEG), cfg=1.0)
    rec = pack.session_of(traced_model).find(samples).recorded
    assert set(rec.sums) == {"block.1"} and [s.branch for s in rec.streams] == ["cond"]
    with pytest.raises(ValueError, match="block:2-2 is past the last block block"):
        pack.DAAMTraceModel.execute(model, blocks="block:2")
    other = model.clone()  # LTX-2 (audio + video) runs on LTXV's code in newer hosts: not this family
    config = other.model.model_config.unet_config
    config["image_model"] = "ltxav"
    try:
        with pytest.raises(ValueError, match="cannot trace this model family: 'ltxav'.*DAAM traces .*LTXV"):
            dit_spec(other.model)
    finally:
        config["image_model"] = "ltxv"
    import comfy.sample

    latent = torch.zeros(1, CHANNELS, 6, 8)  # an image latent given to the video model
    with pytest.raises(ValueError, match="latents \\[batch, channels, frames, height, width\\]; got shape"):
        comfy.sample.sample(pack.DAAMTraceModel.execute(model)[0], latent, 1, 1.0, "euler", "normal",
                            encode(clip, POS), [], latent, disable_pbar=True)


def test_text_check_reencodes_with_the_ltxv_clip(pack, model, clip):
    """DAAM Heatmaps re-encodes the prompt with the CLIP it is given: another text of the same tokens is refused."""
    text = POS + ", a golden dragon"
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    samples = ksample(traced_model, encode(clip, text), encode(clip, NEG))
    with pytest.raises(ValueError, match="not the text the sampler's positive conditioning was encoded from"):
        pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, text.replace("golden dragon",
                                                                                      "dragon golden"), NEG, "dog")


def test_image_to_video_noise_mask_keeps_the_video_and_records_every_frame(pack, model, clip):
    """LTXVImgToVideo's way: a noise mask that keeps latent frame 0 gives the model per-token timesteps
    (``denoise_mask``); the traced video is the host's and every frame has maps."""
    import comfy.sample

    pos, neg = encode(clip, POS), encode(clip, NEG)
    latent = torch.randn(1, CHANNELS, FRAMES, 6, 8, generator=torch.Generator().manual_seed(5))
    keep = torch.ones(1, 1, FRAMES, 6, 8)
    keep[:, :, 0] = 0.0  # frame 0 is the given image's
    noise = comfy.sample.prepare_noise(latent, 1)

    def run(m):
        return comfy.sample.sample(m, noise, 2, 3.0, "euler", "normal", pos, neg, latent, denoise=1.0,
                                   noise_mask=keep, seed=1, disable_pbar=True)

    plain = run(model)
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    samples = run(traced_model)
    assert_same_image(plain, samples, "LTXV image-to-video")
    torch.testing.assert_close(samples[:, :, 0], latent[:, :, 0])  # the host kept frame 0 (up to its latent scaling)
    assert not torch.allclose(samples[:, :, 1], latent[:, :, 1])
    masks = pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, POS, NEG, "dog").result[2]
    # without images: 32 pixels per latent cell, LTX-Video's VAE (newer hosts' LTXV latent format says 32 too)
    assert masks.shape == (FRAMES, 6 * 32, 8 * 32) and all(0 < m.float().mean() < 1 for m in masks)


@pytest.mark.parametrize("window", [(0.0, 0.5), (0.25, 0.6)])
def test_time_window_covers_the_steps_of_the_hosts_own_percent(pack, model, clip, window):
    from test_host_time import host_steps

    pos, neg = encode(clip, POS), encode(clip, NEG)
    steps = 8
    full_model = pack.DAAMTraceModel.execute(model)[0]
    full = pack.session_of(full_model).find(ksample(full_model, pos, neg, steps=steps)).recorded
    traced = pack.DAAMTraceModel.execute(model, start_percent=window[0], end_percent=window[1], time_buckets=2)[0]
    samples = ksample(traced, pos, neg, steps=steps)
    assert torch.equal(samples, ksample(model, pos, neg, steps=steps))
    rec = pack.session_of(traced).find(samples).recorded
    expected = host_steps(model, *window, steps=steps)
    assert expected and len(expected) < steps
    for name, n in full.calls.items():
        assert rec.calls[name] == n // steps * len(expected), (name, expected)
        torch.testing.assert_close(rec.time_sums[name].sum(0), rec.sums[name])
