"""HunyuanVideo 1.0, HunyuanVideo 1.5 and HunyuanImage 2.1 in process against the real ComfyUI host: samplers,
ModelPatcher, attention.

The models are the host's own ``hunyuan_video`` network at a small width with seeded random weights, built through
the host's model detection (``helpers/hunyuan_models.py``). Words come from the host's own tokenizers and templates;
the conditionings are hand-made tensors of the token count the host's own encoder cut keeps (the 7-8B language
models are not run). HunyuanVideo latents are ``[B, 16, 3, h, w]`` (three latent frames, patch ``(1, 2, 2)``);
HunyuanImage 2.1 latents ``[B, 64, h, w]`` (patch 1); HunyuanVideo 1.5 latents ``[B, 32, 3, h, w]`` (patch
``(1, 1, 1)``; the host adds its 33 image-condition channels).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.images import assert_same_image, with_override

pytestmark = pytest.mark.host

POS = "a video of a (dog:1.2) running in a green park"
NEG = "blurry, low quality"
FAMILIES = ("video", "image", "v15")
VIDEOS = ("video", "v15")
TEXT_KEY = {"image": "qwen25_7b", "v15": "qwen25_7b", "video": "llama"}  # the tokenizer entry of each family's text
FRAMES = 3


@pytest.fixture(scope="module")
def models(comfy_host):
    from helpers.hunyuan_models import build_hunyuan_image, build_hunyuan_video

    return {"video": build_hunyuan_video(seed=1), "image": build_hunyuan_image(seed=2),
            "v15": build_hunyuan_video(seed=5, v15=True)}


@pytest.fixture(scope="module")
def tokenizers(comfy_host):
    from comfy.text_encoders.hunyuan_image import HunyuanImageTokenizer
    from comfy.text_encoders.hunyuan_video import HunyuanVideo15Tokenizer
    from helpers.hunyuan_models import hunyuan_video_tokenizer

    return {"video": hunyuan_video_tokenizer(), "image": HunyuanImageTokenizer(), "v15": HunyuanVideo15Tokenizer()}


def kept(family, tokenizer, text):
    """The host tokenizer's tokens of ``text`` and the positions the host's text encoder keeps."""
    from helpers.dit_checkpoints import qwen_kept_positions
    from helpers.hunyuan_models import hunyuan_video15_kept_positions, hunyuan_video_kept_positions

    if family == "video":
        return hunyuan_video_kept_positions(tokenizer, text)
    if family == "v15":
        return hunyuan_video15_kept_positions(tokenizer, text)
    return qwen_kept_positions(tokenizer, text)  # HunyuanImage 2.1's encoder cuts with Qwen-Image's code


def cond(family, tokenizer, text, seed, batch=1, **extra):
    from helpers.hunyuan_models import conditioning

    if family == "v15":  # the host's Qwen2.5-VL gives no pooled vector; HunyuanVideo15's encode_adm reads the key
        extra = {"pooled_output": None, **extra}
    return conditioning(len(kept(family, tokenizer, text)[1]), seed=seed, batch=batch, pooled=family == "video",
                        **extra)


def latent_of(family, batch, h, w):
    if family == "v15":
        return torch.zeros(batch, 32, FRAMES, h, w)
    return torch.zeros(batch, 16, FRAMES, h, w) if family == "video" else torch.zeros(batch, 64, h, w)


def ksample(model, family, positive, negative, batch=1, h=6, w=8, seed=1, steps=1, cfg=3.0):
    import comfy.sample

    latent = latent_of(family, batch, h, w)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent, denoise=1.0,
                               seed=seed, disable_pbar=True)



def image_tokens(family, h, w):
    return {"video": FRAMES * (h // 2) * (w // 2), "v15": FRAMES * h * w}.get(family, h * w)


def test_tiny_models_are_what_the_host_detects(models):
    import comfy.model_detection as md
    import comfy.supported_models as sm

    from daam_core.hosts.comfy.families import dit_spec

    expected = {"video": sm.HunyuanVideo, "image": sm.HunyuanImage21, "v15": sm.HunyuanVideo15}
    for family, model in models.items():
        assert type(model.model.model_config) is expected[family], family
        assert type(md.model_config_from_unet(model.model.diffusion_model.state_dict(), "")) is expected[family]
        spec = dit_spec(model.model)
        assert spec.family.name == {"video": "hunyuan_video", "image": "hunyuan_image",
                                    "v15": "hunyuan_video15"}[family]
        assert (spec.patch, spec.heads, spec.blocks, spec.image_first) == (
            2 if family == "video" else 1, 2, (("double", 1), ("single", 2)), image_first(model))


# -- the output is the host's ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_traced_output_is_identical_also_under_another_override(pack, models, tokenizers, family):
    model, tok = models[family], tokenizers[family]
    pos, neg = cond(family, tok, POS, 1, batch=2), cond(family, tok, NEG, 2, batch=2)
    plain = ksample(model, family, pos, neg, batch=2)
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    traced = ksample(traced_model, family, pos, neg, batch=2)
    assert_same_image(plain, traced, f"{family} traced sampling")
    assert all("forward" not in vars(m) for m in model.model.diffusion_model.modules())
    assert set(pack.session_of(traced_model).records[-1].recorded.sums) == {"double.0", "single.0", "single.1"}

    seen = []

    def other(func, *args, **kwargs):
        seen.append(1)
        return func(*args, **kwargs) * 0.5

    expected = ksample(with_override(model, other), family, pos, neg, batch=2)
    n = len(seen)
    got = ksample(pack.DAAMTraceModel.execute(with_override(model, other))[0], family, pos, neg, batch=2)
    assert_same_image(expected, got, f"{family} traced sampling under another override")
    assert len(seen) == 2 * n and not torch.equal(expected, plain)


# -- exactness ------------------------------------------------------------------------------------------------------

def collector(store):
    """Every attention call's q, k, heads, mask and block options (run before DAAM's)."""
    def collect(func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        store.append(dict(q=args[0].detach().clone(), k=args[1].detach().clone(), heads=args[3],
                          skip=kwargs.get("skip_reshape", False), mask=kwargs.get("mask"),
                          kinds=list(options.get("cond_or_uncond", [])),
                          block=(options.get("block_type"), options.get("block_index"))))
        return func(*args, **kwargs)

    return collect


def image_first(model) -> bool:
    """Where the host's network puts the image: ComfyUI 0.3.7x builds its double blocks ``flipped_img_txt`` and
    joins ``[image, text, glyphs]``; newer versions have no flag and join ``[text, glyphs, image]``."""
    return bool(getattr(model.model.diffusion_model.double_blocks[0], "flipped_img_txt", False))


def order(first: bool, n_img: int, t: int, extra: int, lead: int = 0) -> tuple[slice, slice]:
    """(image, text) positions on the sequence for ``image_first`` or text first: ``[image, lead, text, extra]`` or
    ``[lead, text, extra, image]`` (HunyuanImage 2.1's glyphs are ``extra``, after the text; HunyuanVideo 1.5's
    vision and glyph tokens ``lead``, before it)."""
    if first:
        return slice(0, n_img), slice(n_img + lead, n_img + lead + t)
    return slice(lead + t + extra, lead + t + extra + n_img), slice(lead, lead + t)


def reference_sums(calls, lengths, n_img, extra, n_streams, stream_of, first=True, lead=None):
    """fp64 softmax over the whole sequence (``[image, lead, text, extra]``, or ``[lead, text, extra, image]`` when
    not ``first``; plus the call's mask), image rows x text columns, summed over heads, per block the host names. A
    call is joint when its keys are the image, the call's text, the ``extra[kind]`` tokens after the text and the
    ``lead[kind]`` tokens before it; the token refiner's attention (text alone) is not."""
    out = {}
    for c in calls:
        t = lengths[c["kinds"][0]]
        extra_keys = extra.get(c["kinds"][0], 0)
        lead_keys = (lead or {}).get(c["kinds"][0], 0)
        q, k = c["q"].double(), c["k"].double()
        if not c["skip"]:
            b, L, _ = q.shape
            q = q.view(b, L, c["heads"], -1).transpose(1, 2)
            k = k.view(b, k.shape[1], c["heads"], -1).transpose(1, 2)
        if k.shape[2] != n_img + lead_keys + t + extra_keys or any(lengths[kind] != t for kind in c["kinds"]):
            continue
        name = f"{c['block'][0]}.{c['block'][1]}"
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if c["mask"] is not None:
            scores = scores + c["mask"].double()
        rows, cols = order(first, n_img, t, extra_keys, lead_keys)
        p = scores.softmax(-1)[:, :, rows, cols].sum(1)  # [B, N, T]
        acc = out.setdefault(name, torch.zeros(n_streams, n_img, max(lengths.values()), dtype=torch.float64))
        chunk = q.shape[0] // len(c["kinds"])
        for j, kind in enumerate(c["kinds"]):
            for i in range(chunk):
                acc[stream_of(kind, i), :, :t] += p[j * chunk + i]
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_probabilities_equal_fp64_reference(pack, models, tokenizers, family):
    """Two outputs; prompts of different lengths (the host runs them in calls of their own), two steps."""
    from daam_core.engine.trace import AttentionTrace

    model, tok = models[family], tokenizers[family]
    pos, neg = cond(family, tok, POS, 1), cond(family, tok, NEG, 2)
    lengths = {0: pos[0][0].shape[1], 1: neg[0][0].shape[1]}
    assert lengths[0] != lengths[1]
    store = []
    traced_model = pack.DAAMTraceModel.execute(with_override(model, collector(store)))[0]
    samples = ksample(traced_model, family, pos, neg, batch=2, steps=2)
    rec = pack.session_of(traced_model).find(samples).recorded
    n_img = image_tokens(family, 6, 8)
    expected = reference_sums(store, lengths, n_img, {}, 4, lambda kind, i: kind * 2 + i, image_first(model))
    assert set(rec.sums) == set(expected) == {"double.0", "single.0", "single.1"}
    for name, ref in expected.items():
        err = (rec.sums[name].double() - ref).abs().max().item()
        assert err <= 1e-5, (name, err)
        assert rec.layers[name].kind == "joint"
    if family in VIDEOS:  # frame after frame: frame f of stream s is rows f*hw .. (f+1)*hw, the trace's image s*F + f
        trace = AttentionTrace.from_recorder(rec, [], (48, 64))
        assert trace.num_images == 2 * FRAMES
        hw = n_img // FRAMES
        cells = (3, 4) if family == "video" else (6, 8)
        for name, ref in expected.items():
            per_frame = ref.view(4, FRAMES, hw, -1).reshape(4 * FRAMES, hw, -1)
            torch.testing.assert_close(trace.sums[name].double(), per_frame, atol=1e-5, rtol=0)
            assert trace.layers[name].hw == cells


@pytest.mark.parametrize("family", FAMILIES)
def test_a_masked_text_is_recorded_with_the_hosts_mask(pack, models, tokenizers, family):
    """A conditioning with an attention mask (a padded prompt): the host builds one ``[1, 1, L]`` additive row over
    the keys and gives it to every block; the recorded sums are the masked softmax and padding gets no weight."""
    model, tok = models[family], tokenizers[family]
    n = len(kept(family, tok, POS)[1])
    mask = torch.ones(1, n, dtype=torch.long)
    mask[:, n - 3:] = 0  # the last three tokens are padding
    pos = cond(family, tok, POS, 1, attention_mask=mask)
    store = []
    traced_model = pack.DAAMTraceModel.execute(with_override(model, collector(store)))[0]
    samples = ksample(traced_model, family, pos, [], cfg=1.0)
    rec = pack.session_of(traced_model).find(samples).recorded
    n_img = image_tokens(family, 6, 8)
    joint = [c for c in store if c["k"].shape[-2 if c["skip"] else 1] == n_img + n]
    assert joint and all(c["mask"] is not None and c["mask"].shape == (1, 1, n_img + n) for c in joint)
    expected = reference_sums(store, {0: n}, n_img, {}, 1, lambda kind, i: i, image_first(model))
    for name, ref in expected.items():
        assert (rec.sums[name].double() - ref).abs().max().item() <= 1e-5, name
        assert rec.sums[name][..., n - 3:].abs().max() == 0 and ref[..., :n - 3].sum() > 0


def test_byt5_glyph_tokens_after_the_text_take_part_and_are_not_mapped(pack, models, tokenizers):
    """HunyuanImage 2.1 with quoted text: the host's tokenizer adds byT5 tokens, the network appends their mapped
    states after the text; they are in every softmax and are not words."""
    model, tok = models["image"], tokenizers["image"]
    text = 'a sign that says "open" in a green park'
    tokens = tok.tokenize_with_weights(text)
    glyphs = sum(len(c) for c in tokens["byt5"])
    assert glyphs > 0
    byt5 = torch.randn(1, glyphs, 1472, generator=torch.Generator().manual_seed(3))
    pos = cond("image", tok, text, 1, conditioning_byt5small=byt5)
    neg = cond("image", tok, NEG, 2)
    n = pos[0][0].shape[1]
    store = []
    plain = ksample(model, "image", pos, neg)
    traced_model = pack.DAAMTraceModel.execute(with_override(model, collector(store)))[0]
    samples = ksample(traced_model, "image", pos, neg)
    assert_same_image(plain, samples, "HunyuanImage 2.1 with byT5 tokens")
    rec = pack.session_of(traced_model).find(samples).recorded
    n_img = image_tokens("image", 6, 8)
    assert any(c["k"].shape[-2 if c["skip"] else 1] == n_img + n + glyphs for c in store)
    expected = reference_sums(store, {0: n, 1: neg[0][0].shape[1]}, n_img, {0: glyphs}, 2, lambda kind, i: kind,
                              image_first(model))
    assert set(rec.sums) == set(expected) == {"double.0", "single.0", "single.1"}
    for name, ref in expected.items():
        assert (rec.sums[name].double() - ref).abs().max().item() <= 1e-5, name
    masks = pack.DAAMHeatmaps.execute(traced_model, tok, {"samples": samples}, text, NEG, "sign, park").result[2]
    # the words are the Qwen text's; the glyph tokens are no word; 32 pixels a latent cell (HunyuanImage 2.1's VAE)
    assert masks.shape == (2, 6 * 32, 8 * 32)


def v15_extras(tok, text, seed, vision=0):
    """HunyuanVideo 1.5's extra conditionings of ``text``: byT5 glyph states of the host tokenizer's glyph token count
    (the prompt's quoted text) and, with ``vision``, SigLIP states (image-to-video's ``clip_vision_output``)."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(seed)
    glyphs = sum(len(c) for c in tok.tokenize_with_weights(text).get("byt5", []))
    extra = {"conditioning_byt5small": torch.randn(1, glyphs, 1472, generator=g)} if glyphs else {}
    if vision:
        extra["clip_vision_output"] = SimpleNamespace(last_hidden_state=torch.randn(1, vision, 1152, generator=g))
    return extra, glyphs


@pytest.mark.parametrize("vision", [0, 5], ids=["text-to-video", "image-to-video"])
def test_hunyuan_video15_glyph_and_vision_tokens_before_the_text_take_part_and_are_not_mapped(
        pack, models, tokenizers, vision):
    """HunyuanVideo 1.5 with quoted text (byT5 glyph tokens) and, for image-to-video, SigLIP vision tokens: the
    network puts them before the text (``[vision, glyphs, text]``); traced sampling is the host's bit for bit, also
    under another override, and the recorded sums are the fp64 softmax over the whole sequence, read in the host
    network's own order."""
    from helpers.images import assert_tracing_keeps_the_host_image

    model, tok = models["v15"], tokenizers["v15"]
    text = 'a shop sign that says "open" above a (dog:1.2) in a green park'
    extra, glyphs = v15_extras(tok, text, 3, vision)
    assert glyphs > 0
    pos = cond("v15", tok, text, 1, **extra)
    neg = cond("v15", tok, NEG, 2)
    assert_tracing_keeps_the_host_image(pack, model, lambda m: ksample(m, "v15", pos, neg), "HunyuanVideo 1.5")
    n, n_neg = pos[0][0].shape[1], neg[0][0].shape[1]
    store = []
    traced_model = pack.DAAMTraceModel.execute(with_override(model, collector(store)))[0]
    samples = ksample(traced_model, "v15", pos, neg, steps=2)
    rec = pack.session_of(traced_model).find(samples).recorded
    n_img = image_tokens("v15", 6, 8)
    assert any(c["k"].shape[-2 if c["skip"] else 1] == n_img + vision + glyphs + n for c in store)
    expected = reference_sums(store, {0: n, 1: n_neg}, n_img, {}, 2, lambda kind, i: kind, image_first(model),
                              lead={0: vision + glyphs})
    assert set(rec.sums) == set(expected) == {"double.0", "single.0", "single.1"}
    worst = 0.0
    for name, ref in expected.items():
        err = (rec.sums[name].double() - ref).abs().max().item()
        worst = max(worst, err)
        assert err <= 1e-5, (name, err)
        assert ref[0, :, :n].sum() > 0
    print(f"HunyuanVideo 1.5 (vision {vision}, glyphs {glyphs}): max |recorded - fp64| = {worst:.3g}")
    images = torch.rand(FRAMES, 96, 128, 3, generator=torch.Generator().manual_seed(4))
    out = pack.DAAMHeatmaps.execute(traced_model, tok, {"samples": samples}, text, NEG, "sign, dog", images=images)
    assert out.result[2].shape == (FRAMES * 2, 96, 128)
    masks = pack.DAAMHeatmaps.execute(traced_model, tok, {"samples": samples}, text, NEG, "dog").result[2]
    assert masks.shape == (FRAMES, 6 * 16, 8 * 16)  # 16 pixels a latent cell (HunyuanVideo 1.5's VAE)


def test_hunyuan_video15_spans_in_both_host_orders(models):
    """0.3.7x joins ``[image, vision, glyphs, text]`` (``flipped_img_txt``), 0.33 ``[vision, glyphs, text, image]``:
    the family's spans are :func:`order`'s in both, the key length counts the extra tokens once."""
    import dataclasses

    from daam_core.hosts.comfy.families import dit_spec

    spec = dit_spec(models["v15"].model)
    for first in (True, False):
        s = dataclasses.replace(spec, image_first=first)
        for part in s.parts:
            text, image, length = s.family.spans(s, part, 7, 20, 5)
            rows, cols = order(first, 20, 7, 0, 5)
            assert (slice(*image), slice(*text), length) == (rows, cols, 32), (first, part)


def test_hunyuan_video15_word_positions_follow_the_hosts_template_and_cut(tokenizers, comfy_host):
    """HunyuanVideo 1.5's template (Qwen2.5-VL chat, ending with the assistant header) and HunyuanImage's cut
    (from the user's text to the end): every kept position of a word holds that word's piece, the template tokens
    after the prompt are no word, and quoted text's glyph tokens do not shift the words."""
    from daam_core.hosts.comfy.dit import conditioning_layout
    from daam_core.hosts.comfy.families import FAMILIES as REGISTRY

    tok = tokenizers["v15"]
    family = next(f for f in REGISTRY if f.name == "hunyuan_video15")
    text = 'a cat and a dog under a sign "open", ' + ", ".join(["a small wooden house"] * 12) + \
        ", a golden dragon"
    tokens, kept_at = kept("v15", tok, text)
    assert "byt5" in tokens
    ids = [t[0] for c in tokens["qwen25_7b"] for t in c]
    layout = conditioning_layout(tok, text, len(kept_at), family=family)
    assert layout.length == len(kept_at)
    pieces = tok.qwen25_7b.tokenizer.convert_ids_to_tokens
    assert "".join(pieces([ids[kept_at[p]] for p in layout.positions("dragon")])) == "Ġdragon"
    assert "".join(pieces([ids[kept_at[p]] for p in layout.positions("house#12")])) == "Ġhouse"
    assert "".join(pieces([ids[kept_at[p]] for p in layout.positions("dog")])) == "Ġdog"
    assert "".join(pieces([ids[kept_at[p]] for p in layout.positions("open")])) == "open"
    tail = pieces(ids[-5:])
    assert tail[-2:] == ["assistant", "Ċ"] and all(w == -1 for w in layout.word_of[-5:])  # the template's
    assert [w.text for w in layout.words][:5] == ["a", "cat", "and", "a", "dog"]


# -- planted attention ------------------------------------------------------------------------------------------

def planter(daam_override, n_img, text_length, keys, rows, first=True, strength=30.0):
    """An override on top of DAAM's: in every joint call the text keys at ``keys`` dominate the image queries at
    ``rows`` and vanish for every other image query (``first``: the image before the text)."""
    image, text = order(first, n_img, text_length, 0)

    def plant(func, *args, **kwargs):
        q, k = args[0], args[1]  # [B, H, L, D] (skip_reshape)
        if kwargs.get("skip_reshape") and k.shape[2] == n_img + text_length:
            q, k = q.clone(), k.clone()
            u = torch.zeros(q.shape[-1], dtype=q.dtype)
            u[0] = strength
            q[:, :, image] = -u
            q[:, :, [image.start + r for r in rows]] = u
            k[:, :, [text.start + t for t in keys]] = u
            args = (q, k) + args[2:]
        return daam_override(func, *args, **kwargs)

    return plant


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_attention_is_recovered(pack, models, tokenizers, family):
    from daam_core.engine import metrics
    from daam_core.hosts.comfy.dit import conditioning_layout
    from daam_core.hosts.comfy.families import dit_spec

    model, tok = models[family], tokenizers[family]
    tokens, kept_at = kept(family, tok, POS)
    layout = conditioning_layout(tok, POS, len(kept_at), family=dit_spec(model.model).family)
    dog = layout.positions("dog")
    key = TEXT_KEY[family]
    hf = getattr(tok, key).tokenizer
    ids = [t[0] for c in tokens[key] for t in c]
    assert hf.convert_ids_to_tokens([ids[kept_at[p]] for p in dog]) == ["dog"]  # the weighted word, its own piece
    grid = (8, 12)  # a 16 x 24 latent (frame) in 2 x 2 patches (video), or 8 x 12 cells (patch 1)
    h, w = (16, 24) if family == "video" else (8, 12)
    region = torch.zeros(grid, dtype=torch.bool)
    region[2:6, 3:9] = True
    frame = 1 if family in VIDEOS else 0
    rows = (torch.nonzero(region.flatten()).flatten() + frame * region.numel()).tolist()
    n_img = image_tokens(family, h, w)
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    to = traced_model.model_options["transformer_options"]
    to["optimized_attention_override"] = planter(to["optimized_attention_override"], n_img, len(kept_at), dog, rows,
                                                 image_first(model))
    pos, neg = cond(family, tok, POS, 1), cond(family, tok, NEG, 2)
    samples = ksample(traced_model, family, pos, neg, h=h, w=w)
    frames = FRAMES if family in VIDEOS else 1
    images = torch.rand(frames, 128, 192, 3, generator=torch.Generator().manual_seed(3))
    out = pack.DAAMHeatmaps.execute(traced_model, tok, {"samples": samples}, POS, NEG, "dog, park",
                                    negative_words="blurry", images=images)
    heat, over, masks, maps = out.result
    assert masks.shape == (frames * 3, 128, 192) and over.shape == (frames * 3, 128, 192, 3)
    truth = region.repeat_interleave(128 // grid[0], 0).repeat_interleave(192 // grid[1], 1)
    assert metrics.iou(masks[3 * frame] > 0.5, truth) >= 0.9, "the mask of 'dog' misses its planted region"
    assert metrics.iou(masks[3 * frame + 1] > 0.5, truth) < 0.5, "the mask of 'park' took 'dog's planted region"
    dog_maps = maps.trace.word_maps("dog")
    assert dog_maps.shape == (frames, 1, 128, 192)
    assert pack.DAAMMask.execute(maps, "dog")[0].shape == (frames, 128, 192)


# -- words, refusals ------------------------------------------------------------------------------------------------

def test_hunyuan_video_word_positions_follow_the_hosts_template_and_cut(tokenizers, comfy_host):
    """The host's template around the prompt, its cut after the user header's ``\\n\\n`` through ``<|eot_id|>``:
    every kept position of a word holds that word's piece; template tokens are no word."""
    from daam_core.hosts.comfy.dit import conditioning_layout
    from daam_core.hosts.comfy.families import FAMILIES as REGISTRY
    from daam_core.hosts.comfy.families.hunyuan import video_keep

    tok = tokenizers["video"]
    family = next(f for f in REGISTRY if f.name == "hunyuan_video")
    text = "a (cat:1.3) and a dog, " + ", ".join(["a small wooden house"] * 12) + ", a golden dragon"
    tokens, kept_at = kept("video", tok, text)
    ids = [t[0] for c in tokens["llama"] for t in c]
    start, stop = video_keep(ids)
    assert kept_at == list(range(start, stop)) and ids[stop - 1] == 128009 and ids[start - 1] == 271
    layout = conditioning_layout(tok, text, len(kept_at), family=family)
    assert layout.length == len(kept_at) and [s.name for s in layout.segments] == ["llama"]
    pieces = tok.llama.tokenizer.convert_ids_to_tokens
    assert "".join(pieces([ids[kept_at[p]] for p in layout.positions("dragon")])) == "Ġdragon"
    assert "".join(pieces([ids[kept_at[p]] for p in layout.positions("house#12")])) == "Ġhouse"
    weights = [t[1] for c in tokens["llama"] for t in c]
    assert all(weights[kept_at[p]] == pytest.approx(1.3) for p in layout.positions("cat"))
    assert layout.word_of[-1] == -1  # <|eot_id|> is the template's
    assert [w.text for w in layout.words][:5] == ["a", "cat", "and", "a", "dog,"]


def test_hunyuan_video_with_the_venvs_llama_tokenizer_is_a_clear_error_or_maps(comfy_host):
    """transformers 5 reads ComfyUI's Llama 3 tokenizer without its byte-level pre-tokenizer and drops the spaces:
    then the words cannot be told apart, and DAAM says why instead of mapping wrong tokens."""
    from comfy.text_encoders.hunyuan_video import HunyuanVideoTokenizer

    from daam_core.hosts.comfy.dit import conditioning_layout
    from daam_core.hosts.comfy.families import FAMILIES as REGISTRY
    from daam_core.hosts.comfy.families.hunyuan import plain_ids

    family = next(f for f in REGISTRY if f.name == "hunyuan_video")
    tok = HunyuanVideoTokenizer()
    tokens, kept_at = kept("video", tok, POS)
    hf = tok.llama.tokenizer  # transformers' (0.3.7x) or, on newer hosts, ComfyUI's own byte-level BPE
    if hf.decode(plain_ids(hf, "a b")) == "a b":
        layout = conditioning_layout(tok, POS, len(kept_at), family=family)
        ids = [t[0] for c in tokens["llama"] for t in c]
        for word in ("dog", "green", "park"):
            assert hf.decode([ids[kept_at[p]] for p in layout.positions(word)]).strip() == word
    else:
        with pytest.raises(ValueError, match="drops the spaces between words"):
            conditioning_layout(tok, POS, len(kept_at), family=family)


def test_other_models_on_the_hunyuan_network_are_refused_by_name(pack, comfy_host):
    from helpers.hunyuan_models import build_hunyuan_video

    i2v = build_hunyuan_video(seed=3, in_channels=33)  # HunyuanVideo image-to-video: image tokens in the text
    with pytest.raises(ValueError, match="cannot trace this model family: 'hunyuan_video' \\(HunyuanVideo.*I2V.*"
                                         "DAAM traces .*HunyuanVideo \\(1.0 text-to-video\\).*HunyuanImage 2.1"):
        pack.DAAMTraceModel.execute(i2v)
    import comfy.supported_models as sm

    sr = build_hunyuan_video(seed=4, v15=True, in_channels=98)  # HunyuanVideo 1.5's super-resolution model
    assert type(sr.model.model_config) is sm.HunyuanVideo15_SR_Distilled
    with pytest.raises(ValueError, match="cannot trace this model family: 'hunyuan_video' \\(HunyuanVideo15_SR_"
                                         "Distilled.*HunyuanVideo 1.5 \\(text-to-video, image-to-video\\)"):
        pack.DAAMTraceModel.execute(sr)
