"""The node pack in-process against the real ComfyUI host (samplers, ModelPatcher, attention)."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers.images import assert_same_image
from helpers.reference import head_summed_probabilities

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def sd15(comfy_host, sd15_checkpoint):
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint), output_vae=True, output_clip=True)
    return model, clip, vae


def encode(clip, text):
    import nodes as host_nodes

    return host_nodes.CLIPTextEncode().encode(clip, text)[0]


def ksample(model, positive, negative, batch=1, width=64, height=48, seed=1, steps=2, cfg=5.0, sampler="euler",
            callback=None):
    import comfy.sample

    latent = torch.zeros(batch, 4, height // 8, width // 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, "normal", positive, negative, latent, denoise=1.0,
                               seed=seed, disable_pbar=True, callback=callback)


def options_snapshot(model):
    to = model.model_options.get("transformer_options", {})
    return (sorted(model.model_options), sorted(to), {k: len(v) for k, v in to.get("patches", {}).items()},
            {k: sorted(v) for k, v in model.wrappers.items()})


POS = "a cat and a dog on a red sofa"
NEG = "blurry, low quality"


def test_traced_sampling_is_identical_and_model_untouched(pack, sd15):
    model, clip, _ = sd15
    pos, neg = encode(clip, POS), encode(clip, NEG)
    before = options_snapshot(model)
    plain = ksample(model, pos, neg)
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    traced = ksample(traced_model, pos, neg)
    assert traced_model is not model
    assert_same_image(plain, traced)
    assert options_snapshot(model) == before  # the model given to the node is never modified
    attn = [m for n, m in model.model.diffusion_model.named_modules() if n.endswith("attn2")]
    assert attn and all("forward" not in vars(m) for m in attn)
    assert_same_image(plain, ksample(model, pos, neg), "plain sampling after a traced one")


def test_ksampler_daam_node_equals_stock_ksampler(pack, sd15):
    import nodes as host_nodes

    model, clip, _ = sd15
    pos, neg = encode(clip, POS), encode(clip, NEG)
    latent = {"samples": torch.zeros(1, 4, 6, 8)}
    args = (3, 2, 5.0, "euler", "normal", pos, neg, latent)
    (stock,) = host_nodes.KSampler().sample(model, *args)
    before = options_snapshot(model)
    daam_latent, traced = pack.DAAMKSampler.execute(model, *args)
    assert_same_image(stock["samples"], daam_latent["samples"], "KSampler (DAAM) latent")
    assert traced is not model
    assert options_snapshot(model) == before
    heat, _, masks, _ = pack.DAAMHeatmaps.execute(traced, clip, daam_latent, POS, NEG, "dog").result
    assert heat.shape == (1, 48, 64, 3) and 0 < masks.mean() < 1


def reference_hooks(model, store):
    """Forward hooks on the host's attn2 modules computing softmax(QK^T/sqrt(d)) per row (for reference only)."""
    handles = []
    for name, module in model.model.diffusion_model.named_modules():
        if not name.endswith("attn2"):
            continue

        def hook(mod, args, kwargs, output, name=name):
            x = args[0]
            context = kwargs.get("context", args[1] if len(args) > 1 else None)
            q, k = mod.to_q(x), mod.to_k(context)
            p = head_summed_probabilities(q, k, mod.heads)
            kinds = kwargs["transformer_options"]["cond_or_uncond"]
            store.setdefault(name, []).append((kinds, p))

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return handles


def test_recorded_probabilities_match_reference_with_batch_and_negative(pack, sd15):
    model, clip, _ = sd15
    pos, neg = encode(clip, POS), encode(clip, NEG)
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    store = {}
    handles = reference_hooks(model, store)
    try:
        samples = ksample(traced_model, pos, neg, batch=2, steps=1)
    finally:
        for h in handles:
            h.remove()
    session = pack.session_of(traced_model)
    rec = session.find(samples).recorded
    assert set(rec.sums) == {daam_name(n) for n in store}
    for layer, calls in store.items():
        (kinds, p), = calls  # one step: cond and uncond batched together
        # chunk i (2 images) has kind kinds[i] (0 = positive, 1 = negative); streams are cond 0, 1, uncond 0, 1
        expected = torch.zeros(4, p.shape[1], 77, dtype=torch.float64)
        for chunk, kind in enumerate(kinds):
            for img in range(2):
                expected[kind * 2 + img] = p[chunk * 2 + img, :, :77]
        torch.testing.assert_close(rec.sums[daam_name(layer)].double(), expected, atol=1e-5, rtol=0)


def daam_name(module_path: str) -> str:
    """Host module path -> the (block, number, transformer index) name DAAM gives the layer."""
    parts = module_path.split(".")
    block = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}[parts[0]]
    number = 0 if block == "middle" else int(parts[1])
    return f"{block}.{number}.{int(parts[parts.index('transformer_blocks') + 1])}"


def test_heatmaps_node_outputs_and_errors(pack, sd15):
    import nodes as host_nodes

    model, clip, vae = sd15
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    samples = ksample(traced_model, encode(clip, POS), encode(clip, NEG), batch=2, width=64, height=48)
    images = host_nodes.VAEDecode().decode(vae, {"samples": samples})[0]
    out = pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, POS, NEG, "cat, red sofa, dog",
                                       negative_words="blurry", images=images)
    heat, over, masks, maps = out.result
    assert heat.shape == over.shape == (2 * 4, 48, 64, 3) and masks.shape == (8, 48, 64)
    (payload,) = out.ui["daam_preview"]  # the browser preview (tests/test_preview_payload.py)
    assert len(payload["images"]) == 2 and {"cat", "red sofa", "dog"} <= {e["key"] for e in payload["entries"]}
    assert 0 < masks[0].mean() < 1, "mask of 'cat' is empty or full"
    assert 0 < masks[2].mean() < 1, "mask of 'dog' is empty or full"
    assert not torch.equal(masks[0], masks[2]), "masks of 'cat' and 'dog' are the same"
    assert over.min() >= 0 and over.max() <= 1
    mask = pack.DAAMMask.execute(maps, "cat, dog", operation="union", grow_px=2, feather_px=2)[0]
    assert mask.shape == (2, 48, 64) and 0 < mask.mean() < 1, "union mask of 'cat, dog' is empty or full"
    inter = pack.DAAMMask.execute(maps, "cat, dog", operation="intersection")[0]
    assert inter.sum() <= mask.sum()
    with pytest.raises(ValueError, match="zebra.*cat"):
        pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, POS, NEG, "zebra", images=images)
    with pytest.raises(ValueError, match="no words"):
        pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, POS, NEG, " , ", images=images)
    with pytest.raises(ValueError, match="not traced"):
        pack.DAAMHeatmaps.execute(model, clip, {"samples": samples}, POS, NEG, "cat")
    long_text = POS + ", " + ", ".join(["a tiny house"] * 30)
    with pytest.raises(ValueError, match="tokens but the sampler"):
        pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, long_text, NEG, "cat")


def test_error_or_cancel_mid_sampling_leaves_nothing_behind(pack, sd15):
    import comfy.model_management as mm

    model, clip, _ = sd15
    pos, neg = encode(clip, POS), encode(clip, NEG)
    plain = ksample(model, pos, neg, steps=3)
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    session = pack.session_of(traced_model)

    def cancel(step, *args):
        if step == 1:
            raise mm.InterruptProcessingException()

    with pytest.raises(mm.InterruptProcessingException):
        ksample(traced_model, pos, neg, steps=3, callback=cancel)
    assert session.records == [] and not session.recorder.active and session.recorder.sums == {}
    assert_same_image(plain, ksample(model, pos, neg, steps=3), "plain sampling after an interrupt")
    again = ksample(traced_model, pos, neg, steps=3)
    assert_same_image(plain, again, "traced sampling after an interrupt")
    assert len(session.records) == 1
    assert set(session.find(again).recorded.calls.values()) == {3}


def test_new_seed_new_maps_and_two_traced_models_do_not_mix(pack, sd15):
    model, clip, _ = sd15
    a = pack.DAAMTraceModel.execute(model)[0]
    b = pack.DAAMTraceModel.execute(model)[0]
    pos_a, pos_b, neg = encode(clip, POS), encode(clip, "a green car in the city"), encode(clip, NEG)
    s1 = ksample(a, pos_a, neg, seed=1)
    s2 = ksample(a, pos_a, neg, seed=2)
    s3 = ksample(b, pos_b, neg, seed=1)
    maps1 = pack.build_trace(a, clip, {"samples": s1}, POS, NEG).word_maps("dog")
    maps2 = pack.build_trace(a, clip, {"samples": s2}, POS, NEG).word_maps("dog")
    assert not torch.allclose(maps1, maps2)
    # a re-run of the unchanged graph reads the first run's latent again: its maps, not the latest run's
    again = pack.build_trace(a, clip, {"samples": s1.clone()}, POS, NEG).word_maps("dog")
    assert torch.equal(again, maps1)
    trace_b = pack.build_trace(b, clip, {"samples": s3}, "a green car in the city", NEG)
    assert trace_b.word_maps("car").shape == (1, 1, 48, 64)
    with pytest.raises(ValueError, match="not produced by a sampler using this DAAM model"):
        pack.build_trace(b, clip, {"samples": s1}, POS, NEG)


def test_existing_attention_patches_are_wrapped_not_overwritten(pack, sd15):
    model, clip, _ = sd15
    pos, neg = encode(clip, POS), encode(clip, NEG)
    calls = {"override": 0, "attn2": 0}

    def other_override(func, *args, **kwargs):
        calls["override"] += 1
        return func(*args, **kwargs) * 0.9

    def other_attn2_patch(n, context, value, extra):
        calls["attn2"] += 1
        return n, context * 1.1, value

    other = model.clone()
    other.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = other_override
    other.set_model_attn2_patch(other_attn2_patch)
    expected = ksample(other, pos, neg)
    seen = dict(calls)
    traced_model = pack.DAAMTraceModel.execute(other)[0]
    got = ksample(traced_model, pos, neg)
    assert_same_image(expected, got, "traced sampling under another override and attn2 patch")
    assert calls["override"] == 2 * seen["override"] and calls["attn2"] == 2 * seen["attn2"]
    assert pack.build_trace(traced_model, clip, {"samples": got}, POS, NEG).word_maps("dog").max() == 1


def test_long_weighted_prompt_positions(pack, sd15):
    model, clip, _ = sd15
    text = "a (cat:1.3) and a dog, " + ", ".join(["a small wooden house"] * 20) + ", a golden dragon"
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    samples = ksample(traced_model, encode(clip, text), encode(clip, NEG))
    trace = pack.build_trace(traced_model, clip, {"samples": samples}, text, NEG)
    layout = trace.layout(0)
    assert layout.length == 154 and trace.sums[next(iter(trace.sums))].shape[-1] == 154
    host = clip.tokenizer.tokenize_with_weights(text)["l"]
    flat = [t for chunk in host for t in chunk]
    (dragon,) = layout.positions("dragon")
    assert dragon >= 77 and flat[dragon][0] == clip.tokenizer.clip_l.tokenizer.convert_tokens_to_ids("dragon</w>")
    (cat,) = layout.positions("cat")
    assert flat[cat][1] == pytest.approx(1.3)
    maps = trace.word_maps(["dragon", "cat", "house#20"])
    assert maps.shape == (1, 3, 48, 64) and torch.isfinite(maps).all()


def test_sdxl_with_both_encoders(pack, comfy_host):
    from comfy.sdxl_clip import SDXLTokenizer

    from helpers.checkpoints import build_tiny_sdxl_model, sdxl_conditioning

    model, _ = build_tiny_sdxl_model()
    tok = SDXLTokenizer()
    text = "a blue bird on a branch"
    tokens = tok.tokenize_with_weights(text)
    assert len(tokens["g"][0]) == len(tokens["l"][0]) == 77
    pos = sdxl_conditioning(seed=1, width=256, height=256)
    neg = sdxl_conditioning(seed=2, width=256, height=256)
    plain = ksample(model, pos, neg, width=256, height=256)
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    samples = ksample(traced_model, pos, neg, width=256, height=256)
    assert_same_image(plain, samples, "SDXL traced sampling")
    trace = pack.build_trace(traced_model, tok, {"samples": samples}, text, "")
    assert {layer.factor for layer in trace.layers.values()} >= {2}
    maps = trace.word_maps(["bird", "branch"])
    assert maps.shape == (1, 2, 256, 256) and not torch.allclose(maps[0, 0], maps[0, 1])


def test_combined_and_area_conditionings_map_the_first_entry(pack, sd15):
    import nodes as host_nodes

    model, clip, _ = sd15
    pos, other, neg = encode(clip, POS), encode(clip, "a green car in the city"), encode(clip, NEG)
    area = host_nodes.ConditioningSetArea().append(other, 32, 24, 0, 0, 1.0)[0]  # left half, cropped calls
    for extra in (other, area):
        combined = host_nodes.ConditioningCombine().combine(pos, extra)[0]
        plain = ksample(model, combined, neg)
        traced_model = pack.DAAMTraceModel.execute(model)[0]
        samples = ksample(traced_model, combined, neg)
        assert torch.equal(plain, samples)  # the image is never changed
        trace = pack.build_trace(traced_model, clip, {"samples": samples}, POS, NEG)
        assert any("2 entries" in w and "first one only" in w for w in trace.warnings)
        dog = trace.word_maps("dog")
        assert dog.shape == (1, 1, 48, 64) and torch.isfinite(dog).all() and dog.max() == 1


def test_ksampler_advanced_and_custom_guider_sampling(pack, sd15):
    """KSamplerAdvanced (a step range) and the SamplerCustomAdvanced path (guider.sample) on a traced clone."""
    import comfy.sample
    import comfy.samplers
    import nodes as host_nodes

    model, clip, _ = sd15
    pos, neg = encode(clip, POS), encode(clip, NEG)
    latent = {"samples": torch.zeros(1, 4, 6, 8)}
    adv = (model, "enable", 4, 3, 5.0, "euler", "normal", pos, neg, latent, 1, 3, "disable")
    plain = host_nodes.KSamplerAdvanced().sample(*adv)[0]["samples"]
    traced = pack.DAAMTraceModel.execute(model)[0]
    samples = host_nodes.KSamplerAdvanced().sample(traced, *adv[1:])[0]["samples"]
    assert_same_image(plain, samples, "KSamplerAdvanced traced sampling")
    assert pack.build_trace(traced, clip, {"samples": samples}, POS, NEG).word_maps("dog").max() == 1

    def custom(m):
        guider = comfy.samplers.CFGGuider(m)
        guider.set_conds(pos, neg)
        guider.set_cfg(5.0)
        sigmas = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "karras", 3)
        noise = comfy.sample.prepare_noise(latent["samples"], 9)
        return guider.sample(noise, latent["samples"], comfy.samplers.sampler_object("dpmpp_2m"), sigmas, seed=9,
                             disable_pbar=True)

    plain = custom(model)
    traced = pack.DAAMTraceModel.execute(model)[0]
    samples = custom(traced)
    assert_same_image(plain, samples, "SamplerCustom traced sampling")
    maps = pack.build_trace(traced, clip, {"samples": samples}, POS, NEG).word_maps(["cat", "dog"])
    assert maps.shape == (1, 2, 48, 64) and not torch.equal(maps[0, 0], maps[0, 1])


# -- review defects (issue 15, item 2 d, g, h) on the real host -------------------------------------------------------

def test_heads_out_of_range_fail_at_trace_model_creation(pack, sd15):
    model = sd15[0]
    with pytest.raises(ValueError, match=r"heads \[99\] do not exist: this model's cross-attention layers have 8"):
        pack.DAAMTraceModel.execute(model, heads="99")
    with pytest.raises(ValueError, match="comma-separated integers"):
        pack.DAAMTraceModel.execute(model, heads="0, x")
    traced = pack.DAAMTraceModel.execute(model, heads="0,7")[0]
    assert pack.session_of(traced).recorder.filter.heads == (0, 7)


def test_block_ranges_and_t5_segments_are_errors_on_a_unet(pack, sd15):
    model, clip, _ = sd15
    with pytest.raises(ValueError, match="blocks 'double:0-3' is for SD3/Flux.*resolutions and unet_parts"):
        pack.DAAMTraceModel.execute(model, blocks="double:0-3")
    traced_model = pack.DAAMTraceModel.execute(model)[0]
    samples = ksample(traced_model, encode(clip, POS), encode(clip, NEG))
    clip_maps = pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, POS, NEG, "dog",
                                            segments="clip").result[3]
    both = pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, POS, NEG, "dog").result[3]
    assert torch.equal(clip_maps.trace.word_maps("dog", segments="clip"), both.trace.word_maps("dog"))
    with pytest.raises(ValueError, match="no 't5' positions"):
        pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, POS, NEG, "dog", segments="t5")


def test_an_override_that_replaces_daams_without_calling_it_is_named(pack, sd15):
    model, clip, _ = sd15
    traced = pack.DAAMTraceModel.execute(model)[0]
    other = traced.clone()  # another node, applied after DAAM, that ignores the override it finds
    other.model_options["transformer_options"]["optimized_attention_override"] = \
        lambda func, *args, **kwargs: func(*args, **kwargs)
    samples = ksample(other, encode(clip, POS), encode(clip, NEG), steps=1)
    with pytest.raises(ValueError, match="another node replaced DAAM's attention override"):
        pack.build_trace(other, clip, {"samples": samples}, POS, NEG)


def test_mask_node_reads_maps_with_the_heatmaps_settings(pack, sd15):
    model, clip, _ = sd15
    traced = pack.DAAMTraceModel.execute(model)[0]
    samples = ksample(traced, encode(clip, POS), encode(clip, NEG), steps=1)
    words = "red sofa"  # two tokens: "max" and "mean" combine them differently
    out = pack.DAAMHeatmaps.execute(traced, clip, {"samples": samples}, POS, NEG, words, normalize="max",
                                       combine="max", threshold=0.4)
    heat_masks, maps = out.result[2], out.result[3]
    mask = pack.DAAMMask.execute(maps, words, threshold=0.4)[0]
    trace = maps.trace
    reference = (trace.word_maps([words], combine="max", normalize="max")[:, 0] >= 0.4).float()
    default = (trace.word_maps([words])[:, 0] >= 0.4).float()
    assert not torch.equal(reference, default), "the settings should matter for this prompt"
    assert torch.equal(mask, reference) and torch.equal(heat_masks, reference)


def test_heatmaps_refuse_a_different_text_of_the_same_length(pack, sd15):
    model, clip, _ = sd15
    traced = pack.DAAMTraceModel.execute(model)[0]
    samples = ksample(traced, encode(clip, POS), encode(clip, NEG), steps=1)
    other = "a cow and a pig on a blue bed"  # as many tokens as POS
    assert clip.tokenize(other)["l"] != clip.tokenize(POS)["l"]
    assert len(clip.tokenize(other)["l"][0]) == len(clip.tokenize(POS)["l"][0])
    with pytest.raises(ValueError, match="not the text the sampler's positive conditioning was encoded from"):
        pack.DAAMHeatmaps.execute(traced, clip, {"samples": samples}, other, NEG, "cow")
    with pytest.raises(ValueError, match="negative conditioning"):
        pack.DAAMHeatmaps.execute(traced, clip, {"samples": samples}, POS, "sharp, high quality", "dog")
    assert pack.DAAMHeatmaps.execute(traced, clip, {"samples": samples}, POS, NEG, "dog").result[2].max() == 1


def test_negative_words_without_a_recorded_negative_branch_are_an_error(pack, sd15):
    model, clip, _ = sd15
    traced = pack.DAAMTraceModel.execute(model, record_negative=False)[0]
    samples = ksample(traced, encode(clip, POS), encode(clip, NEG), steps=1)
    with pytest.raises(ValueError, match="negative branch was not recorded"):
        pack.DAAMHeatmaps.execute(traced, clip, {"samples": samples}, POS, NEG, "dog", negative_words="blurry")


def test_non_finite_attention_is_an_error_naming_the_layers(pack, sd15):
    """Another node's override that turns one layer's attention output into NaN (a broken model): the image is
    NaN; DAAM Heatmaps refuses with the layers whose recorded attention is not finite, never a blank map."""
    model, clip, _ = sd15
    pos, neg = encode(clip, POS), encode(clip, NEG)

    def nan_at_mid_block(func, *args, **kwargs):
        out = func(*args, **kwargs)
        block = kwargs.get("transformer_options", {}).get("block")
        return out * float("nan") if block is not None and block[0] == "middle" else out

    broken = model.clone()
    broken.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = nan_at_mid_block
    traced_model = pack.DAAMTraceModel.execute(broken)[0]
    samples = ksample(traced_model, pos, neg)
    assert torch.isnan(samples).all()  # the host's own result is broken: nothing DAAM did
    with pytest.raises(ValueError, match=r"layer\(s\) .*middle\.0\.0.* holds NaN or infinity") as err:
        pack.DAAMHeatmaps.execute(traced_model, clip, {"samples": samples}, POS, NEG, "cat")
    assert type(err.value).__name__ == "NonFiniteAttentionError"


def test_attention_replacers_after_the_trace_node_are_found_in_the_prompt(pack):
    """The prompt graph of the shapes workflow: a ModelAttentionBackend fed (through another node) by DAAM Trace
    Model is named; one that feeds the trace node, or a graph without one, gives nothing."""
    import importlib
    import json

    from helpers.browser import REPO

    graph = importlib.import_module(pack.__name__.split(".")[0] + ".daam_core.hosts.comfy.graph")
    wf = json.loads((REPO / "example_workflows" / "api" / "shapes_heatmaps.json").read_text())
    assert graph.attention_replacers_after(wf, "2") == []
    after = json.loads(json.dumps(wf))
    after["30"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["2", 0]}}
    after["31"] = {"class_type": "ModelAttentionBackend", "inputs": {"model": ["30", 0]}}
    after["6"]["inputs"]["model"] = ["31", 0]
    (warning,) = graph.attention_replacers_after(after, "2")
    assert warning.startswith("node 31 'ModelAttentionBackend' comes after DAAM Trace Model")
    before = json.loads(json.dumps(wf))
    before["31"] = {"class_type": "ModelAttentionBackend", "inputs": {"model": ["1", 0]}}
    before["2"]["inputs"]["model"] = ["31", 0]
    assert graph.attention_replacers_after(before, "2") == []
    assert graph.attention_replacers_after(None, "2") == [] and graph.attention_replacers_after(after, None) == []
