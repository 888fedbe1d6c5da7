"""Self-attention and per-head sums on the real ComfyUI UNet path (attn1 patch + the attention override)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from helpers.images import assert_same_image

from test_comfy_nodes import NEG, POS, encode, ksample, sd15  # noqa: F401 (the sd15 fixture)

pytestmark = pytest.mark.host


def softmax64_heads(q, k, heads):
    b, n, c = q.shape
    d = c // heads
    qh = q.double().view(b, n, heads, d).transpose(1, 2)
    kh = k.double().view(b, k.shape[1], heads, d).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1).sum(1)


def test_self_attention_sums_on_comfy_are_exact_and_the_image_identical(pack, sd15):  # noqa: F811
    model, clip, _ = sd15
    pos, neg = encode(clip, POS), encode(clip, NEG)
    root = pack.__name__.split(".")[0]
    maps = importlib.import_module(f"{root}.daam_core.hosts.comfy.maps")
    recorder_m = importlib.import_module(f"{root}.daam_core.engine.recorder")
    geometry = importlib.import_module(f"{root}.daam_core.engine.geometry")
    plain = ksample(model, pos, neg, cfg=1.0)  # cfg 1: only the positive branch runs, one row per call
    traced = pack.DAAMTraceModel.execute(model)[0]
    session = pack.session_of(traced)
    session.recorder.extra = maps.new_session(model, recorder_m.RecordFilter(),
                                              maps.refine_recording(True, True)).recorder.extra
    traced.set_model_attn1_patch(session.attn1_patch)
    store = []
    hooks = []
    for name, m in model.model.diffusion_model.named_modules():
        if name.endswith("attn1"):
            qk = {}
            hooks += [m.to_q.register_forward_hook(lambda mod, a, o, qk=qk: qk.__setitem__("q", o.detach().clone())),
                      m.to_k.register_forward_hook(lambda mod, a, o, qk=qk, m=m: store.append(
                          (qk["q"], o.detach().clone(), m.heads)))]
    try:
        samples = ksample(traced, pos, neg, cfg=1.0)
    finally:
        for h in hooks:
            h.remove()
    assert_same_image(plain, samples)
    record = session.find(samples).recorded
    self_sums, head_sums = record.extras["self_sums"], record.extras["head_sums"]
    grid = geometry.UNetGrid(record.latent_hw)
    want = {}
    for q, k, heads in store:
        hw = grid.locate(q.shape[1])[1]
        key = f"{hw[0]}x{hw[1]}"
        want[key] = want.get(key, 0) + softmax64_heads(q, k, heads)
    assert set(self_sums) == set(want) and len(record.streams) == 1
    for key, w in want.items():
        err = (self_sums[key].double() - w).abs().max().item()
        assert err <= 1e-5 * w.abs().max().item(), (key, err)
    for name in record.sums:
        assert torch.allclose(head_sums[name].sum(1), record.sums[name], rtol=1e-5, atol=1e-5)
