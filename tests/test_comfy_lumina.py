"""Z-Image and Lumina 2 in process against the real ComfyUI host (``comfy/ldm/lumina/model.py``'s ``NextDiT``).

The networks are the host's at a small width with seeded random weights, their class and config picked by the
host's detection (``helpers/lumina_models.py``): Z-Image pads caption and image to 32 tokens each, Lumina 2 has
grouped-query heads (4 query heads over 2 key/value heads). Conditionings are hand-made tensors as long as what
the host's own tokenizers give: Z-Image's Qwen3 tokenizer ships with ComfyUI (``qwen25_tokenizer``) and is used
as it is; Lumina 2's Gemma SentencePiece model travels in the text-encoder file, so a small one is trained here
and run through the host's ``LuminaTokenizer``. Latents are non-square, most samplings have two images.

Which attention call is a main layer is taken from the network itself (forward hooks on ``net.layers``), the
caption's padded length from the context refiner's input, the conditioning length from the network's input.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.images import assert_same_image
from test_comfy_dit import ksample, with_override  # 4-D latents, an override installed as another node does

pytestmark = pytest.mark.host

POS = "a cat and a dog on a red sofa"
NEG = "blurry, low quality"
FAMILIES = ("z_image", "lumina2")
SYSTEM = ("You are an assistant designed to generate superior images with the superior degree of image-text "
          "alignment based on textual prompts or user prompts.")


@pytest.fixture(scope="module")
def models(comfy_host):
    from helpers.lumina_models import build_lumina2, build_z_image

    return {"z_image": build_z_image(seed=11), "lumina2": build_lumina2(seed=12)}


@pytest.fixture(scope="module")
def tokenizers(comfy_host):
    from comfy.text_encoders.z_image import ZImageTokenizer
    from helpers.lumina_models import tiny_gemma_tokenizer

    return {"z_image": ZImageTokenizer(), "lumina2": tiny_gemma_tokenizer()}


def family_of(name):
    from daam_core.hosts.comfy.families import FAMILIES as REGISTRY

    return next(f for f in REGISTRY if f.name == name)


def token_count(tok, text):
    tokens = tok.tokenize_with_weights(text)
    return sum(len(c) for c in next(iter(tokens.values())))


def cond(tok, text, seed, batch=1, **extra):
    from helpers.dit_checkpoints import conditioning

    return conditioning(token_count(tok, text), seed=seed, batch=batch, **extra)


def test_tiny_models_are_the_host_classes(models):
    import comfy.model_base as mb
    import comfy.supported_models as sm

    from daam_core.hosts.comfy.families import dit_spec

    z, lumina = models["z_image"].model, models["lumina2"].model
    assert type(z.model_config) is sm.ZImage and type(lumina.model_config) is sm.Lumina2
    assert type(z) is mb.Lumina2 and type(lumina) is mb.Lumina2
    net = z.diffusion_model
    assert net.pad_tokens_multiple == 32 and len(net.context_refiner) == len(net.noise_refiner) == 2
    attn = lumina.diffusion_model.layers[0].attention
    assert (attn.n_local_heads, attn.n_local_kv_heads) == (4, 2)  # grouped-query
    for model, name in ((z, "z_image"), (lumina, "lumina2")):
        spec = dit_spec(model)
        assert spec.family.name == name and spec.blocks == (("layer", len(model.diffusion_model.layers)),)
        assert spec.heads == model.diffusion_model.n_heads and spec.patch == 2


def test_families_are_in_the_supported_list_and_refuse_other_networks(models):
    """Both entries are listed; each claims only its own NextDiT (Z-Image's modulation or not)."""
    from daam_core.hosts.comfy.families import supported

    text = supported()
    assert "Lumina 2" in text and "Z-Image" in text
    z = models["z_image"].model
    assert family_of("lumina2").describe(z, z.diffusion_model, z.model_config.unet_config) is None
    lumina = models["lumina2"].model
    assert family_of("z_image").describe(lumina, lumina.diffusion_model, lumina.model_config.unet_config) is None
    # newer hosts' NextDiT variants with inputs of their own on the sequence or the modulation stay refused
    newbie = {**lumina.model_config.unet_config, "clip_text_dim": 1024}
    assert family_of("lumina2").describe(lumina, lumina.diffusion_model, newbie) is None
    omni = {**z.model_config.unet_config, "siglip_feat_dim": 1152}
    assert family_of("z_image").describe(z, z.diffusion_model, omni) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_traced_image_is_identical_also_under_another_override(pack, models, tokenizers, family):
    from helpers.images import assert_tracing_keeps_the_host_image

    tok = tokenizers[family]
    pos, neg = cond(tok, POS, 1, batch=2), cond(tok, NEG, 2, batch=2)
    traced_model = assert_tracing_keeps_the_host_image(pack, models[family], lambda m: ksample(m, pos, neg, batch=2),
                                                       family)
    assert set(pack.session_of(traced_model).records[-1].recorded.sums) == {"layer.0", "layer.1"}


class NetworkProbe:
    """Forward hooks on the host's network: which main layer runs now, the caption's padded length (the context
    refiner's input) and the conditioning length (the network's ``context``); and an attention override below
    DAAM's that keeps every call's q, k, mask, batch kinds and the main layer it ran in (None: a refiner)."""

    def __init__(self, net):
        self.calls, self.layer, self.caption, self.context, self.forwards = [], None, None, None, 0
        self.handles = [net.register_forward_pre_hook(self._net, with_kwargs=True),
                        net.context_refiner[0].register_forward_pre_hook(self._caption)]
        for i, layer in enumerate(net.layers):
            self.handles.append(layer.register_forward_pre_hook(lambda m, a, i=i: setattr(self, "layer", i)))
            self.handles.append(layer.register_forward_hook(lambda m, a, o: setattr(self, "layer", None)))
        self.override = self._override()

    def _net(self, module, args, kwargs):
        self.forwards += 1
        self.context = int((args[2] if len(args) > 2 else kwargs["context"]).shape[1])

    def _caption(self, module, args):
        self.caption = int(args[0].shape[1])

    def close(self):
        for h in self.handles:
            h.remove()

    def _override(self):
        """A plain function (ModelPatcher clones deep-copy a bound method, and with it this probe)."""

        def override(func, *args, **kwargs):
            options = kwargs.get("transformer_options") or {}
            mask = args[4] if len(args) > 4 else kwargs.get("mask")
            self.calls.append(dict(q=args[0].detach().clone(), k=args[1].detach().clone(),
                                   skip=kwargs.get("skip_reshape"), layer=self.layer, caption=self.caption,
                                   mask=None if mask is None else mask.detach().clone(), context=self.context,
                                   kinds=list(options.get("cond_or_uncond", []))))
            return func(*args, **kwargs)

        return override


def reference_sums(calls, lengths, n_img, n_streams, images):
    """fp64 softmax over each main layer's whole sequence (caption, its pads, image, its pads), image rows x caption
    columns, summed over heads, folded to each row's own conditioning (the host repeats it to the call's length)."""
    out = {}
    for c in calls:
        if c["layer"] is None:
            continue
        assert c["skip"]  # [B, H, L, D]
        q, k = c["q"].double(), c["k"].double()
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if c["mask"] is not None:
            scores = scores + c["mask"].double()
        text, start = c["context"], c["caption"]  # caption tokens; the image follows the padded caption
        p = scores.softmax(-1)[:, :, start:start + n_img, :text].sum(1)
        acc = out.setdefault(f"layer.{c['layer']}", torch.zeros(n_streams, n_img, max(lengths.values()),
                                                                 dtype=torch.float64))
        for j, kind in enumerate(c["kinds"]):
            t = lengths[kind]
            for i in range(images):
                acc[kind * images + i, :, :t] += p[j * images + i].view(n_img, text // t, t).sum(1)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_probabilities_equal_fp64_reference(pack, models, tokenizers, family):
    """Two images, a negative prompt of another length, one step; only the main layers are recorded (the refiners'
    calls, text alone or image alone, are not), the pads are in the softmax and never mapped."""
    model, tok = models[family], tokenizers[family]
    long_pos = POS + ", " + ", ".join(["a small wooden house"] * 12)
    pos, neg = cond(tok, long_pos, 1), cond(tok, NEG, 2)
    net = model.model.diffusion_model
    probe = NetworkProbe(net)
    try:
        traced_model = pack.DAAMTraceModel.execute(with_override(model, probe.override))[0]
        samples = ksample(traced_model, pos, neg, batch=2)
    finally:
        probe.close()
    rec = pack.session_of(traced_model).find(samples).recorded
    lengths = {0: pos[0][0].shape[1], 1: neg[0][0].shape[1]}
    assert lengths[0] != lengths[1]
    n_img = 3 * 4
    main = [c for c in probe.calls if c["layer"] is not None]
    refiners = [c for c in probe.calls if c["layer"] is None]
    pad = net.pad_tokens_multiple or 1
    image_keys = -(-n_img // pad) * pad
    assert len(main) == len(net.layers) * probe.forwards
    assert len(refiners) == (len(net.context_refiner) + len(net.noise_refiner)) * probe.forwards
    assert all(c["k"].shape[2] in (c["caption"], image_keys) for c in refiners)  # text alone or image alone
    for c in main:
        assert c["caption"] == -(-c["context"] // pad) * pad  # the host's caption pads
        assert c["k"].shape[2] == c["caption"] + image_keys and c["mask"] is None  # the host masks no main layer
    if pad > 1:
        assert any(c["caption"] > c["context"] for c in main)  # pad keys were in the softmax
    expected = reference_sums(probe.calls, lengths, n_img, 4, 2)
    names = {f"layer.{i}" for i in range(len(net.layers))}
    assert set(rec.sums) == set(expected) == names
    worst = 0.0
    for name, ref in expected.items():
        torch.testing.assert_close(rec.sums[name].double(), ref, atol=1e-5, rtol=0)
        worst = max(worst, float((rec.sums[name].double() - ref).abs().max()))
        assert rec.layers[name].kind == "joint" and rec.layers[name].hw == (3, 4)
    print(f"{family}: max abs difference to fp64 {worst:.2e}")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_masked_caption_reaches_only_the_context_refiner(pack, models, tokenizers, family):
    """A conditioning whose encoder masked its tail (``attention_mask`` with zeros, as the host's encoders return
    after a pad token; an all-ones mask is dropped by ``model_base.Lumina2.extra_conds``): ComfyUI hands the mask to
    the context refiner alone and runs the main layers unmasked, so the recorder takes the main layers' softmax as
    the host computes it, masked tokens included. The host runs such a mask only at one image per call, and Z-Image
    only for a caption of a whole number of pads (its ``[B, T]`` mask meets the padded caption's keys): this test
    stays inside that."""
    model, tok = models[family], tokenizers[family]
    n = 32 if family == "z_image" else token_count(tok, POS)
    mask = torch.ones(1, n, dtype=torch.long)
    mask[:, n - 3:] = 0
    from helpers.dit_checkpoints import conditioning

    pos, neg = conditioning(n, seed=1, attention_mask=mask), cond(tok, NEG, 2)
    net = model.model.diffusion_model
    plain = ksample(model, pos, neg)
    probe = NetworkProbe(net)
    try:
        traced_model = pack.DAAMTraceModel.execute(with_override(model, probe.override))[0]
        samples = ksample(traced_model, pos, neg)
    finally:
        probe.close()
    assert_same_image(plain, samples, f"{family} traced sampling of a masked caption")
    masked = [c for c in probe.calls if c["mask"] is not None]
    assert all(c["layer"] is None and c["k"].shape[2] == c["caption"] for c in masked)  # 0.3.75: the context refiner
    rec = pack.session_of(traced_model).find(samples).recorded
    expected = reference_sums(probe.calls, {0: n, 1: neg[0][0].shape[1]}, 12, 2, 1)
    assert set(rec.sums) == set(expected) == {"layer.0", "layer.1"}
    for name, ref in expected.items():
        torch.testing.assert_close(rec.sums[name].double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_mask_given_to_a_main_layer_is_applied_as_the_host_applies_it(pack, models, tokenizers, family):
    """ComfyUI's Lumina layers pass the mask by position (``optimized_attention_masked(q, k, v, heads, mask,
    ...)``). A node above DAAM that hands the main layers an additive ``[L, L]`` mask there (some text keys shut,
    the rest jittered) changes the host's attention, and the recorded sums follow the same masked softmax."""
    model, tok = models[family], tokenizers[family]
    pos, neg = cond(tok, POS, 1), cond(tok, NEG, 2)
    net = model.model.diffusion_model
    image_keys = padded_count(model, 12)
    gen = torch.Generator().manual_seed(3)

    def masker(daam):
        def override(func, *args, **kwargs):
            length = args[1].shape[2]
            if len(args) > 4 and length > image_keys and args[0].shape[2] == length and length - image_keys in masks:
                args = args[:4] + (masks[length - image_keys],) + args[5:]
            return daam(func, *args, **kwargs)

        return override

    masks = {}
    for n in (token_count(tok, POS), token_count(tok, NEG)):
        caption = padded_count(model, n)
        m = torch.randn(caption + image_keys, caption + image_keys, generator=gen) * 0.5
        m[:, 1:3] = -math.inf
        masks[caption] = m
    probe = NetworkProbe(net)
    try:
        traced_model = pack.DAAMTraceModel.execute(with_override(model, probe.override))[0]
        to = traced_model.model_options["transformer_options"]
        to["optimized_attention_override"] = masker(to["optimized_attention_override"])
        samples = ksample(traced_model, pos, neg, batch=2)
    finally:
        probe.close()
    main = [c for c in probe.calls if c["layer"] is not None]
    assert main and all(c["mask"] is not None for c in main)
    assert not any(c["mask"] is not None for c in probe.calls if c["layer"] is None)
    rec = pack.session_of(traced_model).find(samples).recorded
    expected = reference_sums(probe.calls, {0: pos[0][0].shape[1], 1: neg[0][0].shape[1]}, 12, 4, 2)
    for name, ref in expected.items():
        assert torch.all(ref[:, :, 1:3] == 0)  # the shut keys
        torch.testing.assert_close(rec.sums[name].double(), ref, atol=1e-5, rtol=0)


def padded_count(model, count):
    """The caption's key count on a main layer: ``count`` up to the network's pad multiple."""
    pad = model.model.diffusion_model.pad_tokens_multiple or 1
    return -(-count // pad) * pad


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_attention_is_recovered(pack, models, tokenizers, family):
    from test_comfy_dit import planted_masks  # the text key dominates a region's image queries

    from daam_core.engine import metrics
    from daam_core.hosts.comfy.dit import conditioning_layout

    model, tok = models[family], tokenizers[family]
    count = token_count(tok, POS)
    dog = conditioning_layout(tok, POS, count, family=family_of(family)).positions("dog")[0]
    keys = padded_count(model, count)  # a 16 x 24 latent has 96 patches: no image pads at 32
    masks, truth = planted_masks(pack, model, tok, keys, dog,
                                 lambda m: ksample(m, cond(tok, POS, 1), cond(tok, NEG, 2), h=16, w=24))
    assert metrics.iou(masks[0] > 0.5, truth) >= 0.9
    assert metrics.iou(masks[1] > 0.5, truth) < 0.5


@pytest.mark.parametrize("text", [POS, "\n\ncat sits, dog", "  dog and the café cat ", "dog", "a 🐱 sleeps 🐶"])
def test_z_image_words_are_the_host_encoded_tokens(tokenizers, text):
    """Z-Image's encoder keeps every token of the templated prompt: words sit at the positions of the host's
    tokens, template tokens (and whitespace-only tokens) belong to no word."""
    from daam_core.hosts.comfy.dit import conditioning_layout

    tok = tokenizers["z_image"]
    hf = tok.qwen3_4b.tokenizer
    ids = [t for chunk in tok.tokenize_with_weights(text)["qwen3_4b"] for t, _ in chunk]
    assert hf.decode(ids) == tok.llama_template.format(text)
    layout = conditioning_layout(tok, text, len(ids), family=family_of("z_image"))
    assert layout.length == len(ids) and layout.ids == tuple(ids)
    words = text.split()
    assert [w.text for w in layout.words] == words
    content = {p for w in layout.words for p in w.positions}
    for p in range(layout.length):
        if p not in content:
            piece = hf.decode([ids[p]])
            assert not piece.strip() or piece in tok.llama_template, piece
    for w in words:
        decoded = hf.decode([ids[p] for p in layout.positions(w)])
        assert w.lower() in decoded.lower(), (w, decoded)
    assert layout.positions(words[0])[0] == min(content) and layout.positions(words[-1])[-1] == max(content)


@pytest.mark.parametrize("key", ("gemma2_2b", "gemma3_4b"))
def test_lumina2_words_skip_the_system_prompt(tokenizers, comfy_host, key):
    """``CLIP Text Encode for Lumina2`` encodes ``"<system prompt> <Prompt Start> <prompt>"`` (the host node's own
    system prompts): given that text, only the prompt's words are words, at the host's token positions after BOS,
    with their weights; a plain prompt (``CLIP Text Encode``) keeps every word. Also through the host's tokenizer
    for a Gemma 3 encoder (``NTokenizer``), which Lumina 2's CLIP loader gives for one."""
    from comfy_extras.nodes_lumina2 import CLIPTextEncodeLumina2
    from helpers.lumina_models import tiny_gemma_tokenizer

    from daam_core.hosts.comfy.dit import conditioning_layout

    tok = tokenizers["lumina2"] if key == "gemma2_2b" else tiny_gemma_tokenizer(gemma3=True)
    spiece = getattr(tok, key).tokenizer.tokenizer  # sentencepiece.SentencePieceProcessor
    user = "a (cat:1.3) and a dog on a red sofa"
    for system in CLIPTextEncodeLumina2.SYSTEM_PROMPT.values():
        text = f"{system} <Prompt Start> {user}"
        entries = [e for chunk in tok.tokenize_with_weights(text)[key] for e in chunk]
        layout = conditioning_layout(tok, text, len(entries), family=family_of("lumina2"))
        assert entries[0][0] == spiece.bos_id() and layout.word_of[0] == -1
        assert [w.text for w in layout.words] == ["a", "cat", "and", "a", "dog", "on", "a", "red", "sofa"]
        head = len(spiece.encode(f"{system} <Prompt Start>", add_bos=False)) + 1  # BOS and the template's tokens
        assert min(p for w in layout.words for p in w.positions) == head
        assert all(k == -1 for k in layout.word_of[:head])
        (sofa,) = [w for w in layout.words if w.text == "sofa"]
        assert spiece.decode([entries[p][0] for p in sofa.positions]) == "sofa"
        assert [entries[p][1] for p in layout.positions("cat")] == pytest.approx([1.3] * len(layout.positions("cat")))
        with pytest.raises(Exception, match="not|no"):
            layout.positions("assistant")
        assert family_of("lumina2").encoded_text(tok, user, len(entries)) == text  # the node's text put back
        assert family_of("lumina2").encoded_text(tok, user, len(entries) + 1) == user  # no system prompt fits
    entries = [e for chunk in tok.tokenize_with_weights(POS)[key] for e in chunk]
    plain = conditioning_layout(tok, POS, len(entries), family=family_of("lumina2"))
    assert [w.text for w in plain.words] == POS.split() and [g.name for g in plain.segments] == ["gemma"]


@pytest.mark.parametrize("family", FAMILIES)
def test_negative_prompt_has_maps_with_true_cfg(pack, models, tokenizers, family):
    model, tok = models[family], tokenizers[family]
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    samples = ksample(traced_model, cond(tok, POS, 1, batch=2), cond(tok, NEG, 2, batch=2), batch=2)
    maps = pack.DAAMHeatmaps.execute(traced_model, tok, {"samples": samples}, POS, NEG, "dog",
                                        negative_words="blurry").result[3]
    neg = maps.trace.word_maps("blurry", branch="uncond")
    assert neg.shape == (2, 1, 48, 64) and torch.isfinite(neg).all() and neg.amax() == 1
    assert not torch.equal(neg[:, 0], maps.trace.word_maps("dog")[:, 0])


@pytest.mark.parametrize("family", FAMILIES)
def test_pytorch_attention_host_gets_the_same_image_and_sums(pack, models, tokenizers, family):
    """On ComfyUI's ``attention_pytorch`` DAAM's fused kernel replaces a main layer's call only where proven equal
    to it: the image is the host's, the sums the CPU attention's."""
    from test_comfy_dit import assert_fused_kernel_is_the_host

    tok = tokenizers[family]
    pos, neg = cond(tok, POS, 1, batch=2), cond(tok, NEG, 2, batch=2)
    blocks = assert_fused_kernel_is_the_host(pack, models[family], lambda m: ksample(m, pos, neg, batch=2))
    assert blocks == {"layer.0", "layer.1"}


@pytest.mark.parametrize("family", FAMILIES)
def test_with_the_host_text_encoder_and_nodes(pack, models, family, comfy_host):
    """The host's own encoder code (tiny configs) through the host's nodes: Z-Image by ``CLIP Text Encode``, Lumina 2
    by ``CLIP Text Encode for Lumina2`` (system prompt). The conditioning is as long as the host's tokens, the
    words are found there, and DAAM Heatmaps re-encodes the text with that CLIP to prove it is the sampler's."""
    import nodes as host_nodes
    from comfy_extras.nodes_lumina2 import CLIPTextEncodeLumina2
    from helpers.lumina_models import build_tiny_lumina2_clip, build_tiny_z_image_clip

    model = models[family]
    user = "a (cat:1.3) and a dog on a red sofa" if family == "lumina2" else POS
    if family == "z_image":
        clip = build_tiny_z_image_clip(seed=21)
        pos, text = host_nodes.CLIPTextEncode().encode(clip, user)[0], user
        key = "qwen3_4b"
    else:
        clip = build_tiny_lumina2_clip(seed=22)
        pos = CLIPTextEncodeLumina2.execute(clip, user, "superior").result[0]
        text = f"{CLIPTextEncodeLumina2.SYSTEM_PROMPT['superior']} <Prompt Start> {user}"
        key = "gemma2_2b"
    neg = host_nodes.CLIPTextEncode().encode(clip, NEG)[0]
    ids = [t for chunk in clip.tokenize(text)[key] for t, _ in chunk]
    assert pos[0][0].shape[1] == len(ids)  # the encoder keeps every token
    plain = ksample(model, pos, neg, batch=2)
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    samples = ksample(traced_model, pos, neg, batch=2)
    assert_same_image(plain, samples, f"{family} traced sampling of the host's conditioning")
    _, _, masks, maps = pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, text, NEG,
                                                     "dog, sofa").result
    layout = maps.trace.layout(0)
    assert [w.text for w in layout.words] == (["a", "cat", "and", "a", "dog", "on", "a", "red", "sofa"]
                                              if family == "lumina2" else POS.split())
    assert masks.shape == (4, 48, 64) and all(0 < m.float().mean() < 1 for m in masks)
    with pytest.raises(ValueError, match="not the text the sampler's positive conditioning was encoded from"):
        pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, text.replace("dog", "cat"), NEG, "dog")
    if family == "lumina2":  # the prompt alone: the node's system prompt is put back, the words are the same
        _, _, alone, maps = pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, user, NEG,
                                                         "dog, sofa").result
        assert maps.trace.layout(0) == layout and torch.equal(alone, masks)
        with pytest.raises(ValueError, match="not the text the sampler's positive conditioning was encoded from"):
            pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, user.replace("dog", "cat"), NEG,
                                         "dog")
