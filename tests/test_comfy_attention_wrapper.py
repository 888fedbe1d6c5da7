"""DAAM's attention override under the host's attention wrapper (``wrap_attn``), called the way the host calls it.

Parts exist only in newer ComfyUI (q/k/v in ``AttentionTensorContainer``s, ``enable_gqa``, the multi-GPU CFG
split, the ``ModelAttentionBackend`` node: ComfyUI 0.33 here); on an older host those tests skip with the reason.
Run them on 0.33 with ``tools/test_other_host.sh <ComfyUI 0.33 checkout or bare repository> tests/<this file>``.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers.reference import head_summed_probabilities

pytestmark = pytest.mark.host

HEADS, D, T = 4, 8, 5  # query heads, head width, text tokens


def needs(comfy_host, module: str, name: str, what: str):
    if not hasattr(importlib.import_module(module), name):
        pytest.skip(f"ComfyUI {comfy_host.version} has no {module}.{name} ({what}); run this file on ComfyUI 0.33 "
                    f"with tools/test_other_host.sh")


def session_mod(pack, name: str):
    return importlib.import_module(f"{pack.__name__.split('.')[0]}.daam_core.hosts.comfy.{name}")


def recording_session(pack):
    """A UNet session recording one marked cross-attention call: one cond stream, a 4x4 latent, T tokens."""
    session_m = session_mod(pack, "session")
    recorder_m = importlib.import_module(f"{pack.__name__.split('.')[0]}.daam_core.engine.recorder")
    session = session_m.TraceSession(recorder_m.RecordFilter())
    session.recorder.begin((4, 4), [recorder_m.Stream(0, "cond", 0)], [T])
    session.recorder.set_call([0], 0.0)
    session.attn2_patch(None, torch.zeros(1, T, HEADS * D), None, {"block": ("input", 1), "block_index": 0})
    return session


def recorded(session) -> torch.Tensor:
    out = session.recorder.finish()
    (layer,) = out.sums
    return out.sums[layer][0].double()


def qkv(kv_heads: int = HEADS, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, HEADS * D, generator=g), torch.randn(1, T, kv_heads * D, generator=g),
            torch.randn(1, T, kv_heads * D, generator=g))


def test_override_takes_plain_tensors_from_containers(pack, comfy_host):
    needs(comfy_host, "comfy.ldm.modules.attention", "AttentionTensorContainer", "container-wrapped q/k/v")
    from comfy.ldm.modules.attention import AttentionTensorContainer, attention_pytorch

    session = recording_session(pack)
    override = session.attention_override(None)
    assert not hasattr(override, "container_function")  # so the wrapper unwraps q/k/v before calling it
    q, k, v = qkv()
    plain = attention_pytorch(q, k, v, HEADS)
    boxed = [AttentionTensorContainer(t.clone()) for t in (q, k, v)]
    out = attention_pytorch(*boxed, HEADS, transformer_options={"optimized_attention_override": override})
    assert torch.equal(out, plain)
    torch.testing.assert_close(recorded(session), head_summed_probabilities(q, k, HEADS)[0], atol=1e-5, rtol=0)


def test_grouped_query_attention_is_recorded_per_query_head(pack, comfy_host):
    """enable_gqa: 2 key heads serve 4 query heads; each query head's probabilities use its group's key head."""
    import inspect

    from comfy.ldm.modules import attention

    if "enable_gqa" not in inspect.getsource(attention.attention_pytorch):
        pytest.skip(f"ComfyUI {comfy_host.version}'s attention functions have no enable_gqa")
    session = recording_session(pack)
    q, k, v = qkv(kv_heads=2, seed=1)
    plain = attention.attention_pytorch(q, k, v, HEADS, enable_gqa=True)
    out = attention.attention_pytorch(q, k, v, HEADS, enable_gqa=True,
                                      transformer_options={"optimized_attention_override":
                                                           session.attention_override(None)})
    assert torch.equal(out, plain)
    k_full = k.view(1, T, 2, D).repeat_interleave(2, dim=2).reshape(1, T, HEADS * D)  # key head i // 2
    reference = head_summed_probabilities(q, k_full, HEADS)[0]
    torch.testing.assert_close(recorded(session), reference, atol=1e-5, rtol=0)
    assert not torch.allclose(reference, head_summed_probabilities(q, k.repeat(1, 1, 2), HEADS)[0], atol=1e-3)


def test_head_major_call_keeps_its_output_layout(pack, comfy_host):
    """skip_reshape + skip_output_reshape (q/k/v and output [B, H, N, D]) reach the host's function unchanged."""
    from comfy.ldm.modules.attention import attention_pytorch

    session = recording_session(pack)
    q, k, v = (t.view(1, -1, HEADS, D).transpose(1, 2).contiguous() for t in qkv(seed=2))
    kw = {"skip_reshape": True, "skip_output_reshape": True}
    plain = attention_pytorch(q, k, v, HEADS, **kw)
    out = attention_pytorch(q, k, v, HEADS, **kw,
                            transformer_options={"optimized_attention_override": session.attention_override(None)})
    assert out.shape == (1, HEADS, 16, D) and torch.equal(out, plain)
    flat = lambda t: t.transpose(1, 2).reshape(1, t.shape[2], HEADS * D)  # noqa: E731
    torch.testing.assert_close(recorded(session), head_summed_probabilities(flat(q), flat(k), HEADS)[0],
                               atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def sd15(comfy_host, sd15_checkpoint):
    import comfy.sd

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint), output_vae=False,
                                                              output_clip=True)
    return model, clip


def sample(model, clip, seed=1):
    import comfy.sample
    import nodes as host_nodes

    pos = host_nodes.CLIPTextEncode().encode(clip, "a cat and a dog on a red sofa")[0]
    neg = host_nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    latent = torch.zeros(1, 4, 6, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, 2, 5.0, "euler", "normal", pos, neg, latent, denoise=1.0, seed=seed,
                               disable_pbar=True)


def test_multi_gpu_cfg_split_is_refused_with_a_clear_error(pack, comfy_host, sd15):
    """The host's split path (_calc_cond_batch_multigpu, here on one CPU 'device' without a thread pool) runs the
    untraced model; the traced one stops with an error that says why instead of recording a race."""
    needs(comfy_host, "comfy.samplers", "_calc_cond_batch_multigpu", "multi-GPU CFG split")
    model, clip = sd15
    plain = sample(model, clip)
    split = model.clone()
    split.model_options["multigpu_clones"] = {torch.device("cpu"): split}
    assert torch.equal(sample(split, clip), plain)  # the split path itself runs here and gives the same image
    traced = pack.DAAMTraceModel.execute(model)[0]
    traced.model_options["multigpu_clones"] = {torch.device("cpu"): traced}
    with pytest.raises(ValueError, match="splits across GPUs"):
        sample(traced, clip)
    traced.model_options.pop("multigpu_clones")
    assert torch.equal(sample(traced, clip), plain)  # the session is usable again after the refusal


def test_attention_backend_chosen_before_daam_is_kept(pack, comfy_host, sd15):
    """ModelAttentionBackend before DAAM: DAAM wraps that backend's override, so the traced image is the
    untraced image of the same backend, bit for bit, and the maps are recorded."""
    needs(comfy_host, "comfy_extras.nodes_model_advanced", "ModelAttentionBackend", "attention backend node")
    from comfy_extras.nodes_model_advanced import ModelAttentionBackend

    model, clip = sd15
    chosen = ModelAttentionBackend().patch(model, "pytorch attention")[0]
    plain = sample(chosen, clip)
    traced = pack.DAAMTraceModel.execute(chosen)[0]
    assert torch.equal(sample(traced, clip), plain)
    sm = session_mod(pack, "session")
    record = traced.model_options["transformer_options"][sm.OPTIONS_KEY].find(None)
    assert record.attention_marks > 0 and record.attention_seen == record.attention_marks
