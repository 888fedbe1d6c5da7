"""HiDream in process against the real ComfyUI host: the host's HiDream-I1 network at a small width (2 heads of 128,
2 double + 1 single blocks, seeded random weights, built through the host's detection) and the host's own HiDream
tokenizer (``helpers/hidream_checkpoints.py``).

Conditionings are hand-made tensors as long as the host's tokenizer makes them: T5's 128 tokens and Llama 3.1's
hidden states (one per listed layer). Where each call's text comes from (T5, the last listed Llama layer, the block's
Llama layer) is read from the host's network itself, with marked inputs. Latents are non-square, most samplings
with two images.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers.images import assert_same_image, assert_tracing_keeps_the_host_image, with_override

pytestmark = pytest.mark.host

POS = "a cat and a dog on a (red:1.2) sofa"
NEG = "blurry, low quality"
LONG = POS + ", " + ", ".join(["a small wooden house"] * 40) + ", a golden dragon"  # > 128 tokens


@pytest.fixture(scope="module")
def model(comfy_host):
    from helpers.hidream_checkpoints import build_tiny_hidream

    return build_tiny_hidream(seed=12)


@pytest.fixture(scope="module")
def tok(comfy_host):
    from helpers.hidream_checkpoints import hidream_tokenizer

    return hidream_tokenizer()


@pytest.fixture(scope="module")
def family(comfy_host):
    from daam_core.hosts.comfy.families import FAMILIES

    return next(f for f in FAMILIES if f.name == "hidream")


def cond(tok, text, seed, batch=1):
    from helpers.hidream_checkpoints import hidream_conditioning

    return hidream_conditioning(tok, text, seed=seed, batch=batch)


def call_text(tok, text):
    from helpers.hidream_checkpoints import token_counts

    t5, llama = token_counts(tok, text)
    return t5 + 2 * llama


def layout_of(tok, family, text):
    """The prompt's layout over a model call's text, as DAAM Heatmaps builds it."""
    from daam_core.hosts.comfy.dit import conditioning_layout

    own = conditioning_layout(tok, text, 128, family=family)
    return family.call_layout(own, call_text(tok, text), tok, text)


def ksample(model, positive, negative, batch=1, h=6, w=8, seed=1, steps=1, cfg=3.0):
    import comfy.sample

    latent = torch.zeros(batch, 16, h, w)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent, denoise=1.0,
                               seed=seed, disable_pbar=True)


def test_tiny_model_is_what_the_host_detects_and_is_traced(model):
    import comfy.model_detection as md
    import comfy.supported_models as sm

    from daam_core.hosts.comfy.families import dit_spec

    assert type(model.model.model_config) is sm.HiDream
    assert type(md.model_config_from_unet(model.model.diffusion_model.state_dict(), "")) is sm.HiDream
    spec = dit_spec(model.model)
    assert (spec.family.name, spec.label, spec.patch, spec.heads, spec.blocks, spec.image_first) == \
        ("hidream", "HiDream", 2, 2, (("double", 2), ("single", 1)), True)


def test_each_calls_text_is_where_the_layout_puts_it(model, tok, family):
    """The host's network with marked inputs (its caption projections copy channel 0): each block's text tokens
    are T5's 128, the last listed Llama layer's, then the block's own layer's (a single block: its layer after the
    image and the carried T5 + Llama text), and at each text position the layout has the token the host's
    tokenizer put there."""
    from daam_core.text.query import WordNotFoundError

    net = model.model.diffusion_model
    layers = list(net.llama_layers)
    tokens = tok.tokenize_with_weights(LONG, return_word_ids=True)
    t5 = [e for c in tokens["t5xxl"] for e in c]
    llama = [e for c in tokens["llama"] for e in c]
    n = len(llama)
    assert len(t5) == 128 and n > 128
    cross = torch.zeros(1, 128, 64)
    cross[0, :, 0] = 1000 + torch.arange(128)
    hidden = torch.zeros(1, 3, n, 64)
    for k in range(3):
        hidden[0, k, :, 0] = (k + 1) * 100000 + torch.arange(n)
    seen = []

    def hook(module, args, kwargs):
        seen.append(kwargs.get("text_tokens") if kwargs.get("text_tokens") is not None else kwargs["image_tokens"])

    saved = [p.linear.weight.detach().clone() for p in net.caption_projection]
    handles = [b.register_forward_pre_hook(hook, with_kwargs=True)
               for b in list(net.double_stream_blocks) + list(net.single_stream_blocks)]
    try:
        with torch.no_grad():
            for p in net.caption_projection:
                p.linear.weight.zero_()
                p.linear.weight[0, 0] = 1.0
            net(torch.zeros(1, 16, 4, 4), torch.tensor([0.5]), y=torch.zeros(1, 32), context=cross,
                encoder_hidden_states_llama3=hidden)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for p, w in zip(net.caption_projection, saved):
                p.linear.weight.copy_(w)
    layout = layout_of(tok, family, LONG)
    assert layout.length == family.text_length({"cross_attn": cross, "conditioning_llama3": hidden}) == 128 + 2 * n
    assert [g.name for g in layout.segments] == ["t5", "llama", "llama"]

    def source(mark):  # ("t5", index) or ("llama", layer, index)
        mark = int(round(float(mark)))
        return ("t5", mark - 1000) if mark < 100000 else ("llama", mark // 100000 - 1, mark % 100000)

    for b, text in enumerate(seen[:2]):  # double blocks: [T5, Llama layers[-1], Llama layers[b]]
        marks = [source(m) for m in text[0, :, 0]]
        assert marks == [("t5", i) for i in range(128)] + [("llama", layers[-1], i) for i in range(n)] + \
            [("llama", layers[b], i) for i in range(n)]
        for p, m in enumerate(marks):
            assert layout.ids[p] == (t5 if m[0] == "t5" else llama)[m[-1]][0]
    single = seen[2][0, :, 0]  # [image 4 patches, the carried T5 + Llama text, Llama layers[2]]
    assert single.shape[0] == 4 + 128 + 2 * n
    assert [source(m) for m in single[-n:]] == [("llama", layers[2], i) for i in range(n)]
    hf = tok.llama.tokenizer
    dragon = layout.positions("dragon", segments="llama")
    assert len(dragon) >= 2 and all(p >= 128 for p in dragon)
    assert "dragon" in hf.decode([layout.ids[p] for p in dragon if p < 128 + n])
    red = layout.positions("red")
    assert {layout.segment_of(p) for p in red} == {"t5", "llama"}
    assert all(layout.weights[p] == pytest.approx(1.2) for p in red)
    assert "dragon" not in tok.t5xxl.tokenizer.decode([e[0] for e in t5])  # T5 keeps 128 tokens: cut before it
    with pytest.raises(WordNotFoundError):
        layout.positions("dragon", segments="t5")


def test_traced_image_is_identical_also_under_another_override(pack, model, tok):
    pos, neg = cond(tok, POS, 1, batch=2), cond(tok, NEG, 2, batch=2)
    traced_model = assert_tracing_keeps_the_host_image(pack, model, lambda m: ksample(m, pos, neg, batch=2),
                                                       "HiDream")
    rec = pack.session_of(traced_model).records[-1]
    assert set(rec.recorded.sums) == {"double.0", "double.1", "single.0"} and rec.token_counts == (384, 384)


def collector(store):
    """An override below DAAM's that keeps every attention call's q, k, heads and batch kinds."""

    def collect(func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        store.append(dict(q=args[0].detach().clone(), k=args[1].detach().clone(), heads=args[3],
                          skip=kwargs.get("skip_reshape", False), mask=kwargs.get("mask"),
                          kinds=list(options.get("cond_or_uncond", []))))
        return func(*args, **kwargs)

    return collect


@pytest.mark.parametrize("case", ("short", "long"))
def test_recorded_probabilities_equal_fp64_reference(pack, model, tok, case):
    """Two images; a positive whose Llama part is 128 tokens like the negative's (one batched call), or longer (a
    call of its own). The image comes first; the text is the rest of each call's keys."""
    pos, neg = cond(tok, LONG if case == "long" else POS, 1), cond(tok, NEG, 2)
    store = []
    traced_model = pack.DAAMTraceModel.execute(with_override(model, collector(store)))[0]
    samples = ksample(traced_model, pos, neg, batch=2)
    rec = pack.session_of(traced_model).find(samples).recorded
    lengths = {0: call_text(tok, LONG if case == "long" else POS), 1: call_text(tok, NEG)}
    assert (lengths[0] != lengths[1]) == (case == "long") and rec.token_counts == [lengths[0], lengths[1]]
    n_img = 3 * 4
    expected, index = {}, 0
    for c in store:
        assert not c["skip"] and c["mask"] is None
        q, k = c["q"].double(), c["k"].double()
        b, L, _ = q.shape
        q = q.view(b, L, c["heads"], -1).transpose(1, 2)
        k = k.view(b, k.shape[1], c["heads"], -1).transpose(1, 2)
        text = k.shape[2] - n_img
        assert text == max(lengths[kind] for kind in c["kinds"])
        name = ("double.0", "double.1", "single.0")[index % 3]  # the host names no block: calls run in order
        index += 1
        p = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)[:, :, :n_img, n_img:].sum(1)
        acc = expected.setdefault(name, torch.zeros(4, n_img, max(lengths.values()), dtype=torch.float64))
        for j, kind in enumerate(c["kinds"]):
            for i in range(2):
                acc[kind * 2 + i, :, :text] += p[j * 2 + i]
    assert store and all(len(c["kinds"]) == (1 if case == "long" else 2) for c in store)
    assert set(rec.sums) == set(expected) == {"double.0", "double.1", "single.0"}
    for name, ref in expected.items():
        torch.testing.assert_close(rec.sums[name].double(), ref, atol=1e-5, rtol=0)
        assert rec.layers[name].kind == "joint" and rec.layers[name].hw == (3, 4)


def test_planted_attention_is_recovered_in_each_segment(pack, model, tok, family):
    """A text key planted at 'dog''s Llama positions (after the image: 96 patches) dominates a region of the
    16 x 24 latent: the llama mask of 'dog' is that region, its t5 mask and 'cat''s masks are not."""
    from test_comfy_dit import planter

    from daam_core.engine import metrics

    layout = layout_of(tok, family, POS)
    keys = list(layout.positions("dog", segments="llama"))
    region = torch.zeros((8, 12), dtype=torch.bool)
    region[2:6, 3:9] = True
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    to = traced_model.model_options["transformer_options"]
    to["optimized_attention_override"] = planter(to["optimized_attention_override"],
                                                 {"length": region.numel() + layout.length, "image": 0,
                                                  "key": [region.numel() + k for k in keys]}, region.flatten())
    samples = ksample(traced_model, cond(tok, POS, 1), cond(tok, NEG, 2), h=16, w=24)
    truth = region.repeat_interleave(16, 0).repeat_interleave(16, 1)
    masks = {seg: pack.DAAMHeatmaps.execute(traced_model, tok, {"samples": samples}, POS, NEG, "dog, cat",
                                            segments=seg).result[2] for seg in ("llama", "t5", "both")}
    assert masks["llama"].shape == (2, 128, 192)
    assert metrics.iou(masks["llama"][0] > 0.5, truth) >= 0.9
    assert metrics.iou(masks["llama"][1] > 0.5, truth) < 0.5 and metrics.iou(masks["t5"][0] > 0.5, truth) < 0.5
    with pytest.raises(ValueError, match="no 'clip' positions; its segments are \\['t5', 'llama', 'llama'\\]"):
        pack.DAAMHeatmaps.execute(traced_model, tok, {"samples": samples}, POS, NEG, "dog", segments="clip")


def test_negative_prompt_has_maps_with_true_cfg(pack, model, tok):
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    samples = ksample(traced_model, cond(tok, POS, 1, batch=2), cond(tok, NEG, 2, batch=2), batch=2)
    maps = pack.DAAMHeatmaps.execute(traced_model, tok, {"samples": samples}, POS, NEG, "dog",
                                     negative_words="blurry").result[3]
    neg = maps.trace.word_maps("blurry", branch="uncond")
    assert neg.shape == (2, 1, 48, 64) and torch.isfinite(neg).all() and neg.amax() == 1
    assert not torch.equal(neg[:, 0], maps.trace.word_maps("dog")[:, 0])
    samples = ksample(traced_model, cond(tok, POS, 1), cond(tok, NEG, 2), cfg=1.0)  # cfg 1: no negative branch
    with pytest.raises(ValueError, match="never evaluated the negative prompt"):
        pack.DAAMHeatmaps.execute(traced_model, tok, {"samples": samples}, POS, NEG, "dog", negative_words="blurry")


def test_a_conditioning_without_the_texts_llama_part_is_refused(pack, model, tok):
    """An encoder without Llama 3.1 gives one zero Llama token: the text's layout does not fit the calls."""
    pos = cond(tok, POS, 1)
    pos[0][1]["conditioning_llama3"] = torch.zeros(1, 3, 1, 64)
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    samples = ksample(traced_model, pos, cond(tok, NEG, 2), cfg=1.0)
    with pytest.raises(ValueError, match="128 T5 tokens and 128 Llama tokens, but the sampler's HiDream "
                                         "conditioning holds 2 Llama positions"):
        pack.DAAMHeatmaps.execute(traced_model, tok, {"samples": samples}, POS, "", "dog")


def test_encoders_that_are_not_loaded_give_no_words(tok, family):
    """A HiDream CLIP loaded without T5 encodes 128 zero vectors, one without Llama 3.1 a zero Llama token: given
    that CLIP's encoders, those positions are no word and the words keep their other positions."""
    from types import SimpleNamespace

    from daam_core.hosts.comfy.dit import conditioning_layout
    from daam_core.text.query import WordNotFoundError

    full = layout_of(tok, family, POS)
    own = conditioning_layout(tok, POS, 128, family=family)
    no_t5 = family.call_layout(own, full.length, tok, POS, SimpleNamespace(t5xxl=None, llama=object()))
    assert no_t5.ids == full.ids and no_t5.positions("dog") == full.positions("dog", segments="llama")
    assert [w.text for w in no_t5.words] == POS.replace("(red:1.2)", "red").split()
    with pytest.raises(WordNotFoundError):
        no_t5.positions("dog", segments="t5")
    no_llama = family.call_layout(own, 128 + 2, tok, POS, SimpleNamespace(t5xxl=object(), llama=None))
    assert no_llama.length == 130 and no_llama.positions("dog") == full.positions("dog", segments="t5")
    assert [g.name for g in no_llama.segments] == ["t5", "llama", "llama"]
    with pytest.raises(ValueError, match="HiDream conditioning holds 2 Llama positions"):
        family.call_layout(own, 128 + 2, tok, POS)  # without the encoders: the text's Llama tokens are expected


def test_pytorch_attention_host_gets_the_same_image_and_sums(pack, model, tok):
    """With ComfyUI's ``attention_pytorch`` DAAM's fused kernel replaces the host's joint call only where proven
    equal to it: the image is the host's, the sums the CPU attention's."""
    from test_comfy_dit import assert_fused_kernel_is_the_host

    pos, neg = cond(tok, POS, 1, batch=2), cond(tok, NEG, 2, batch=2)
    blocks = assert_fused_kernel_is_the_host(pack, model, lambda m: ksample(m, pos, neg, batch=2))
    assert blocks == {"double.0", "double.1", "single.0"}
