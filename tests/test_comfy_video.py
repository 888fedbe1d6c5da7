"""Wan 2.1 / 2.2 video models in process against the real ComfyUI host: samplers, ModelPatcher, attention.

The models are the host's own ``WanModel`` at a small width with seeded random weights, built through the host's
model detection (``helpers/dit_checkpoints.py``); the words come from the host's own Wan tokenizer object around a
small SentencePiece model trained in the test (``tiny_umt5_tokenizer``), and the conditionings are hand-made
tensors of the token count that tokenizer gives. Video latents are ``[B, 16, 3, h, w]`` (three latent frames).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.images import assert_planted_video_maps, assert_same_image, with_override

pytestmark = pytest.mark.host

POS = "a video of a dog running in a green park"
NEG = "blurry, low quality"
FAMILIES = ("wan21", "wan21-i2v", "wan22")
FRAMES = 3


@pytest.fixture(scope="module")
def models(comfy_host):
    from helpers.dit_checkpoints import build_wan

    return {"wan21": build_wan(seed=1), "wan21-i2v": build_wan(seed=2, i2v=True),
            "wan22": build_wan(seed=3, wan22=True)}


@pytest.fixture(scope="module")
def tokenizer(comfy_host):
    from helpers.dit_checkpoints import tiny_umt5_tokenizer

    return tiny_umt5_tokenizer()


def token_count(tokenizer, text):
    return sum(len(c) for c in tokenizer.tokenize_with_weights(text)["umt5xxl"])


def cond(family, tokenizer, text, seed, batch=1):
    """A Wan conditioning of the host tokenizer's length; I2V also gets a CLIP-vision image prompt."""
    import comfy.clip_vision
    from helpers.dit_checkpoints import WAN_TEXT_DIM, conditioning

    c = conditioning(token_count(tokenizer, text), context_dim=WAN_TEXT_DIM, seed=seed, batch=batch)
    if family.endswith("i2v"):
        vision = comfy.clip_vision.Output()
        vision["penultimate_hidden_states"] = torch.randn(batch, 257, 1280, generator=torch.Generator().manual_seed(9))
        c[0][1]["clip_vision_output"] = vision
    return c


def ksample(model, positive, negative, batch=1, h=6, w=8, seed=1, steps=1, cfg=3.0, channels=16):
    import comfy.sample

    latent = torch.zeros(batch, channels, FRAMES, h, w)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent, denoise=1.0,
                               seed=seed, disable_pbar=True)


def channels_of(family):
    return 48 if family == "wan22" else 16



def test_tiny_models_are_what_the_host_detects_from_their_weights(models):
    import comfy.model_detection as md
    import comfy.supported_models as sm

    expected = {"wan21": sm.WAN21_T2V, "wan21-i2v": sm.WAN21_I2V, "wan22": sm.WAN22_T2V}
    for family, model in models.items():
        assert type(model.model.model_config) is expected[family], family
        assert type(md.model_config_from_unet(model.model.diffusion_model.state_dict(), "")) is expected[family]


# -- the video is the host's ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_traced_video_is_identical_also_under_another_override(pack, models, tokenizer, family):
    model, ch = models[family], channels_of(family)
    pos, neg = cond(family, tokenizer, POS, 1, batch=2), cond(family, tokenizer, NEG, 2, batch=2)
    plain = ksample(model, pos, neg, batch=2, channels=ch)
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    traced = ksample(traced_model, pos, neg, batch=2, channels=ch)
    assert_same_image(plain, traced, f"{family} traced sampling")
    assert all("forward" not in vars(m) for m in model.model.diffusion_model.modules())
    assert pack.session_of(traced_model).records[-1].recorded.sums

    seen = []

    def other(func, *args, **kwargs):
        seen.append(1)
        return func(*args, **kwargs) * 0.5

    expected = ksample(with_override(model, other), pos, neg, batch=2, channels=ch)
    n = len(seen)
    got = ksample(pack.DAAMTraceModel.execute(with_override(model, other))[0], pos, neg, batch=2, channels=ch)
    assert_same_image(expected, got, f"{family} traced sampling under another override")
    assert len(seen) == 2 * n and not torch.equal(expected, plain)


# -- exactness ------------------------------------------------------------------------------------------------------

def collector(store):
    def collect(func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        store.append(dict(q=args[0].detach().clone(), k=args[1].detach().clone(), heads=kwargs.get("heads", None)
                          if len(args) < 4 else args[3], kinds=list(options.get("cond_or_uncond", []))))
        return func(*args, **kwargs)

    return collect


def reference_sums(calls, lengths, n_img, layers, n_streams, stream_of):
    """fp64 softmax of the video queries over the text keys, summed over heads, per block.

    A call is the text cross-attention when its keys are as many as the call's conditioning (the self-attention's
    keys are the video, I2V's image prompt has 257); the host runs its blocks in order and names none, so the
    n-th such call of a model call is block n."""
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
        assert n == n_img
        name = f"block.{index % layers}"
        index += 1
        p = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1).sum(1)  # [B, N, T]
        acc = out.setdefault(name, torch.zeros(n_streams, n_img, max(lengths.values()), dtype=torch.float64))
        chunk = b // len(kinds)
        for j, kind in enumerate(kinds):
            for i in range(chunk):
                acc[stream_of(kind, i), :, :t] += p[j * chunk + i]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_probabilities_equal_fp64_reference_per_frame(pack, models, tokenizer, family):
    """Two videos; a positive prompt longer than umT5's 512-token pad (the host then runs it in its own call)."""
    from daam_core.engine.recorder import Stream
    from daam_core.engine.trace import AttentionTrace

    model, ch = models[family], channels_of(family)
    long_pos = POS + ", " + ", ".join(["a small wooden house"] * 40)
    pos, neg = cond(family, tokenizer, long_pos, 1), cond(family, tokenizer, NEG, 2)
    lengths = {0: pos[0][0].shape[1], 1: neg[0][0].shape[1]}
    assert lengths[0] > 512 == lengths[1]
    store = []
    traced_model = pack.DAAMTraceModel.execute(with_override(model, collector(store)))[0]
    samples = ksample(traced_model, pos, neg, batch=2, channels=ch)
    rec = pack.session_of(traced_model).find(samples).recorded
    hw = 3 * 4  # a 6 x 8 latent frame in 2 x 2 patches
    layers = len(model.model.diffusion_model.blocks)
    expected = reference_sums(store, lengths, FRAMES * hw, layers, 4, lambda kind, i: kind * 2 + i)
    assert set(rec.sums) == set(expected) == {f"block.{i}" for i in range(layers)}
    if family.endswith("i2v"):  # the image-prompt attention ran and was not taken for the text
        assert any(c["k"].shape[1] == 257 for c in store)
    trace = AttentionTrace.from_recorder(rec, [], (48, 64))
    assert trace.num_images == 2 * FRAMES
    assert trace.streams[:FRAMES + 1] == [Stream(0, "cond", 0), Stream(1, "cond", 0), Stream(2, "cond", 0),
                                          Stream(3, "cond", 0)]
    for name, ref in expected.items():
        torch.testing.assert_close(rec.sums[name].double(), ref, atol=1e-5, rtol=0)
        assert rec.layers[name].kind == "cross"
        # the host's tokens are frame after frame (patch_embedding's [B, C, F, h, w] flattened): frame f of video
        # stream s is rows f*hw .. (f+1)*hw, and it is the trace's image s*F + f
        per_frame = ref.view(4, FRAMES, hw, -1).reshape(4 * FRAMES, hw, -1)
        torch.testing.assert_close(trace.sums[name].double(), per_frame, atol=1e-5, rtol=0)
        assert trace.layers[name].hw == (3, 4)


# -- planted attention ------------------------------------------------------------------------------------------

def planter(daam_override, text_length, keys, frame, region, strength=30.0):
    """An override on top of DAAM's: in every text cross-attention the keys at ``keys`` dominate the queries of
    ``region`` (boolean [h, w]) of frame ``frame`` and vanish for every other video query."""
    hw = region.numel()

    def plant(func, *args, **kwargs):
        q, k, heads = args[0], args[1], kwargs.get("heads", args[3] if len(args) > 3 else None)
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


def test_planted_attention_on_one_frame_is_recovered_per_frame(pack, models, tokenizer):
    from daam_core.hosts.comfy.dit import conditioning_layout

    from daam_core.hosts.comfy.families import dit_spec

    model = models["wan21"]
    count = token_count(tokenizer, POS)
    layout = conditioning_layout(tokenizer, POS, count, family=dit_spec(model.model).family)
    dog = layout.positions("dog")
    tokens = [t for c in tokenizer.tokenize_with_weights(POS)["umt5xxl"] for t in c]
    assert len(dog) > 1 and "".join(tokenizer.clip_umt5xxl.tokenizer.tokenizer.id_to_piece(tokens[p][0])
                                    for p in dog) == "▁dog"  # the host's pieces of the word
    grid = (8, 12)  # a 16 x 24 latent frame in 2 x 2 patches
    region = torch.zeros(grid, dtype=torch.bool)
    region[2:6, 3:9] = True
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    to = traced_model.model_options["transformer_options"]
    to["optimized_attention_override"] = planter(to["optimized_attention_override"], count, dog, 1, region)
    pos, neg = cond("wan21", tokenizer, POS, 1), cond("wan21", tokenizer, NEG, 2)
    samples = ksample(traced_model, pos, neg, h=16, w=24)
    assert_planted_video_maps(pack, traced_model, tokenizer, samples, POS, NEG, region, FRAMES)
    with pytest.raises(ValueError, match="4 images given for a sampling of 1 video\\(s\\) of 3 latent frames"):
        pack.DAAMHeatmaps.execute(traced_model, tokenizer, {"samples": samples}, POS, NEG, "dog",
                                     images=torch.rand(4, 128, 192, 3))


def test_decoded_frames_show_the_maps_of_their_latent_frames(pack, models, tokenizer, tmp_path):
    """Wan's VAE decodes 3 latent frames to 1 + 4 * 2 = 9 frames (its upscale ratio ``a * 4 - 3``): decoded frame 0
    shows latent frame 0, frames 1-4 latent frame 1, frames 5-8 latent frame 2; nothing is copied."""
    from daam_core.engine.trace import load_trace

    model = models["wan21"]
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    pos, neg = cond("wan21", tokenizer, POS, 1, batch=2), cond("wan21", tokenizer, NEG, 2, batch=2)
    samples = ksample(traced_model, pos, neg, batch=2)
    n = 1 + 4 * (FRAMES - 1)
    decoded = torch.rand(2 * n, 48, 64, 3, generator=torch.Generator().manual_seed(4))
    per_latent = pack.DAAMHeatmaps.execute(traced_model, tokenizer, {"samples": samples}, POS, NEG, "dog, park",
                                              images=decoded[:2 * FRAMES]).result
    out = pack.DAAMHeatmaps.execute(traced_model, tokenizer, {"samples": samples}, POS, NEG, "dog, park",
                                       images=decoded)
    heat, over, masks, maps = out.result
    assert masks.shape == (2 * n * 2, 48, 64) and over.shape == (2 * n * 2, 48, 64, 3)
    assert len(out.ui["daam_preview"][0]["images"]) == 2 * n
    latent_of = [b * FRAMES + -(-d // 4) for b in range(2) for d in range(n)]
    assert latent_of[:n] == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    for j, i in enumerate(latent_of):
        assert torch.equal(masks[2 * j:2 * j + 2], per_latent[2][2 * i:2 * i + 2])
        assert torch.equal(heat[2 * j:2 * j + 2], per_latent[0][2 * i:2 * i + 2])
    # word-major: every frame of 'dog' in order (one video per word), then of 'park'
    heat_w, over_w, masks_w, _ = pack.DAAMHeatmaps.execute(traced_model, tokenizer, {"samples": samples}, POS, NEG,
                                                           "dog, park", images=decoded,
                                                           output_order="word-major").result
    frames = 2 * n
    for word in range(2):
        for f in range(frames):
            assert torch.equal(masks_w[word * frames + f], masks[2 * f + word])
            assert torch.equal(heat_w[word * frames + f], heat[2 * f + word])
            assert torch.equal(over_w[word * frames + f], over[2 * f + word])
    trace = maps.trace
    assert all(v.shape[0] == 2 * FRAMES * 2 for v in trace.sums.values())  # the latent frames' rows, shared
    path = trace.save(tmp_path / "wan")
    torch.testing.assert_close(load_trace(path).word_maps(["dog", "park"]), trace.word_maps(["dog", "park"]))


# -- words, options, errors -----------------------------------------------------------------------------------------

def test_word_positions_follow_the_host_umt5_tokenizer(tokenizer, comfy_host):
    """Weights, repeated words and a prompt past the 512-token pad: positions are the host's own tokens."""
    from daam_core.hosts.comfy.dit import conditioning_layout
    from daam_core.hosts.comfy.families import FAMILIES as REGISTRY

    wan = next(f for f in REGISTRY if f.name == "wan")
    text = "a (cat:1.3) and a dog, " + ", ".join(["a small wooden house"] * 60) + ", a golden dragon"
    tokens = [t for c in tokenizer.tokenize_with_weights(text, return_word_ids=True)["umt5xxl"] for t in c]
    assert len(tokens) > 512
    layout = conditioning_layout(tokenizer, text, len(tokens), family=wan)
    assert layout.length == len(tokens) and [s.name for s in layout.segments] == ["t5"]
    pieces = tokenizer.clip_umt5xxl.tokenizer.tokenizer.id_to_piece
    dragon = layout.positions("dragon")
    assert dragon[0] > 512 and "".join(pieces(tokens[p][0]) for p in dragon) == "▁dragon"
    assert all(tokens[p][1] == pytest.approx(1.3) for p in layout.positions("cat"))
    assert "".join(pieces(tokens[p][0]) for p in layout.positions("house#60")) == "▁house"
    short = [t for c in tokenizer.tokenize_with_weights(NEG)["umt5xxl"] for t in c]
    assert len(short) == 512 and short[-1][0] == 0  # padded with umT5's pad id
    assert conditioning_layout(tokenizer, NEG, 512, family=wan).positions("quality")
    from daam_core.hosts.comfy.dit import text_segments

    every = text_segments(tokenizer, tokenizer.tokenize_with_weights(NEG))  # each family asked; none fails on umT5
    assert [("t5", "umt5xxl", 512)] in every


def test_block_filter_and_refused_wan_variants(pack, models, tokenizer, comfy_host):
    from daam_core.hosts.comfy.families import dit_spec

    model = models["wan21"]
    traced_model = pack.DAAMTraceModel.execute(model, blocks="block:1")[0]
    samples = ksample(traced_model, cond("wan21", tokenizer, POS, 1), cond("wan21", tokenizer, NEG, 2), cfg=1.0)
    rec = pack.session_of(traced_model).find(samples).recorded
    assert set(rec.sums) == {"block.1"} and [s.branch for s in rec.streams] == ["cond"]
    with pytest.raises(ValueError, match="block:2-2 is past the last block block"):
        pack.DAAMTraceModel.execute(model, blocks="block:2")
    with pytest.raises(ValueError, match="one resolution"):
        pack.DAAMTraceModel.execute(model, resolutions="low (latent/4, latent/8)")
    spec = dit_spec(model.model)
    assert (spec.patch, spec.frame_patch, spec.heads, spec.blocks) == (2, 1, 2, (("block", 2),))
    vace = model.clone()  # VACE's extra blocks attend to the text too: not this family
    vace.model.model_config.unet_config = dict(model.model.model_config.unet_config, model_type="vace")
    try:
        with pytest.raises(ValueError, match="cannot trace this model family.*DAAM traces .*Wan 2.1 / 2.2"):
            dit_spec(vace.model)
    finally:
        vace.model.model_config.unet_config["model_type"] = "t2v"
    import comfy.sample

    latent = torch.zeros(1, 16, 6, 8)  # an image latent given to the video model
    with pytest.raises(ValueError, match="latents \\[batch, channels, frames, height, width\\]; got shape"):
        comfy.sample.sample(pack.DAAMTraceModel.execute(model)[0], latent, 1, 1.0, "euler", "normal",
                            cond("wan21", tokenizer, POS, 1), [], latent, disable_pbar=True)


def test_time_buckets_come_per_frame(pack, models, tokenizer):
    """Each time bucket's trace has one image per frame, its sums the bucket's rows of that frame."""
    from daam_core.engine.trace import AttentionTrace

    traced_model = pack.DAAMTraceModel.execute(models["wan21"], time_buckets=2)[0]
    samples = ksample(traced_model, cond("wan21", tokenizer, POS, 1), cond("wan21", tokenizer, NEG, 2), steps=4)
    rec = pack.session_of(traced_model).find(samples).recorded
    trace = AttentionTrace.from_recorder(rec, [], (48, 64))
    hw = 3 * 4
    for k in range(2):
        part = trace.at_time(k)
        assert part.num_images == FRAMES
        for name, s in part.sums.items():
            video = rec.time_sums[name][k]  # [streams, frames * hw, T]
            assert s.shape == (2 * FRAMES, hw, video.shape[-1]) and s.abs().sum() > 0
            assert torch.equal(s, video.view(2, FRAMES, hw, -1).reshape(2 * FRAMES, hw, -1))


def test_wan_with_a_real_umt5_encoder_and_long_prompt(pack, models, comfy_host):
    """The host's own umT5 encoder (tiny, loaded as CLIPLoader loads one): a prompt past the 512-token pad, the words
    at the positions the host tokenized, and the text check re-encodes with that CLIP."""
    import nodes as host_nodes

    from helpers.dit_checkpoints import build_tiny_wan_clip

    clip = build_tiny_wan_clip(seed=5)
    text = "a (dog:1.3) running in a park, " + ", ".join(["a small wooden house"] * 60) + ", a golden dragon"
    tokens = [t for c in clip.tokenize(text)["umt5xxl"] for t in c]
    pos = host_nodes.CLIPTextEncode().encode(clip, text)[0]
    neg = host_nodes.CLIPTextEncode().encode(clip, NEG)[0]
    assert pos[0][0].shape == (1, len(tokens), 4096) and len(tokens) > 512
    model = models["wan21"]
    plain = ksample(model, pos, neg, batch=2)
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    samples = ksample(traced_model, pos, neg, batch=2)
    assert_same_image(plain, samples, "traced sampling of a long prompt")
    out = pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, text, NEG, "dragon, dog",
                                       negative_words="blurry")
    _, _, masks, maps = out.result
    pieces = clip.tokenizer.clip_umt5xxl.tokenizer.tokenizer.id_to_piece
    dragon = maps.trace.layout(0).positions("dragon")
    assert dragon[0] > 512 and "".join(pieces(tokens[p][0]) for p in dragon) == "▁dragon"
    assert all(tokens[p][1] == pytest.approx(1.3) for p in maps.trace.layout(0).positions("dog"))
    assert masks.shape == (2 * FRAMES * 3, 48, 64) and all(0 < m.float().mean() < 1 for m in masks)
    with pytest.raises(ValueError, match="not the text the sampler's positive conditioning was encoded from"):
        swapped = text.replace("golden dragon", "dragon golden")  # same tokens, another order
        pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, swapped, NEG, "dog")


def test_ksampler_node_on_a_video_latent(pack, models, tokenizer):
    """KSampler (DAAM) with an EmptyHunyuanLatentVideo-shaped LATENT: the stock video, and maps per frame."""
    import nodes as host_nodes

    model = models["wan21"]
    pos, neg = cond("wan21", tokenizer, POS, 1), cond("wan21", tokenizer, NEG, 2)
    latent = {"samples": torch.zeros(1, 16, FRAMES, 6, 8)}
    plain = host_nodes.KSampler().sample(model, 7, 2, 4.0, "euler", "simple", pos, neg, latent)[0]
    out, traced = pack.DAAMKSampler.execute(model, 7, 2, 4.0, "euler", "simple", pos, neg, latent)
    assert_same_image(plain["samples"], out["samples"], "KSampler (DAAM) video")
    masks = pack.DAAMHeatmaps.execute(traced, tokenizer, out, POS, NEG, "dog, park").result[2]
    assert masks.shape == (FRAMES * 2, 48, 64)


def test_text_as_long_as_the_video_is_not_guessed(pack, models, tokenizer):
    """512 text tokens and 2 frames of 16 x 16 patches: the self-attention's keys are as many as the text's, so no
    call can be told to be the cross-attention by its keys; nothing is recorded and the warning says why."""
    import comfy.sample

    model = models["wan21"]
    pos, neg = cond("wan21", tokenizer, POS, 1), cond("wan21", tokenizer, NEG, 2)
    assert pos[0][0].shape[1] == 512 == 2 * 16 * 16
    latent = torch.zeros(1, 16, 2, 32, 32)
    noise = comfy.sample.prepare_noise(latent, 1)
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    samples = comfy.sample.sample(traced_model, noise, 1, 3.0, "euler", "normal", pos, neg, latent, seed=1,
                                  disable_pbar=True)
    assert torch.equal(samples, comfy.sample.sample(model, noise, 1, 3.0, "euler", "normal", pos, neg, latent,
                                                    seed=1, disable_pbar=True))
    rec = pack.session_of(traced_model).find(samples).recorded
    assert not rec.sums and any("cannot be told from the self-attention" in w for w in rec.warnings)
    with pytest.raises(ValueError, match="no cross-attention was recorded.*cannot be told from the self-attention"):
        pack.DAAMHeatmaps.execute(traced_model, tokenizer, {"samples": samples}, POS, NEG, "dog")
