"""Flux.2 in process against the real ComfyUI host: the host's Flux network with global modulation at a small width
(2 heads of 128, seeded random weights, built through the host's detection), the host's own Flux.2 tokenizer around
a tiny Tekken file, and the host's Mistral text encoder at a tiny size (``helpers/flux2_checkpoints.py``).

Most conditionings are hand-made tensors as long as the host's tokenizer makes the templated prompt (the encoder is
run in one test); the network pads them on the left to 512 tokens, which each call's keys and the host's own
``extra_conds`` show. Latents are Flux.2's 128-channel ones (patch 1), non-square, most samplings with two images.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.images import assert_same_image, assert_tracing_keeps_the_host_image, with_override

pytestmark = pytest.mark.host

POS = "a cat and a dog on a red sofa"
NEG = "blurry, low quality"
LONG = POS + ", " + ", ".join(["a small wooden house"] * 100) + ", a golden dragon"  # > 512 tokens


@pytest.fixture(scope="module")
def model(comfy_host):
    from helpers.flux2_checkpoints import build_tiny_flux2

    return build_tiny_flux2(seed=11, context_dim=64)


@pytest.fixture(scope="module")
def tok(comfy_host):
    from helpers.flux2_checkpoints import flux2_tokenizer

    return flux2_tokenizer()


@pytest.fixture(scope="module")
def family(comfy_host):
    from daam_core.hosts.comfy.families import FAMILIES

    return next(f for f in FAMILIES if f.name == "flux2")


def n_tokens(tok, text):
    return sum(len(c) for c in tok.tokenize_with_weights(text)["mistral3_24b"])


def cond(tok, text, seed, batch=1, **extra):
    from helpers.dit_checkpoints import conditioning

    return conditioning(n_tokens(tok, text), seed=seed, batch=batch, **extra)


def ksample(model, positive, negative, batch=1, h=6, w=8, seed=1, steps=1, cfg=3.0):
    import comfy.sample

    latent = torch.zeros(batch, 128, h, w)  # Flux.2's latent: 128 channels, 16 pixels a cell
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent, denoise=1.0,
                               seed=seed, disable_pbar=True)


def host_padded(model, cross_attn):
    """The text the host's network gets for a conditioning (``model_base.Flux2.extra_conds``)."""
    out = model.model.extra_conds(cross_attn=cross_attn, pooled_output=None, noise=torch.zeros(1, 128, 4, 4),
                                  device="cpu")
    return out["c_crossattn"].cond


def test_tiny_model_is_what_the_host_detects_and_is_traced(model):
    import comfy.model_detection as md
    import comfy.supported_models as sm

    from daam_core.hosts.comfy.families import dit_spec

    assert type(model.model.model_config) is sm.Flux2
    assert type(md.model_config_from_unet(model.model.diffusion_model.state_dict(), "")) is sm.Flux2
    assert model.model.diffusion_model.params.global_modulation
    spec = dit_spec(model.model)
    assert (spec.family.name, spec.label, spec.patch, spec.heads, spec.blocks, spec.image_first) == \
        ("flux2", "Flux.2", 1, 2, (("double", 1), ("single", 1)), False)


def test_text_length_is_what_the_host_pads_to(model, family):
    """The call's text: the conditioning padded on the left to 512 tokens, longer ones as they are."""
    for n in (1, 57, 511, 512, 600):
        x = torch.arange(1, n + 1, dtype=torch.float32).view(1, n, 1)
        padded = host_padded(model, x)
        assert padded.shape[1] == family.text_length({"cross_attn": x}) == max(n, 512)
        assert torch.equal(padded[0, -n:, 0], x[0, :, 0]) and not padded[0, :-n].any()


def test_traced_image_is_identical_also_under_another_override(pack, model, tok):
    pos, neg = cond(tok, POS, 1, batch=2), cond(tok, NEG, 2, batch=2)
    traced_model = assert_tracing_keeps_the_host_image(pack, model, lambda m: ksample(m, pos, neg, batch=2),
                                                       "Flux.2")
    rec = pack.session_of(traced_model).records[-1]
    assert set(rec.recorded.sums) == {"double.0", "single.0"} and rec.token_counts == (512, 512)


def collector(store):
    """An override below DAAM's that keeps every attention call's q, k, mask, batch kinds and block."""

    def collect(func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        store.append(dict(q=args[0].detach().clone(), k=args[1].detach().clone(), skip=kwargs.get("skip_reshape"),
                          mask=kwargs.get("mask"), kinds=list(options.get("cond_or_uncond", [])),
                          block=(options.get("block_type"), options.get("block_index"))))
        return func(*args, **kwargs)

    return collect


@pytest.mark.parametrize("case", ("padded", "long", "references"))
def test_recorded_probabilities_equal_fp64_reference(pack, model, tok, case):
    """Two images and a negative prompt of another length: padded to 512 both (one batched call), or a positive
    past 512 tokens (the host runs it in a call of its own); with a reference latent after the image (in the
    softmax, not mapped). The text is what each call's keys hold besides the image and the references."""
    extra = {"reference_latents": [torch.randn(1, 128, 4, 6, generator=torch.Generator().manual_seed(5))]} \
        if case == "references" else {}
    pos = cond(tok, LONG if case == "long" else POS, 1, **extra)
    neg = cond(tok, NEG + ", watermark", 2, **extra)
    store = []
    traced_model = pack.DAAMTraceModel.execute(with_override(model, collector(store)))[0]
    samples = ksample(traced_model, pos, neg, batch=2)
    rec = pack.session_of(traced_model).find(samples).recorded
    lengths = {0: max(pos[0][0].shape[1], 512), 1: 512}
    assert pos[0][0].shape[1] != neg[0][0].shape[1] and (pos[0][0].shape[1] > 512) == (case == "long")
    assert rec.token_counts == [lengths[0], lengths[1]]
    n_img, n_ref = 6 * 8, 4 * 6 * bool(extra)
    expected = {}
    for c in store:
        assert c["skip"] and c["block"][0] in ("double", "single")  # [B, H, L, D], [text, image, references]
        q, k = c["q"].double(), c["k"].double()
        text = k.shape[2] - n_img - n_ref
        assert text == max(lengths[kind] for kind in c["kinds"])
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if c["mask"] is not None:
            scores = scores + c["mask"].double()
        p = scores.softmax(-1)[:, :, text:text + n_img, :text].sum(1)
        acc = expected.setdefault(f"{c['block'][0]}.{c['block'][1]}",
                                  torch.zeros(4, n_img, max(lengths.values()), dtype=torch.float64))
        for j, kind in enumerate(c["kinds"]):
            for i in range(2):
                acc[kind * 2 + i, :, :text] += p[j * 2 + i]
    assert store and all(len(c["kinds"]) == (1 if case == "long" else 2) for c in store)  # long: never batched
    assert set(rec.sums) == set(expected) == {"double.0", "single.0"}
    for name, ref in expected.items():
        torch.testing.assert_close(rec.sums[name].double(), ref, atol=1e-5, rtol=0)
        assert rec.layers[name].kind == "joint" and rec.layers[name].hw == (6, 8)


def test_word_positions_are_where_the_host_puts_the_tokens(model, tok, family):
    """Each word sits where its tokens reach the network: the host's tokenizer output (the start token, the
    template, the prompt) padded on the left by the host's own ``extra_conds``; template tokens are no word."""
    from daam_core.hosts.comfy.dit import conditioning_layout

    hf = tok.mistral3_24b.tokenizer
    for text in (POS, "  dog and the café cat, (red:1.2) sofa ", "dog", "a 🐱 sleeps 🐶", LONG):
        flat = [e for c in tok.tokenize_with_weights(text, return_word_ids=True)["mistral3_24b"] for e in c]
        n = len(flat)
        marks = host_padded(model, torch.arange(1, n + 1, dtype=torch.float32).view(1, n, 1))[0, :, 0]
        own = conditioning_layout(tok, text, n, family=family)  # over the conditioning's own tokens
        assert own.ids == tuple(e[0] for e in flat) and own.segments[0].name == "mistral"
        layout = family.call_layout(own, max(n, 512))  # over a model call's text
        assert layout.length == marks.shape[0] == max(n, 512)
        source = [int(m) - 1 for m in marks]  # the tokenizer's position at each text position; -1: padding
        assert layout.ids == tuple(flat[s][0] if s >= 0 else 11 for s in source)
        assert flat[0][0] == 1 and layout.word_of[source.index(0)] == -1  # the start token <s>
        words = text.split()
        assert [w.text for w in layout.words] == words
        for w in layout.words:
            decoded = hf.decode([layout.ids[p] for p in w.positions])
            assert w.text in decoded and all(source[p] >= 0 for p in w.positions), (w, decoded)
        content = {p for w in layout.words for p in w.positions}
        for p in range(layout.length):
            if p not in content and source[p] >= 0:  # the start token, the template, whitespace
                piece = hf.decode([layout.ids[p]])
                assert not piece.strip() or piece in tok.llama_template or p == source.index(0), piece
    layout = conditioning_layout(tok, LONG, n_tokens(tok, LONG), family=family)
    dragon = layout.positions("dragon")
    assert min(dragon) > 512 and hf.decode([layout.ids[p] for p in dragon]).strip() == "dragon"
    assert layout.positions("house#100")
    assert layout.positions("red") and "red" in hf.decode([layout.ids[p] for p in layout.positions("red")])


def test_planted_attention_is_recovered(pack, model, tok, family):
    """A text key planted at 'dog''s position (512 text tokens, the prompt last) dominates a region of the
    8 x 12 latent: the mask of 'dog' is that region, 'cat''s is not."""
    from test_comfy_dit import planted_masks

    from daam_core.engine import metrics
    from daam_core.hosts.comfy.dit import conditioning_layout

    layout = family.call_layout(conditioning_layout(tok, POS, n_tokens(tok, POS), family=family), 512)
    dog = layout.positions("dog")[0]
    assert 512 - n_tokens(tok, POS) <= dog < 512
    masks, truth = planted_masks(pack, model, tok, 512, dog,
                                 lambda m: ksample(m, cond(tok, POS, 1), cond(tok, NEG, 2), h=8, w=12))
    assert metrics.iou(masks[0] > 0.5, truth) >= 0.9
    assert metrics.iou(masks[1] > 0.5, truth) < 0.5


def test_negative_words_need_a_negative_branch(pack, model, tok):
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    samples = ksample(traced_model, cond(tok, POS, 1), cond(tok, NEG, 2), cfg=1.0)  # its usual, distilled cfg
    heat = pack.DAAMHeatmaps.execute(traced_model, tok, {"samples": samples}, POS, NEG, "dog").result[0]
    assert heat.shape == (1, 96, 128, 3)  # 16 pixels a latent cell
    with pytest.raises(ValueError, match="Flux.2's guidance is distilled.*Clear negative_words"):
        pack.DAAMHeatmaps.execute(traced_model, tok, {"samples": samples}, POS, NEG, "dog", negative_words="blurry")
    samples = ksample(traced_model, cond(tok, POS, 1, batch=2), cond(tok, NEG, 2, batch=2), batch=2, cfg=3.0)
    maps = pack.DAAMHeatmaps.execute(traced_model, tok, {"samples": samples}, POS, NEG, "dog",
                                     negative_words="blurry").result[3]
    neg = maps.trace.word_maps("blurry", branch="uncond")
    assert neg.shape == (2, 1, 96, 128) and torch.isfinite(neg).all() and neg.amax() == 1
    assert not torch.equal(neg[:, 0], maps.trace.word_maps("dog")[:, 0])


def test_real_text_encoder_with_its_tokenizer_in_the_file(pack, comfy_host):
    """The host's Mistral text encoder loaded from a state dict that carries its Tekken tokenizer, as CLIPLoader
    loads a file: CLIP Text Encode's conditioning, the padding to 512, the words at the positions the host encoded
    (a prompt past 512 tokens too), the text check re-encoding with that CLIP."""
    import nodes as host_nodes

    from helpers.flux2_checkpoints import FLUX2_TEXT_DIM, build_tiny_flux2, build_tiny_flux2_clip

    clip = build_tiny_flux2_clip(seed=5)
    model = build_tiny_flux2(seed=6, context_dim=FLUX2_TEXT_DIM)
    hf = clip.tokenizer.mistral3_24b.tokenizer
    for text in (POS, LONG):
        tokens = [t for c in clip.tokenize(text)["mistral3_24b"] for t in c]
        pos = host_nodes.CLIPTextEncode().encode(clip, text)[0]
        neg = host_nodes.CLIPTextEncode().encode(clip, NEG)[0]
        assert pos[0][0].shape == (1, len(tokens), FLUX2_TEXT_DIM)
        plain = ksample(model, pos, neg, batch=2, cfg=1.0)
        traced_model = pack.DAAMTraceModel.execute(model)[0]
        samples = ksample(traced_model, pos, neg, batch=2, cfg=1.0)
        assert_same_image(plain, samples, "traced sampling with the real text encoder")
        assert pack.session_of(traced_model).find(samples).token_counts == (max(len(tokens), 512), None)
        out = pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, text, "", "dog, cat")
        _, _, masks, maps = out.result
        layout = maps.trace.layout(0)
        pad = layout.length - len(tokens)
        assert pad == max(0, 512 - len(tokens)) and layout.ids[pad:] == tuple(t[0] for t in tokens)
        assert hf.decode([layout.ids[p] for p in layout.positions("dog")]).strip() == "dog"
        assert masks.shape == (4, 96, 128) and all(0 < m.float().mean() < 1 for m in masks)
        with pytest.raises(ValueError, match="not the text the sampler's positive conditioning was encoded from"):
            pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, text.replace("cat", "dog"), "",
                                      "dog")


def test_pytorch_attention_host_gets_the_same_image_and_sums(pack, model, tok):
    """With ComfyUI's ``attention_pytorch`` DAAM's fused kernel replaces the host's joint call only where proven
    equal to it: the image is the host's, the sums the CPU attention's."""
    from test_comfy_dit import assert_fused_kernel_is_the_host

    pos, neg = cond(tok, POS, 1, batch=2), cond(tok, NEG, 2, batch=2)
    blocks = assert_fused_kernel_is_the_host(pack, model, lambda m: ksample(m, pos, neg, batch=2))
    assert blocks == {"double.0", "single.0"}
