"""Qwen-Image in process against the real ComfyUI host: the host's network at a small width (2 heads of 128, seeded
random weights, built through the host's detection), the host's own Qwen2.5-VL tokenizer with its chat template.

Conditionings are hand-made tensors as long as what the host's encoder keeps of the templated prompt (the tiny
network fits no real Qwen2.5-VL encoder); which positions it keeps is checked against the host's own cut.
Latents are Qwen-Image's 5-D one-frame latents, non-square, most samplings with two images.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.dit_checkpoints import qwen_kept_positions
from helpers.images import assert_same_image, with_override

pytestmark = pytest.mark.host

POS = "a cat and a dog on a red sofa"
NEG = "blurry, low quality"


@pytest.fixture(scope="module")
def model(comfy_host):
    from helpers.dit_checkpoints import build_qwen_image

    return build_qwen_image(seed=7, layers=2)


@pytest.fixture(scope="module")
def tok(comfy_host):
    from comfy.text_encoders.qwen_image import QwenImageTokenizer

    return QwenImageTokenizer()


def cond(tok, text, seed, batch=1, **extra):
    from helpers.dit_checkpoints import conditioning

    return conditioning(len(qwen_kept_positions(tok, text)[1]), seed=seed, batch=batch, **extra)


def ksample(model, positive, negative, batch=1, h=6, w=8, seed=1, steps=1, cfg=3.0):
    import comfy.sample

    latent = torch.zeros(batch, 16, 1, h, w)  # Qwen-Image's latent: Wan 2.1's format, one frame
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent, denoise=1.0,
                               seed=seed, disable_pbar=True)



def test_tiny_model_is_what_the_host_detects_from_its_weights(model):
    import comfy.model_detection as md
    import comfy.supported_models as sm

    from daam_core.hosts.comfy.families import dit_spec

    assert type(model.model.model_config) is sm.QwenImage
    assert type(md.model_config_from_unet(model.model.diffusion_model.state_dict(), "")) is sm.QwenImage
    spec = dit_spec(model.model)
    assert (spec.family.name, spec.patch, spec.heads, spec.blocks) == ("qwen_image", 2, 2, (("double", 2),))


def test_traced_image_is_identical_also_under_another_override(pack, model, tok):
    from helpers.images import assert_tracing_keeps_the_host_image

    pos, neg = cond(tok, POS, 1, batch=2), cond(tok, NEG, 2, batch=2)
    traced_model = assert_tracing_keeps_the_host_image(pack, model, lambda m: ksample(m, pos, neg, batch=2),
                                                       "Qwen-Image")
    assert set(pack.session_of(traced_model).records[-1].recorded.sums) == {"double.0", "double.1"}


def collector(store):
    """An override below DAAM's that keeps every attention call's q, k, mask, batch kinds and block."""

    def collect(func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        store.append(dict(q=args[0].detach().clone(), k=args[1].detach().clone(), skip=kwargs.get("skip_reshape"),
                          mask=kwargs.get("mask"), kinds=list(options.get("cond_or_uncond", [])),
                          block=(options.get("block_type"), options.get("block_index"))))
        return func(*args, **kwargs)

    return collect


@pytest.mark.parametrize("refs", (0, 1))
def test_recorded_probabilities_equal_fp64_reference(pack, model, tok, refs):
    """Two images, a negative prompt of another length (repeated to the lcm), with and without an Edit-style
    reference latent (in the softmax, not mapped); the text length is read from each call's keys."""
    extra = {"reference_latents": [torch.randn(1, 16, 1, 4, 6, generator=torch.Generator().manual_seed(5))]} \
        if refs else {}
    pos, neg = cond(tok, POS, 1, **extra), cond(tok, NEG, 2, **extra)
    store = []
    traced_model = pack.DAAMTraceModel.execute(with_override(model, collector(store)))[0]
    samples = ksample(traced_model, pos, neg, batch=2)
    rec = pack.session_of(traced_model).find(samples).recorded
    lengths = {0: pos[0][0].shape[1], 1: neg[0][0].shape[1]}
    assert lengths[0] != lengths[1]
    n_img, n_ref = 3 * 4, 2 * 3 * refs
    expected = {}
    for c in store:
        assert c["skip"] and c["block"][0] == "double"  # [B, H, L, D], [text, image, references]
        q, k = c["q"].double(), c["k"].double()
        text = k.shape[2] - n_img - n_ref
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if c["mask"] is not None:
            scores = scores + c["mask"].double()
        p = scores.softmax(-1)[:, :, text:text + n_img, :text].sum(1)
        acc = expected.setdefault(f"double.{c['block'][1]}", torch.zeros(4, n_img, max(lengths.values()),
                                                                          dtype=torch.float64))
        for j, kind in enumerate(c["kinds"]):
            t = lengths[kind]
            for i in range(2):
                acc[kind * 2 + i, :, :t] += p[j * 2 + i].view(n_img, text // t, t).sum(1)
    assert set(rec.sums) == set(expected) == {"double.0", "double.1"}
    for name, ref in expected.items():
        torch.testing.assert_close(rec.sums[name].double(), ref, atol=1e-5, rtol=0)
        assert rec.layers[name].kind == "joint"


def test_planted_attention_is_recovered(pack, model, tok):
    from test_comfy_dit import planted_masks  # the text key dominates a region's image queries

    from daam_core.engine import metrics
    from daam_core.hosts.comfy.dit import conditioning_layout

    count = len(qwen_kept_positions(tok, POS)[1])
    dog = conditioning_layout(tok, POS, count).positions("dog")[0]
    masks, truth = planted_masks(pack, model, tok, count, dog,
                                 lambda m: ksample(m, cond(tok, POS, 1), cond(tok, NEG, 2), h=16, w=24))
    assert metrics.iou(masks[0] > 0.5, truth) >= 0.9
    assert metrics.iou(masks[1] > 0.5, truth) < 0.5


@pytest.mark.parametrize("text", [POS, "\n\ncat sits, dog", "  dog and the café cat ", "dog", "a 🐱 sleeps 🐶"])
def test_word_positions_are_the_host_encoded_tokens(tok, text):
    """Words sit at the positions the host's encoder keeps of the templated prompt (template tokens are no word);
    first and last words included, also when the first shares a token with the template's newline."""
    from daam_core.hosts.comfy.dit import conditioning_layout

    hf = tok.qwen25_7b.tokenizer
    tokens, kept = qwen_kept_positions(tok, text)
    ids = [t for chunk in tokens["qwen25_7b"] for t, _, _ in chunk]
    layout = conditioning_layout(tok, text, len(kept))
    assert layout.length == len(kept) and layout.ids == tuple(ids[p] for p in kept)
    words = text.split()
    assert [w.text for w in layout.words] == words
    content = {p for w in layout.words for p in w.positions}
    for p in range(layout.length):
        if p not in content:  # the template's tail and, where the cut keeps it, its head; or whitespace
            piece = hf.decode([layout.ids[p]])
            assert not piece.strip() or piece in tok.llama_template, piece
    for w in words:
        decoded = hf.decode([layout.ids[p] for p in layout.positions(w)])
        assert w.lower() in decoded.lower(), (w, decoded)
    assert layout.positions(words[0])[0] == min(content) and layout.positions(words[-1])[-1] == max(content)


def test_first_word_sharing_a_template_token(tok):
    """``"\\n\\ncat"``: the host's tokenizer merges the template's newline with the prompt's two into one token, so
    its cut keeps ``<|im_start|>user`` too; that token holds no character of a word and belongs to none."""
    from daam_core.hosts.comfy.dit import conditioning_layout

    hf = tok.qwen25_7b.tokenizer
    tokens, kept = qwen_kept_positions(tok, "\n\ncat")
    layout = conditioning_layout(tok, "\n\ncat", len(kept))
    pieces = hf.convert_ids_to_tokens(list(layout.ids))
    assert pieces[:4] == ["<|im_start|>", "user", "ĊĊĊ", "cat"]
    assert layout.positions("cat") == (3,) and layout.word_of[:3] == (-1, -1, -1)


def test_negative_prompt_has_maps_with_true_cfg(pack, model, tok):
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    samples = ksample(traced_model, cond(tok, POS, 1, batch=2), cond(tok, NEG, 2, batch=2), batch=2)
    out = pack.DAAMHeatmaps.execute(traced_model, tok, {"samples": samples}, POS, NEG, "dog",
                                       negative_words="blurry")
    maps = out.result[3]
    neg = maps.trace.word_maps("blurry", branch="uncond")
    assert neg.shape == (2, 1, 48, 64) and torch.isfinite(neg).all() and neg.amax() == 1
    assert not torch.equal(neg[:, 0], maps.trace.word_maps("dog")[:, 0])
    samples = ksample(traced_model, cond(tok, POS, 1), cond(tok, NEG, 2), cfg=1.0)  # cfg 1: no negative branch
    with pytest.raises(ValueError, match="never evaluated the negative prompt"):
        pack.DAAMHeatmaps.execute(traced_model, tok, {"samples": samples}, POS, NEG, "dog",
                                     negative_words="blurry")


def test_pytorch_attention_host_gets_the_same_image_and_sums(pack, model, tok):
    """With ComfyUI's ``attention_pytorch`` (``--use-pytorch-cross-attention``) DAAM's fused kernel replaces the
    host's joint call only where proven equal to it: the image is the host's, the sums the CPU attention's."""
    from test_comfy_dit import assert_fused_kernel_is_the_host

    pos, neg = cond(tok, POS, 1, batch=2), cond(tok, NEG, 2, batch=2)
    blocks = assert_fused_kernel_is_the_host(pack, model, lambda m: ksample(m, pos, neg, batch=2))
    assert blocks == {"double.0", "double.1"}


@pytest.mark.parametrize("refs", (0, 1))
def test_output_similarity_sums_equal_fp64_reference(pack, model, tok, refs):
    """Output-similarity sums (ConceptAttention-style) from the host's outputs, over a masked joint call."""
    from test_comfy_dit import output_collector, reference_output_sums

    extra = {"reference_latents": [torch.randn(1, 16, 1, 4, 6, generator=torch.Generator().manual_seed(5))]} \
        if refs else {}
    pos, neg = cond(tok, POS, 1, **extra), cond(tok, NEG, 2, **extra)
    plain = ksample(model, pos, neg, batch=2)
    store = []
    traced_model = pack.DAAMTraceModel.execute(with_override(model, output_collector(store)),
                                               record_output_similarity=True)[0]
    samples = ksample(traced_model, pos, neg, batch=2)
    assert_same_image(plain, samples, "Qwen-Image traced with output similarity")
    rec = pack.session_of(traced_model).find(samples).recorded
    lengths = {0: pos[0][0].shape[1], 1: neg[0][0].shape[1]}
    names = [f"double.{c['block'][1]}" for c in store]
    expected = reference_output_sums(store, lengths, 3 * 4, 2 * 3 * refs, 4, lambda kind, i: kind * 2 + i,
                                     max(lengths.values()), names)
    assert set(rec.extras["output_sums"]) == set(expected) == {"double.0", "double.1"}
    for name, ref in expected.items():
        torch.testing.assert_close(rec.extras["output_sums"][name].double(), ref, atol=1e-5, rtol=0)
