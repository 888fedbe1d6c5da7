"""Tracing leaves the user's attention processors alone: IP-Adapter's nn.Module processors, a custom processor with
an extra argument, fused projections, and a processor DAAM cannot observe (a clear error)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from diffusers.models.attention_processor import (  # noqa: E402
    Attention, AttnProcessor2_0, FusedAttnProcessor2_0, IPAdapterAttnProcessor2_0)

from daam_core import trace  # noqa: E402
from helpers.tiny_pipelines import tiny_sd_pipeline  # noqa: E402
from helpers.reference import head_summed_probabilities  # noqa: E402
from helpers.images import assert_same_image

IMAGE_EMBED_DIM = 16  # width of the (stand-in) CLIP image embedding fed to the IP-Adapter projection


def cross_modules(pipe):
    return {n: m for n, m in pipe.unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention}


def run(pipe, steps=2, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    return pipe("a red car and a dog", num_inference_steps=steps, generator=gen, output_type="np",
                guidance_scale=7.5, height=32, width=32, **kw).images


def reference_sums(pipe, call):
    """fp64 head-summed probabilities of every cross-attention module, from its own to_q / to_k on its inputs."""
    ref, handles = {}, []
    for name, m in cross_modules(pipe).items():
        def hook(module, args, kwargs, output, name=name):
            hs = args[0] if args else kwargs["hidden_states"]
            ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            if isinstance(ehs, tuple):  # IP-Adapter: (text, [image tokens]); the text part is what DAAM maps
                ehs = ehs[0]
            p = head_summed_probabilities(module.to_q(hs), module.to_k(ehs), module.heads)
            ref[name] = ref.get(name, 0) + p
        handles.append(m.register_forward_hook(hook, with_kwargs=True))
    try:
        call()
    finally:
        for h in handles:
            h.remove()
    return ref


def assert_sums_equal_reference(result, ref):
    assert set(result.sums) == set(ref)
    for name, r in ref.items():  # rows [uncond, cond] -> streams [cond, uncond]
        torch.testing.assert_close(result.sums[name][0].double(), r[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(result.sums[name][1].double(), r[0], atol=1e-5, rtol=0)


def install_ip_adapter(pipe, seed=0, scale=0.7):
    """What ``pipe.load_ip_adapter`` does to the UNet (diffusers' ``_load_ip_adapter_weights``), with random
    weights instead of a downloaded checkpoint: ``IPAdapterAttnProcessor2_0`` (an ``nn.Module`` with its own
    ``to_k_ip`` / ``to_v_ip``) on every cross-attention layer, and an ``ImageProjection`` of 4 image tokens as
    the UNet's ``encoder_hid_proj``."""
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    unet = pipe.unet
    torch.manual_seed(seed)
    modules = dict(unet.named_modules())
    procs = {}
    for name in unet.attn_processors:
        module = modules[name[:-len(".processor")]]
        if not module.is_cross_attention:
            procs[name] = AttnProcessor2_0()
        else:
            procs[name] = IPAdapterAttnProcessor2_0(hidden_size=module.to_k.out_features,
                                                    cross_attention_dim=module.to_k.in_features, scale=scale,
                                                    num_tokens=(4,))
    unet.set_attn_processor(procs)
    cross_dim = unet.config.cross_attention_dim
    unet.encoder_hid_proj = MultiIPAdapterImageProjection(
        [ImageProjection(cross_attention_dim=cross_dim, image_embed_dim=IMAGE_EMBED_DIM, num_image_text_embeds=4)])
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
    return procs


def test_ip_adapter_processors_kept_image_identical_and_maps_recorded(clip_tokenizer_dir):
    pipe = tiny_sd_pipeline(seed=0, tokenizer_dir=clip_tokenizer_dir)
    install_ip_adapter(pipe)
    assert all(isinstance(p, torch.nn.Module) for n, p in pipe.unet.attn_processors.items() if "attn2" in n)
    before = dict(pipe.unet.attn_processors)
    embeds = [torch.randn(2, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(5))]  # [negative, positive]

    def call():
        return run(pipe, ip_adapter_image_embeds=embeds)

    plain = call()
    with trace(pipe) as tc:
        assert dict(pipe.unet.attn_processors) == before  # observed, not replaced
        traced = call()
    assert_same_image(plain, traced, "IP-Adapter traced image")
    assert all(pipe.unet.attn_processors[n] is p for n, p in before.items())
    # the image tokens change the image, so the test really runs the IP-Adapter path
    assert not np.array_equal(plain, run(pipe, ip_adapter_image_embeds=[embeds[0] * 3]))
    res = tc.result()
    assert set(res.sums) == set(cross_modules(pipe))
    assert res.sums[next(iter(res.sums))].shape[-1] == 77  # text tokens only, the 4 image tokens are not words
    assert res.word_maps("dog", image=0).max() == 1


def test_ip_adapter_recorded_probabilities_equal_reference(clip_tokenizer_dir):
    pipe = tiny_sd_pipeline(seed=0, tokenizer_dir=clip_tokenizer_dir)
    install_ip_adapter(pipe)
    embeds = [torch.randn(2, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(5))]
    with trace(pipe) as tc:
        ref = reference_sums(pipe, lambda: run(pipe, steps=1, ip_adapter_image_embeds=embeds))
    assert_sums_equal_reference(tc.result(), ref)


class GainProcessor(AttnProcessor2_0):
    """A user's processor with an extra argument, passed through ``cross_attention_kwargs``: diffusers hands a
    processor only the keyword arguments its ``__call__`` names."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 gain=None):
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return out if gain is None else out * gain


def test_custom_processor_receives_its_extra_argument(clip_tokenizer_dir):
    pipe = tiny_sd_pipeline(seed=0, tokenizer_dir=clip_tokenizer_dir)
    pipe.unet.set_attn_processor(GainProcessor())
    kwargs = {"cross_attention_kwargs": {"gain": 0.5}}
    plain = run(pipe, **kwargs)
    assert not np.array_equal(plain, run(pipe))  # the argument matters
    traced = []
    with trace(pipe) as tc:
        ref = reference_sums(pipe, lambda: traced.append(run(pipe, **kwargs)))
    assert_same_image(plain, traced[0], "custom-processor traced image")
    assert_sums_equal_reference(tc.result(), ref)


def test_fused_projections_are_recorded(clip_tokenizer_dir):
    pipe = tiny_sd_pipeline(seed=0, tokenizer_dir=clip_tokenizer_dir)
    pipe.fuse_qkv_projections()
    mods = cross_modules(pipe)
    assert all(isinstance(m.processor, FusedAttnProcessor2_0) and hasattr(m, "to_kv") for m in mods.values())
    plain = run(pipe)
    out = []
    with trace(pipe) as tc:
        ref = reference_sums(pipe, lambda: out.append(run(pipe)))
    assert_same_image(plain, out[0], "fused-projection traced image")
    assert_sums_equal_reference(tc.result(), ref)  # the reference uses the unfused to_k: the same keys
    assert tc.word_maps("car", image=0).max() == 1


class OpaqueProcessor(AttnProcessor2_0):
    """Computes the projections from the weights directly, never calling ``attn.to_q`` / ``attn.to_k``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b = hidden_states.shape[0]
        q = F.linear(hidden_states, attn.to_q.weight).view(b, -1, attn.heads, attn.to_q.out_features // attn.heads)
        k = F.linear(ctx, attn.to_k.weight).view(b, -1, attn.heads, q.shape[-1])
        v = F.linear(ctx, attn.to_v.weight).view(b, -1, attn.heads, q.shape[-1])
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return attn.to_out[0](o.transpose(1, 2).flatten(2))


def test_unobservable_processor_is_a_clear_error(clip_tokenizer_dir):
    pipe = tiny_sd_pipeline(seed=0, tokenizer_dir=clip_tokenizer_dir)
    originals = dict(pipe.unet.attn_processors)
    name = next(iter(cross_modules(pipe)))
    pipe.unet.set_attn_processor({n: (OpaqueProcessor() if n == name + ".processor" else p)
                                  for n, p in originals.items()})
    with pytest.raises(RuntimeError, match=rf"cannot observe {name}: its processor OpaqueProcessor computed the "
                                           r"query \(to_q\) and key"):
        with trace(pipe):
            run(pipe, steps=1)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in cross_modules(pipe).values())
    assert np.isfinite(run(pipe, steps=1)).all()  # the pipeline still works
