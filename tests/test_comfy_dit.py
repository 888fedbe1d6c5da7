"""SD3 / SD3.5 (MMDiT), Flux.1 and Chroma in process against the real ComfyUI host: samplers, ModelPatcher, attention.

The models are the host's own classes at a small width with seeded random weights (``helpers/dit_checkpoints.py``
says how they are built); their conditionings are hand-made tensors whose token count is what the host's SD3 /
Flux tokenizers give for the prompt, so word positions come from the real tokenizers. Latents are non-square
(6 x 8 or 16 x 24) and most samplings have two images.
"""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest
import torch
from helpers.images import assert_same_image, with_override

pytestmark = pytest.mark.host

POS = "a cat and a dog on a red sofa"
NEG = "blurry, low quality"
FAMILIES = ("sd3", "sd35", "flux-dev", "flux-schnell", "chroma")


@pytest.fixture(scope="module")
def models(comfy_host):
    from helpers.dit_checkpoints import build_chroma, build_flux, build_sd3

    return {"sd3": build_sd3(seed=1, depth=2), "sd35": build_sd3(seed=2, depth=3, sd35=True),
            "flux-dev": build_flux(seed=3, dev=True), "flux-schnell": build_flux(seed=4, dev=False),
            "chroma": build_chroma(seed=5)}


def test_tiny_models_are_what_the_host_detects_from_their_weights(models):
    """Each tiny model's own state dict is detected by the host as the class it was built as."""
    import comfy.model_detection as md
    import comfy.supported_models as sm

    expected = {"sd3": sm.SD3, "sd35": sm.SD3, "flux-dev": sm.Flux, "flux-schnell": sm.FluxSchnell,
                "chroma": sm.Chroma}
    for family, model in models.items():
        assert type(model.model.model_config) is expected[family], family
        state = model.model.diffusion_model.state_dict()
        assert type(md.model_config_from_unet(state, "")) is expected[family], family


@pytest.fixture(scope="module")
def tokenizers(comfy_host):
    from comfy.text_encoders.flux import FluxTokenizer
    from comfy.text_encoders.pixart_t5 import PixArtTokenizer
    from comfy.text_encoders.sd3_clip import SD3Tokenizer

    return {"sd3": SD3Tokenizer(), "flux": FluxTokenizer(), "chroma": PixArtTokenizer()}


def tokenizer_of(family, tokenizers):
    return tokenizers["flux" if family.startswith("flux") else "chroma" if family == "chroma" else "sd3"]


def token_count(tokenizer, text):
    """Conditioning length the host's encoders give: SD3 CLIP-L/G (77 per chunk) + T5; Flux and Chroma T5 alone."""
    tokens = tokenizer.tokenize_with_weights(text)
    n = lambda key: sum(len(c) for c in tokens[key])  # noqa: E731
    return n("t5xxl") + (n("l") if "g" in tokens else 0)


def cond(family, tokenizers, text, seed, batch=1, **extra):
    from helpers.dit_checkpoints import conditioning

    c = conditioning(token_count(tokenizer_of(family, tokenizers), text), seed=seed, batch=batch, **extra)
    if family == "flux-dev":
        c[0][1]["guidance"] = 3.5
    return c


def ksample(model, positive, negative, batch=1, h=6, w=8, seed=1, steps=1, cfg=3.0):
    import comfy.sample

    latent = torch.zeros(batch, 16, h, w)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent, denoise=1.0,
                               seed=seed, disable_pbar=True)


def options_snapshot(model):
    to = model.model_options.get("transformer_options", {})
    return (sorted(model.model_options), sorted(to), {k: sorted(v) for k, v in model.wrappers.items()})



# -- the image is the host's --------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_traced_image_is_identical_also_under_another_override(pack, models, tokenizers, family):
    model = models[family]
    pos, neg = cond(family, tokenizers, POS, 1, batch=2), cond(family, tokenizers, NEG, 2, batch=2)
    before = options_snapshot(model)
    plain = ksample(model, pos, neg, batch=2)
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    traced = ksample(traced_model, pos, neg, batch=2)
    assert_same_image(plain, traced, f"{family} traced sampling")
    assert traced_model is not model
    assert options_snapshot(model) == before
    assert all("forward" not in vars(m) for m in model.model.diffusion_model.modules())  # no block replaced
    assert pack.session_of(traced_model).records[-1].recorded.sums

    seen = []

    def other(func, *args, **kwargs):
        seen.append(1)
        return func(*args, **kwargs) * 0.5

    other_model = with_override(model, other)
    expected = ksample(other_model, pos, neg, batch=2)
    n = len(seen)
    got = ksample(pack.DAAMTraceModel.execute(other_model)[0], pos, neg, batch=2)
    assert_same_image(expected, got, f"{family} traced sampling under another override")
    assert len(seen) == 2 * n and not torch.equal(expected, plain)


# -- exactness ------------------------------------------------------------------------------------------------------

def collector(store):
    """An override that keeps every attention call's q, k, mask and block options (run before DAAM's)."""

    def collect(func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        store.append(dict(q=args[0].detach().clone(), k=args[1].detach().clone(), heads=heads,
                          skip=kwargs.get("skip_reshape", False), mask=kwargs.get("mask"),
                          kinds=list(options.get("cond_or_uncond", [])),
                          block=(options.get("block_type"), options.get("block_index"))))
        return func(*args, **kwargs)

    return collect


def reference_sums(calls, family, lengths, n_img, n_ref, n_streams, stream_of, t_max, depth, double=0):
    """fp64 softmax over the whole joint sequence, image rows x text columns, summed over heads, per layer.

    ``lengths``: cond_or_uncond kind -> token count; ``stream_of(kind, image)``: the stream index. The text is
    what the call's keys hold besides the image and the references (the host repeats each row's conditioning to
    that length); a call with no text keys (SD3.5's image-only attention) is not joint. The text is first, the
    generated image next."""
    out, index = {}, 0
    for c in calls:
        q, k = c["q"].double(), c["k"].double()
        if not c["skip"]:
            b, L, _ = q.shape
            q = q.view(b, L, c["heads"], -1).transpose(1, 2)
            k = k.view(b, k.shape[1], c["heads"], -1).transpose(1, 2)
        L = k.shape[2]
        text = L - n_img - n_ref
        if text <= 0:
            continue
        if family == "sd3":
            name = f"joint.{index % depth}"
        elif c["block"][0] is not None:
            name = f"{c['block'][0]}.{c['block'][1]}"
        else:  # ComfyUI 0.3.64 names no Flux block: the n-th joint call of a model call is block n
            i = index % (double + depth)
            name = f"double.{i}" if i < double else f"single.{i - double}"
        index += 1
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if c["mask"] is not None:
            scores = scores + c["mask"].double()
        p = scores.softmax(-1)[:, :, text:text + n_img, :text].sum(1)  # [B, N, text]
        acc = out.setdefault(name, torch.zeros(n_streams, n_img, t_max, dtype=torch.float64))
        chunk = q.shape[0] // len(c["kinds"])
        for j, kind in enumerate(c["kinds"]):
            t = lengths[kind]
            for i in range(chunk):
                row = p[j * chunk + i].view(n_img, text // t, t).sum(1)  # the host repeated it text // t times
                acc[stream_of(kind, i), :, :t] += row
    return out


@pytest.mark.parametrize("family", FAMILIES + ("flux-kontext",))
def test_recorded_probabilities_equal_fp64_reference(pack, models, tokenizers, family):
    """Two images, a negative prompt of another length (the host repeats it to the lcm), one sampling step."""
    model = models["flux-dev" if family == "flux-kontext" else family]
    base = "flux-dev" if family == "flux-kontext" else family
    extra = {"reference_latents": [torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(5))]} \
        if family == "flux-kontext" else {}
    long_pos = POS + ", " + ", ".join(["a small wooden house"] * 60)  # several CLIP chunks, > 256 T5 tokens
    pos = cond(base, tokenizers, long_pos, 1, batch=1, **extra)
    neg = cond(base, tokenizers, NEG, 2, batch=1, **extra)
    store = []
    traced_model = pack.DAAMTraceModel.execute(with_override(model, collector(store)))[0]
    samples = ksample(traced_model, pos, neg, batch=2)
    session = pack.session_of(traced_model)
    rec = session.find(samples).recorded
    lengths = {0: pos[0][0].shape[1], 1: neg[0][0].shape[1]}  # cond_or_uncond 0 = positive, 1 = negative
    assert lengths[0] != lengths[1]
    n_img = 3 * 4
    n_ref = 2 * 3 if family == "flux-kontext" else 0
    net = model.model.diffusion_model  # block counts from the host's network, not from DAAM's spec
    sd3 = base.startswith("sd3")
    depth, double = (len(net.joint_blocks), 0) if sd3 else (len(net.single_blocks), len(net.double_blocks))
    expected = reference_sums(store, "sd3" if sd3 else "flux", lengths, n_img, n_ref, 4,
                              lambda kind, i: kind * 2 + i, max(lengths.values()), depth, double)
    names = ({f"joint.{i}" for i in range(depth)} if sd3 else
             {f"double.{i}" for i in range(double)} | {f"single.{i}" for i in range(depth)})
    assert set(rec.sums) == set(expected) == names
    for name, ref in expected.items():
        torch.testing.assert_close(rec.sums[name].double(), ref, atol=1e-5, rtol=0)
        assert rec.layers[name].kind == "joint" and rec.layers[name].hw == (3, 4)
    if family == "sd35":  # block 0's image-only attention ran too and was not taken for a joint call
        assert sum(1 for c in store if c["k"].shape[1] == n_img) > 0


def output_collector(store):
    """An override (run before DAAM's) that keeps every attention call's output, mask and batch kinds."""

    def collect(func, *args, **kwargs):
        out = func(*args, **kwargs)
        flat = out.transpose(1, 2).flatten(2) if kwargs.get("skip_output_reshape", False) else out
        options = kwargs.get("transformer_options") or {}
        store.append(dict(out=flat.detach().clone(), mask=kwargs.get("mask"),
                          kinds=list(options.get("cond_or_uncond", [])),
                          block=(options.get("block_type"), options.get("block_index"))))
        return out

    return collect


def reference_output_sums(calls, lengths, n_img, n_ref, n_streams, stream_of, t_max, names):
    """fp64 ``softmax_t(o_i . o_t / sqrt(C))`` of each joint call's outputs (image rows x text columns), text columns a
    query's mask blocks left out, copies of a shorter prompt folded, summed per layer. ``names``: the layer
    name of each joint call in order (the calls whose output holds text besides the image and references)."""
    out = {}
    joint = [c for c in calls if c["out"].shape[1] - n_img - n_ref > 0]
    assert len(joint) == len(names)
    for c, name in zip(joint, names):
        o = c["out"].double()
        text = o.shape[1] - n_img - n_ref
        logits = o[:, text:text + n_img] @ o[:, :text].transpose(1, 2) / math.sqrt(o.shape[-1])  # [B, N, text]
        if c["mask"] is not None:
            m = c["mask"]
            m = m if m.ndim == 4 else m[:, None] if m.ndim == 3 else m[None, None]
            rows = m[:, 0, text:text + n_img, :text] if m.shape[2] > 1 else m[:, 0, :, :text]
            blocked = ~rows if rows.dtype == torch.bool else torch.isneginf(rows)
            logits = logits.masked_fill(blocked, float("-inf"))
        p = logits.softmax(-1)
        acc = out.setdefault(name, torch.zeros(n_streams, n_img, t_max, dtype=torch.float64))
        chunk = o.shape[0] // len(c["kinds"])
        for j, kind in enumerate(c["kinds"]):
            t = lengths[kind]
            for i in range(chunk):
                acc[stream_of(kind, i), :, :t] += p[j * chunk + i].view(n_img, text // t, t).sum(1)
    return out


@pytest.mark.parametrize("family", FAMILIES + ("flux-kontext",))
def test_output_similarity_sums_equal_fp64_reference(pack, models, tokenizers, family):
    """ConceptAttention-style sums from the host's own attention outputs: two images, a negative prompt of another
    length, the image bit for bit the untraced one."""
    model = models["flux-dev" if family == "flux-kontext" else family]
    base = "flux-dev" if family == "flux-kontext" else family
    extra = {"reference_latents": [torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(5))]} \
        if family == "flux-kontext" else {}
    long_pos = POS + ", " + ", ".join(["a small wooden house"] * 60)  # > 256 T5 tokens: longer than the negative
    pos = cond(base, tokenizers, long_pos, 1, batch=1, **extra)
    neg = cond(base, tokenizers, NEG, 2, batch=1, **extra)
    plain = ksample(model, pos, neg, batch=2)
    store = []
    traced_model = pack.DAAMTraceModel.execute(with_override(model, output_collector(store)),
                                               record_output_similarity=True)[0]
    samples = ksample(traced_model, pos, neg, batch=2)
    assert_same_image(plain, samples, f"{family} traced with output similarity")
    rec = pack.session_of(traced_model).find(samples).recorded
    got = rec.extras["output_sums"]
    lengths = {0: pos[0][0].shape[1], 1: neg[0][0].shape[1]}
    assert lengths[0] != lengths[1]
    n_ref = 2 * 3 if family == "flux-kontext" else 0
    net = model.model.diffusion_model  # the layer names in call order, from the host's network
    if base.startswith("sd3"):
        order = [f"joint.{i}" for i in range(len(net.joint_blocks))]
    else:
        order = [f"double.{i}" for i in range(len(net.double_blocks))] + \
            [f"single.{i}" for i in range(len(net.single_blocks))]
    joint_calls = sum(1 for c in store if c["out"].shape[1] - 12 - n_ref > 0)
    names = (order * (joint_calls // len(order)))
    expected = reference_output_sums(store, lengths, 12, n_ref, 4, lambda kind, i: kind * 2 + i,
                                     max(lengths.values()), names)
    assert set(got) == set(expected) == set(order)
    for name, ref in expected.items():
        assert rec.extras["output_calls"][name] == rec.calls[name]
        torch.testing.assert_close(got[name].double(), ref, atol=1e-5, rtol=0)
    trace = pack.DAAMHeatmaps.execute(traced_model, tokenizer_of(family, tokenizers), {"samples": samples}, long_pos,
                                      NEG, "dog", map_source="output similarity")
    maps = trace.result[3]
    assert maps.map_source == "output similarity"
    assert not torch.equal(maps.trace.word_maps("dog", source="output"), maps.trace.word_maps("dog"))
    # the preview of plain maps offers the output-similarity maps, with the node's own numbers
    (payload,) = pack.DAAMHeatmaps.execute(traced_model, tokenizer_of(family, tokenizers), {"samples": samples},
                                           long_pos, NEG, "dog").ui["daam_preview"]
    assert payload["refine"]["other"] == {"propagate_steps": 0, "head_power": 0.0, "map_source": "output similarity",
                                          "propagate_at": "each resolution", "exclusive": False}
    keys = [e["key"] for e in payload["entries"] if e["prompt"] == "positive"]
    h, w = payload["map_hw"]
    other = np.frombuffer(base64.b64decode(payload["images"][1]["other"]["maps"]), "<f4").reshape(-1, h, w)
    ref = maps.trace.word_maps(keys, image=1, size=maps.trace.latent_hw, normalize="none", missing="zeros",
                               source="output").numpy()
    assert np.array_equal(other[:len(keys)], ref)


def test_output_similarity_is_refused_where_there_is_no_joint_attention(pack, sd15_model_for_refusal):
    with pytest.raises(ValueError, match="output similarity is for joint-attention models"):
        pack.DAAMTraceModel.execute(sd15_model_for_refusal, record_output_similarity=True)


@pytest.fixture(scope="module")
def sd15_model_for_refusal(comfy_host, sd15_checkpoint):
    import comfy.sd

    return comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint), output_vae=False, output_clip=False)[0]


# -- planted attention ------------------------------------------------------------------------------------------

def planter(daam_override, spans, region, strength=30.0):
    """An override on top of DAAM's that makes the text key at ``spans['key']`` dominate the image queries in
    ``region`` (a boolean [N] over the patch grid) and vanish for the others, in every joint call."""

    def plant(func, *args, **kwargs):
        q, k = args[0], args[1]
        skip = kwargs.get("skip_reshape", False)
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        qh = q if skip else q.view(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)
        kh = k if skip else k.view(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)
        if kh.shape[2] == spans["length"]:
            qh, kh = qh.clone(), kh.clone()
            u = torch.zeros(qh.shape[-1], dtype=qh.dtype)
            u[0] = strength
            i0 = spans["image"]
            img = qh[:, :, i0:i0 + region.numel()]
            img[:, :, region] = u
            img[:, :, ~region] = -u
            kh[:, :, spans["key"]] = u
            if not skip:
                qh = qh.transpose(1, 2).reshape(q.shape)
                kh = kh.transpose(1, 2).reshape(k.shape)
            args = (qh, kh) + args[2:]
        return daam_override(func, *args, **kwargs)

    return plant


def planted_masks(pack, model, tok, count, key, sample):
    """Masks of "dog, cat" ``[2, 128, 192]`` and the planted region at that size, for a 16 x 24 latent sampled by
    ``sample(traced_model)`` with the text key ``key`` planted (text first: ``count`` tokens, then the image)."""
    region = torch.zeros((8, 12), dtype=torch.bool)  # a 16 x 24 latent in 2 x 2 patches
    region[2:6, 3:9] = True
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    to = traced_model.model_options["transformer_options"]
    to["optimized_attention_override"] = planter(to["optimized_attention_override"],
                                                 {"length": count + region.numel(), "image": count, "key": key},
                                                 region.flatten())
    samples = sample(traced_model)
    masks = pack.DAAMHeatmaps.execute(traced_model, tok, {"samples": samples}, POS, NEG, "dog, cat").result[2]
    assert masks.shape == (2, 128, 192)
    return masks, region.repeat_interleave(16, 0).repeat_interleave(16, 1)


@pytest.mark.parametrize("family", ("sd3", "flux-dev"))
def test_planted_attention_is_recovered(pack, models, tokenizers, family):
    from daam_core.engine import metrics
    from daam_core.hosts.comfy.dit import conditioning_layout

    model, tok = models[family], tokenizer_of(family, tokenizers)
    count = token_count(tok, POS)
    layout = conditioning_layout(tok, POS, count)
    dog = layout.positions("dog", segments="clip" if family == "sd3" else None)[0]  # SD3: the CLIP one
    masks, truth = planted_masks(pack, model, tok, count, dog, lambda m: ksample(
        m, cond(family, tokenizers, POS, 1), cond(family, tokenizers, NEG, 2), h=16, w=24))
    assert metrics.iou(masks[0] > 0.5, truth) >= 0.9, f"{family}: the mask of 'dog' misses its planted region"
    assert metrics.iou(masks[1] > 0.5, truth) < 0.5, f"{family}: the mask of 'cat' took 'dog's planted region"


# -- prompts and branches -----------------------------------------------------------------------------------------

def test_sd3_negative_prompt_has_its_own_maps(pack, models, tokenizers):
    model, tok = models["sd35"], tokenizers["sd3"]
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    samples = ksample(traced_model, cond("sd35", tokenizers, POS, 1, batch=2), cond("sd35", tokenizers, NEG, 2, batch=2),
                      batch=2)
    out = pack.DAAMHeatmaps.execute(traced_model, tok, {"samples": samples}, POS, NEG, "dog", negative_words="blurry")
    heat, _, masks, maps = out.result
    assert heat.shape == (4, 48, 64, 3) and masks.shape == (4, 48, 64)
    (payload,) = out.ui["daam_preview"]  # the browser preview: both prompts' words, the asked ones selected
    chosen = {(e["prompt"], e["key"]) for e in payload["entries"] if e["selected"]}
    assert chosen == {("positive", "dog"), ("negative", "blurry")} and len(payload["images"]) == 2
    neg_maps = maps.trace.word_maps("blurry", branch="uncond")
    assert neg_maps.shape == (2, 1, 48, 64) and torch.isfinite(neg_maps).all() and neg_maps.amax() == 1
    assert not torch.equal(neg_maps[:, 0], maps.trace.word_maps("dog")[:, 0])


def test_flux_negative_words_are_refused_clearly(pack, models, tokenizers):
    model, tok = models["flux-dev"], tokenizers["flux"]
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    pos = cond("flux-dev", tokenizers, POS, 1)
    zero = [[torch.zeros_like(pos[0][0]), dict(pos[0][1])]]  # ConditioningZeroOut, the usual Flux negative
    samples = ksample(traced_model, pos, zero, cfg=1.0)  # distilled guidance: the host skips the negative
    heat = pack.DAAMHeatmaps.execute(traced_model, tok, {"samples": samples}, POS, "", "dog").result[0]
    assert heat.shape == (1, 48, 64, 3)
    with pytest.raises(ValueError, match="Flux.1's guidance is distilled.*no negative branch"):
        pack.DAAMHeatmaps.execute(traced_model, tok, {"samples": samples}, POS, "", "dog", negative_words="blurry")


def test_word_positions_follow_the_host_tokenizers(tokenizers, comfy_host):
    """SD3: CLIP positions first, T5 after them (a word has both); Flux: T5. Long prompts and weights included."""
    from daam_core.hosts.comfy.dit import conditioning_layout

    text = "a (cat:1.3) and a dog, " + ", ".join(["a small wooden house"] * 20) + ", a golden dragon"
    sd3 = tokenizers["sd3"]
    tokens = sd3.tokenize_with_weights(text)
    clip = [t for chunk in tokens["l"] for t in chunk]
    t5 = [t for chunk in tokens["t5xxl"] for t in chunk]
    assert len(clip) == 154 and len(t5) > 77
    count = len(clip) + len(t5)
    layout = conditioning_layout(sd3, text, count)
    assert [(g.name, g.start, g.stop) for g in layout.segments] == [("clip", 0, 154), ("t5", 154, count)]
    (dragon,) = layout.positions("dragon", segments="clip")
    assert dragon >= 77 and clip[dragon][0] == sd3.clip_l.tokenizer.convert_tokens_to_ids("dragon</w>")
    (cat,) = layout.positions("cat", segments="clip")
    assert clip[cat][1] == pytest.approx(1.3)
    (dragon5,) = layout.positions("dragon", segments="t5")
    assert dragon5 >= len(clip) and t5[dragon5 - len(clip)][0] == sd3.t5xxl.tokenizer.convert_tokens_to_ids("▁dragon")
    assert layout.positions("dragon") == (dragon, dragon5) and layout.length == count
    flux = tokenizers["flux"]
    f5 = [t for chunk in flux.tokenize_with_weights(text)["t5xxl"] for t in chunk]
    layout = conditioning_layout(flux, text, len(f5))
    (dragon,) = layout.positions("dragon")
    assert f5[dragon][0] == flux.t5xxl.tokenizer.convert_tokens_to_ids("▁dragon")
    assert layout.positions("house#20") and f5[layout.positions("cat")[0]][1] == pytest.approx(1.3)
    with pytest.raises(ValueError, match="encodes to .* tokens but the sampler's conditioning has 999"):
        conditioning_layout(flux, text, 999)
    with pytest.raises(ValueError, match="no 'clip' positions"):
        layout.positions("dragon", segments="clip")


# -- node options and errors ----------------------------------------------------------------------------------------

def test_flux_block_filter_and_invalid_options(pack, models, tokenizers):
    model = models["flux-schnell"]
    traced_model = pack.DAAMTraceModel.execute(model, unet_parts="single (Flux)")[0]
    samples = ksample(traced_model, cond("flux-schnell", tokenizers, POS, 1), cond("flux-schnell", tokenizers, NEG, 2),
                      cfg=1.0)
    rec = pack.session_of(traced_model).find(samples).recorded
    assert set(rec.sums) == {"single.0", "single.1"}
    assert [s.branch for s in rec.streams] == ["cond"]  # cfg 1: the negative was never evaluated
    with pytest.raises(ValueError, match="'down' does not exist in Flux.1"):
        pack.DAAMTraceModel.execute(model, unet_parts="down")
    with pytest.raises(ValueError, match="one resolution"):
        pack.DAAMTraceModel.execute(models["sd3"], resolutions="low (latent/4, latent/8)")
    with pytest.raises(ValueError, match="heads \\[5\\] do not exist.*2 heads"):
        pack.DAAMTraceModel.execute(models["sd3"], heads="0,5")


def test_block_ranges_of_the_trace_node(pack, models, tokenizers):
    model = models["flux-schnell"]  # 1 double + 2 single blocks
    traced_model = pack.DAAMTraceModel.execute(model, blocks="single:1")[0]
    samples = ksample(traced_model, cond("flux-schnell", tokenizers, POS, 1), cond("flux-schnell", tokenizers, NEG, 2),
                      cfg=1.0)
    assert set(pack.session_of(traced_model).find(samples).recorded.sums) == {"double.0", "single.1"}
    traced_model = pack.DAAMTraceModel.execute(models["sd3"], blocks="joint:1-1")[0]  # SD3 depth 2: joint.0, .1
    samples = ksample(traced_model, cond("sd3", tokenizers, POS, 1), cond("sd3", tokenizers, NEG, 2))
    assert set(pack.session_of(traced_model).find(samples).recorded.sums) == {"joint.1"}
    with pytest.raises(ValueError, match="single:2-4 is past the last single block.*single:0-1"):
        pack.DAAMTraceModel.execute(model, blocks="single:2-4")
    with pytest.raises(ValueError, match="Flux.1 has no 'joint' blocks"):
        pack.DAAMTraceModel.execute(model, blocks="joint:0")
    with pytest.raises(ValueError, match="write part:start-end"):
        pack.DAAMTraceModel.execute(model, blocks="single")


def test_sd3_segments_choose_clip_or_t5_positions_in_every_output(pack, models, tokenizers):
    from daam_core.engine import masks as mask_ops

    model, tok = models["sd3"], tokenizers["sd3"]
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    samples = ksample(traced_model, cond("sd3", tokenizers, POS, 1), cond("sd3", tokenizers, NEG, 2))
    runs = {seg: pack.DAAMHeatmaps.execute(traced_model, tok, {"samples": samples}, POS, NEG, "dog, red sofa",
                                              segments=seg) for seg in ("both", "clip", "t5")}
    trace = runs["both"].result[3].trace
    for seg, out in runs.items():
        _, _, masks, maps = out.result
        expected = trace.word_maps(["dog", "red sofa"], segments=seg)  # [1, 2, H, W]
        torch.testing.assert_close(maps.trace.word_maps(["dog", "red sofa"], segments=maps.segments), expected)
        assert torch.equal(masks, mask_ops.threshold(expected, 0.4, "relative")[0])
        assert torch.equal(pack.DAAMMask.execute(maps, "dog")[0], mask_ops.threshold(expected, 0.4, "relative")[:, 0])
        assert out.ui["daam_preview"][0]["segments"] == seg
    assert not torch.equal(trace.word_maps("dog", segments="clip"), trace.word_maps("dog", segments="t5"))
    with pytest.raises(ValueError, match="segments must be one of"):
        pack.DAAMHeatmaps.execute(traced_model, tok, {"samples": samples}, POS, NEG, "dog", segments="g")
    flux = models["flux-schnell"]
    traced_flux = pack.DAAMTraceModel.execute(flux)[0]
    samples = ksample(traced_flux, cond("flux-schnell", tokenizers, POS, 1), cond("flux-schnell", tokenizers, NEG, 2),
                      cfg=1.0)
    with pytest.raises(ValueError, match="no 'clip' positions; its segments are \\['t5'\\]"):
        pack.DAAMHeatmaps.execute(traced_flux, tokenizers["flux"], {"samples": samples}, POS, "", "dog",
                                     segments="clip")


def test_layer_names_without_block_options(comfy_host):
    """ComfyUI 0.3.64's Flux sets no block_type / block_index: the n-th joint call of a model call is block n."""
    from daam_core.hosts.comfy.families import FAMILIES, DiTSpec

    family = next(f for f in FAMILIES if f.name == "flux")
    flux = DiTSpec(family, patch=2, heads=24, blocks=(("double", 19), ("single", 38)))
    assert [flux.layer(i, {}) for i in (0, 18, 19, 56)] == [("double.0", "double"), ("double.18", "double"),
                                                            ("single.0", "single"), ("single.37", "single")]
    assert flux.layer(3, {"block_type": "single", "block_index": 7}) == ("single.7", "single")


def test_flux2_on_fluxs_code_is_its_own_family(comfy_host):
    """Flux.2 runs on Flux.1's network code (``global_modulation``): it is traced as Flux.2, not as Flux.1
    (``test_comfy_flux2.py`` tests it)."""
    import comfy.supported_models as sm

    from daam_core.hosts.comfy.families import dit_spec
    from helpers.dit_checkpoints import build_flux2

    if not hasattr(sm, "Flux2"):
        pytest.skip("this ComfyUI (0.3.64) has no Flux.2")
    model = build_flux2()
    assert type(model.model.model_config) is sm.Flux2
    spec = dit_spec(model.model)
    assert (spec.family.name, spec.label, spec.patch, spec.blocks) == ("flux2", "Flux.2", 1,
                                                                        (("double", 1), ("single", 1)))


def build_omnigen2(seed: int = 0):
    """An OmniGen2-shaped ``ModelPatcher`` (the host's ``model_base.Omnigen2``), a family DAAM does not trace: the
    host detects it from one key and fixes every size, so the sizes are set after detection."""
    from helpers.dit_checkpoints import _patcher, detected_config

    config = detected_config({"time_caption_embed.timestep_embedder.linear_1.bias": (64,)}, hidden_size=64,
                             num_layers=1, num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1,
                             multiple_of=16, axes_dim_rope=[8, 12, 12], axes_lens=[64, 64, 64], text_feat_dim=32)
    return _patcher(config, seed)


def test_untraceable_family_is_a_node_error_naming_it(pack, comfy_host):
    import comfy.supported_models as sm

    model = build_omnigen2()
    assert type(model.model.model_config) is sm.Omnigen2
    with pytest.raises(ValueError, match="cannot trace this model family: Omnigen2 / OmniGen2Transformer2DModel\\. "
                                         "DAAM traces .*Flux.1 \\(dev, schnell, Kontext\\), Chroma, Wan 2.1 / 2.2 "
                                         ".*, Qwen-Image .*, Flux.2 .* and HiDream"):
        pack.DAAMTraceModel.execute(model)
    latent = {"samples": torch.zeros(1, 16, 4, 4)}
    with pytest.raises(ValueError, match="cannot trace this model family"):
        pack.DAAMKSampler.execute(model, 1, 1, 1.0, "euler", "normal", [], [], latent)


def test_flux_with_a_real_t5_encoder_and_long_prompt(pack, comfy_host):
    """The host's own Flux text encoder (CLIP-L + T5, tiny configs): a long prompt gives more than 256 T5 tokens, the
    words are found at the T5 positions the host tokenized, and the text check re-encodes with that CLIP."""
    import node_helpers

    from helpers.dit_checkpoints import build_flux, build_tiny_flux_clip

    clip = build_tiny_flux_clip(seed=5)
    model = build_flux(seed=6, dev=True, context_dim=64, pooled_dim=32)
    text = "a (cat:1.3) and a dog, " + ", ".join(["a small wooden house"] * 60) + ", a golden dragon"
    tokens = clip.tokenize(text)
    t5 = [t for chunk in tokens["t5xxl"] for t in chunk]
    pos = node_helpers.conditioning_set_values(comfy_encode(clip, text), {"guidance": 3.5})
    neg = comfy_encode(clip, "")
    assert pos[0][0].shape[1] == len(t5) > 256  # past T5's 256-token minimum
    plain = ksample(model, pos, neg, batch=2, cfg=1.0)
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    samples = ksample(traced_model, pos, neg, batch=2, cfg=1.0)
    assert_same_image(plain, samples, "traced sampling of a long prompt")
    out = pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, text, "", "dragon, cat")
    _, _, masks, maps = out.result
    layout = maps.trace.layout(0)
    (dragon,) = layout.positions("dragon")
    assert dragon > 256 and t5[dragon][0] == clip.tokenizer.t5xxl.tokenizer.convert_tokens_to_ids("▁dragon")
    assert t5[layout.positions("cat")[0]][1] == pytest.approx(1.3)
    assert masks.shape == (4, 48, 64) and all(0 < m.float().mean() < 1 for m in masks)
    with pytest.raises(ValueError, match="not the text the sampler's positive conditioning was encoded from"):
        pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, text.replace("cat", "cow"), "", "dog")


def comfy_encode(clip, text):
    import nodes as host_nodes

    return host_nodes.CLIPTextEncode().encode(clip, text)[0]


def on_pytorch_attention(inner=None):
    """An override that runs the host as ``--use-pytorch-cross-attention`` does: its attention function becomes
    ComfyUI's ``attention_pytorch`` (``inner``: DAAM's override, given that function)."""
    from comfy.ldm.modules.attention import attention_pytorch

    def override(func, *args, **kwargs):
        return inner(attention_pytorch, *args, **kwargs) if inner else attention_pytorch(*args, **kwargs)

    return override


def assert_fused_kernel_is_the_host(pack, model, sample):
    """``sample(model)`` on ComfyUI's ``attention_pytorch``: traced and untraced images identical, the fused kernel
    used, the sums those of the default CPU attention; returns the block names."""
    import importlib

    joint = importlib.import_module(pack.__name__.split(".")[0] + ".daam_core.engine.joint")  # the pack's own copy

    plain = sample(with_override(model, on_pytorch_attention()))
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    to = traced_model.model_options["transformer_options"]
    to["optimized_attention_override"] = on_pytorch_attention(to["optimized_attention_override"])
    fast = sample(traced_model)
    assert_same_image(plain, fast, "traced sampling on the fused kernel")
    assert any(joint._verdicts.values())  # the fused kernel was proven equal to the host's call and used
    slow_model = pack.DAAMTraceModel.execute(model)[0]  # the default CPU attention: normaliser computed chunked
    slow = sample(slow_model)
    a = pack.session_of(traced_model).find(fast).recorded
    b = pack.session_of(slow_model).find(slow).recorded
    assert set(a.sums) == set(b.sums)
    for name in a.sums:  # the same probabilities up to the two attention functions' rounding
        torch.testing.assert_close(a.sums[name], b.sums[name], atol=1e-4, rtol=0)
    return set(a.sums)


@pytest.mark.parametrize("family", ("sd35", "flux-dev"))
def test_pytorch_attention_host_gets_the_same_image_and_sums(pack, models, tokenizers, family):
    pos, neg = cond(family, tokenizers, POS, 1, batch=2), cond(family, tokenizers, NEG, 2, batch=2)
    assert assert_fused_kernel_is_the_host(pack, models[family], lambda m: ksample(m, pos, neg, batch=2))


def test_override_replaced_after_daam_is_named(pack, models, tokenizers):
    traced_model = pack.DAAMTraceModel.execute(models["sd3"])[0]
    rogue = with_override(traced_model, lambda func, *args, **kwargs: func(*args, **kwargs))  # drops DAAM's
    samples = ksample(rogue, cond("sd3", tokenizers, POS, 1), cond("sd3", tokenizers, NEG, 2))
    with pytest.raises(ValueError, match="another node replaced DAAM's attention override"):
        pack.DAAMHeatmaps.execute(rogue, tokenizers["sd3"], {"samples": samples}, POS, NEG, "dog")
