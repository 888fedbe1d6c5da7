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
    geometry = importlib.import_module(f"{pack.__name__.split('.')[0]}.daam_core.engine.geometry")
    plain = ksample(model, pos, neg, cfg=1.0)  # cfg 1: only the positive branch runs, one row per call
    traced = pack.DAAMTraceModel.execute(model, record_self_attention=True, record_head_sums=True)[0]
    session = pack.session_of(traced)
    assert "attn1_patch" in traced.model_options["transformer_options"]["patches"]
    assert "attn1_patch" not in model.model_options.get("transformer_options", {}).get("patches", {})
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


@pytest.fixture(scope="module")
def refined_run(pack, sd15):  # noqa: F811
    """One sampling at cfg 5 (positive and negative branches) traced with both refinements' sums."""
    model, clip, _ = sd15
    pos, neg = encode(clip, POS), encode(clip, NEG)
    plain = ksample(model, pos, neg)
    traced = pack.DAAMTraceModel.execute(model, record_self_attention=True, record_head_sums=True)[0]
    samples = ksample(traced, pos, neg)
    assert_same_image(plain, samples)

    def heatmaps(words, **kwargs):
        return pack.DAAMHeatmaps.execute(traced, clip, {"samples": samples}, POS, NEG, words, **kwargs)

    return heatmaps


def test_heatmaps_and_mask_refine_by_their_inputs(pack, refined_run):
    masks_m = importlib.import_module(f"{pack.__name__.split('.')[0]}.daam_core.engine.masks")
    words = ["cat", "dog", "sofa"]
    plain = refined_run("cat, dog, sofa")
    refined = refined_run("cat, dog, sofa", negative_words="blurry", propagate_steps=3, head_power=2.0)
    trace = refined.result[3].trace
    assert trace.self_sums and trace.head_sums
    want = trace.word_maps(words, propagate=3, head_power=2.0)  # [B, W, H, W]
    want_neg = trace.word_maps(["blurry"], branch="uncond", propagate=3, head_power=2.0)
    got = refined.result[2].view(1, 4, *want.shape[2:])
    assert torch.equal(got, masks_m.threshold(torch.cat([want, want_neg], 1), 0.4, "relative"))
    assert not torch.equal(plain.result[2], refined.result[2][:3])  # the refinement changes the masks
    assert torch.equal(plain.result[2].view(1, 3, *want.shape[2:]),
                       masks_m.threshold(trace.word_maps(words), 0.4, "relative"))
    # DAAM Mask: -1 keeps the maps' refinement, 0 / 0 is plain DAAM, any other value switches without sampling
    maps = refined.result[3]
    assert (maps.propagate_steps, maps.head_power) == (3, 2.0)
    assert torch.equal(pack.DAAMMask.execute(maps, "cat").result[0], got[:, 0])
    assert torch.equal(pack.DAAMMask.execute(maps, "cat", propagate_steps=0, head_power=0.0).result[0],
                       plain.result[2][:1])
    one = pack.DAAMMask.execute(plain.result[3], "dog", propagate_steps=1, head_power=-1.0).result[0]
    assert torch.equal(one, masks_m.threshold(trace.word_maps(["dog"], propagate=1), 0.4, "relative")[:, 0])


def test_exclusive_heatmaps_and_competing_mask_words_against_the_owner_rule(pack, refined_run):
    masks_m = importlib.import_module(f"{pack.__name__.split('.')[0]}.daam_core.engine.masks")
    how = dict(propagate_steps=2, propagate_at="finest resolution", head_power=4.0)
    run = refined_run("cat, dog", exclusive=True, **how)
    maps = run.result[3]
    trace = maps.trace
    # the reference: each pixel goes to the word most above its own mean in the plain maps; the refined map
    # (finest-resolution propagation, head weights) is kept there and scaled back to a maximum of 1
    plain = trace.word_maps(["cat", "dog"], normalize="none")[0].double()
    owner = (plain / plain.flatten(1).mean(1)[:, None, None]).argmax(0)
    refined = trace.word_maps(["cat", "dog"], propagate=2, propagate_at="finest", head_power=4.0)[0]
    want = []
    for j in range(2):
        kept = refined[j] * (owner == j)
        want.append(masks_m.threshold(kept / kept.max(), 0.4, "relative"))
    got = run.result[2]  # [words, H, W]: one image
    assert torch.equal(got, torch.stack(want))
    assert got[0].sum() > 0 and got[1].sum() > 0 and (got[0] * got[1]).sum() == 0  # never both
    assert maps.propagate_at == "finest resolution"
    # DAAM Mask: the cat competing with the dog is the cat of the exclusive heat maps; with nothing to compete
    # with it is the refined map's mask
    assert torch.equal(pack.DAAMMask.execute(maps, "cat", compete_with="dog").result[0], got[:1])
    alone = pack.DAAMMask.execute(maps, "cat").result[0]
    assert torch.equal(alone, masks_m.threshold(refined[:1], 0.4, "relative"))
    each = pack.DAAMMask.execute(maps, "cat", propagate_at="each resolution").result[0]
    assert torch.equal(each, masks_m.threshold(trace.word_maps(["cat"], propagate=2, head_power=4.0)[0], 0.4,
                                               "relative"))
    with pytest.raises(ValueError, match="horse"):
        pack.DAAMMask.execute(maps, "cat", compete_with="horse")
    plain_run = refined_run("cat, dog")
    with pytest.raises(ValueError, match="propagate_at"):
        pack.DAAMMask.execute(plain_run.result[3], "cat", propagate_steps=1, propagate_at="middle")


def test_refinement_without_its_sums_names_the_input_to_turn_on(pack, sd15):  # noqa: F811
    model, clip, _ = sd15
    pos, neg = encode(clip, POS), encode(clip, NEG)
    traced = pack.DAAMTraceModel.execute(model, record_head_sums=True)[0]
    samples = ksample(traced, pos, neg)
    run = lambda **kw: pack.DAAMHeatmaps.execute(traced, clip, {"samples": samples}, POS, NEG, "cat", **kw)  # noqa: E731
    with pytest.raises(ValueError, match="propagate_steps needs self-attention sums: turn on record_self_attention"):
        run(propagate_steps=2)
    maps = run(head_power=1.0).result[3]  # per-head sums were recorded: head weighting works
    with pytest.raises(ValueError, match="record_self_attention"):
        pack.DAAMMask.execute(maps, "cat", propagate_steps=1)
    plain = pack.DAAMTraceModel.execute(model)[0]
    samples = ksample(plain, pos, neg)
    with pytest.raises(ValueError, match="head_power needs per-head sums: turn on record_head_sums"):
        pack.DAAMHeatmaps.execute(plain, clip, {"samples": samples}, POS, NEG, "cat", head_power=2.0)


def test_refinements_of_a_joint_attention_model_are_refused_clearly(pack, comfy_host):
    from helpers.dit_checkpoints import build_flux

    with pytest.raises(ValueError, match="for UNet models; Flux.1 uses joint attention: turn off "
                                         "record_self_attention and record_head_sums"):
        pack.DAAMTraceModel.execute(build_flux(), record_self_attention=True)
