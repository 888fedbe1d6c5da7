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


def ksample(model, positive, negative, batch=1, h=6, w=8, seed=1, steps=1, cfg=3.0):
    import comfy.sample

    latent = torch.zeros(batch, 16, h, w)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent, denoise=1.0,
                               seed=seed, disable_pbar=True)


def with_override(model, override):
    other = model.clone()
    other.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = override
    return other


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


@pytest.mark.parametrize("family", FAMILIES)
def test_traced_image_is_identical_also_under_another_override(pack, models, tokenizers, family):
    model, tok = models[family], tokenizers[family]
    pos, neg = cond(tok, POS, 1, batch=2), cond(tok, NEG, 2, batch=2)
    plain = ksample(model, pos, neg, batch=2)
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    traced = ksample(traced_model, pos, neg, batch=2)
    assert_same_image(plain, traced, f"{family} traced sampling")
    assert all("forward" not in vars(m) for m in model.model.diffusion_model.modules())
    assert set(pack.session_of(traced_model).records[-1].recorded.sums) == {"layer.0", "layer.1"}

    seen = []

    def other(func, *args, **kwargs):
        seen.append(1)
        return func(*args, **kwargs) * 0.5

    expected = ksample(with_override(model, other), pos, neg, batch=2)
    n = len(seen)
    got = ksample(pack.DAAMTraceModel.execute(with_override(model, other))[0], pos, neg, batch=2)
    assert_same_image(expected, got, f"{family} traced sampling under another override")
    assert len(seen) == 2 * n and not torch.equal(expected, plain)


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
