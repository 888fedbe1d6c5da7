"""Tracing real diffusers pipelines (tiny random-weight models built from configs)."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers.models.attention_processor import Attention  # noqa: E402

from daam_core import WordNotFoundError, trace  # noqa: E402
from daam_core.engine import metrics  # noqa: E402
from helpers.tiny_pipelines import tiny_sd_pipeline, tiny_sdxl_pipeline  # noqa: E402
from helpers.reference import head_summed_probabilities  # noqa: E402
from helpers.images import assert_close_image


@pytest.fixture(scope="module")
def sd(clip_tokenizer_dir):
    return tiny_sd_pipeline(seed=0, tokenizer_dir=clip_tokenizer_dir)


@pytest.fixture(scope="module")
def sdxl(clip_tokenizer_dir):
    return tiny_sdxl_pipeline(seed=0, tokenizer_dir=clip_tokenizer_dir)


def run(pipe, prompt="a red car and a dog", steps=3, size=32, seed=0, **kw):
    kw.setdefault("height", size)
    kw.setdefault("width", size)
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, generator=gen, output_type="np", guidance_scale=7.5, **kw).images


def cross_attention_modules(pipe):
    return {n: m for n, m in pipe.unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention}


def test_captured_probabilities_equal_explicit_softmax(sd):
    """Record one real UNet call and compare every layer with softmax(QK^T / sqrt(d)) on the same q, k."""
    reference = {}

    def keep_qk(name):
        def hook(module, args, kwargs, output):
            hs = args[0] if args else kwargs["hidden_states"]
            ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            q, k = module.to_q(hs), module.to_k(ehs)
            p = head_summed_probabilities(q, k, module.heads)
            reference[name] = reference.get(name, 0) + p
        return hook

    mods = cross_attention_modules(sd)
    handles = [m.register_forward_hook(keep_qk(n), with_kwargs=True) for n, m in mods.items()]
    try:
        with trace(sd) as tc:
            run(sd, steps=1)
        result = tc.result()
    finally:
        for h in handles:
            h.remove()
    assert set(result.sums) == set(mods) == set(reference)
    for name, ref in reference.items():
        # rows: [uncond, cond]; streams: [cond, uncond]
        torch.testing.assert_close(result.sums[name][0].double(), ref[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(result.sums[name][1].double(), ref[0], atol=1e-5, rtol=0)
    factors = sorted({result.layers[n].factor for n in result.sums})
    assert factors == [1, 2, 4]  # two levels with attention plus the mid block


def test_traced_image_equals_untraced_and_processors_restored(sd):
    before = dict(sd.unet.attn_processors)
    plain = run(sd, seed=3)
    with trace(sd) as tc:
        traced = run(sd, seed=3)
    assert_close_image(plain, traced, 1e-5, "SD1.5 traced image")
    after = sd.unet.attn_processors
    assert all(after[n] is p for n, p in before.items())
    assert "encode_prompt" not in vars(sd)
    assert not any(m.to_q._forward_hooks or m.to_k._forward_hooks for m in cross_attention_modules(sd).values())
    assert not sd.unet._forward_pre_hooks
    assert tc.result().meta["unet_calls"] == 3


def test_processors_restored_after_exception_mid_sampling(sd):
    originals = dict(sd.unet.attn_processors)

    def explode(pipe, step, t, kwargs):
        if step == 1:
            raise KeyboardInterrupt("user cancelled")
        return kwargs

    with pytest.raises(KeyboardInterrupt):
        with trace(sd):
            run(sd, steps=4, callback_on_step_end=explode)
    assert dict(sd.unet.attn_processors) == originals
    assert not sd.unet._forward_pre_hooks and "encode_prompt" not in vars(sd)
    # the pipeline still works and gives the untraced image afterwards
    assert np.isfinite(run(sd, steps=2)).all()


def test_memory_is_flat_in_steps(sd):
    sizes = []
    for steps in (5, 50):
        with trace(sd) as tc:
            run(sd, steps=steps)
        res = tc.result()
        sizes.append(res.nbytes())
        assert set(res.calls.values()) == {steps}
    assert sizes[0] == sizes[1]


def test_non_square_two_prompts_and_images_per_prompt(sd):
    prompts = ["a photo of a dog on grass", "a red car in the city"]
    with trace(sd) as tc:
        images = run(sd, prompt=prompts, height=128, width=192, num_images_per_prompt=2, steps=2,
                     negative_prompt=["blurry", "low quality"])
    res = tc.result()
    assert images.shape == (4, 128, 192, 3)
    assert res.latent_hw == (64, 96) and res.image_hw == (128, 192)
    assert {res.layers[n].hw for n in res.sums} == {(64, 96), (32, 48), (16, 24)}
    tok = sd.tokenizer
    ids = tok(prompts[0]).input_ids
    dog = ids.index(tok.convert_tokens_to_ids("dog</w>"))
    assert res.layout(0).positions("dog") == (dog,)
    assert res.layout(1).positions("dog") == (dog,)  # second image of the first prompt
    with pytest.raises(WordNotFoundError, match="car"):
        res.layout(0).positions("car")
    assert res.layout(2).positions("car") == (tok(prompts[1]).input_ids.index(tok.convert_tokens_to_ids("car</w>")),)
    maps = res.word_maps(["dog", "car"], missing="zeros")
    assert maps.shape == (4, 2, 128, 192)
    assert maps[0, 0].max() == 1 and maps[0, 1].max() == 0 and maps[2, 1].max() == 1
    assert not torch.allclose(maps[0, 0], maps[2, 1])  # different prompts, different maps
    neg = res.word_maps("blurry", branch="uncond", image=1)
    assert neg.shape == (1, 128, 192) and neg.max() == 1
    with pytest.raises(WordNotFoundError):
        res.word_maps("blurry", branch="uncond", image=2)


def test_long_and_weighted_prompt_through_encode_prompt(sd):
    filler = ", ".join(["a small wooden house"] * 20)  # about 100 tokens
    prompt = f"{filler}, a (golden:1.4) dragon"
    with trace(sd) as tc:
        kw = tc.encode_prompt(prompt, "ugly")
        assert kw["prompt_embeds"].shape[1] == 154 and kw["negative_prompt_embeds"].shape[1] == 154
        gen = torch.Generator().manual_seed(0)
        sd(num_inference_steps=2, generator=gen, output_type="np", height=32, width=32, **kw)
    res = tc.result()
    layout = res.layout(0)
    assert layout.length == 154
    (pos,) = layout.positions("dragon")
    assert pos > 77 and layout.ids[pos] == sd.tokenizer.convert_tokens_to_ids("dragon</w>")
    (gold,) = layout.positions("golden")
    assert layout.weights[gold] == pytest.approx(1.4)
    assert res.layout(0, "uncond").length == 77  # the negative was repeated to 154 and folded back
    m = res.word_maps(["dragon", "golden", "house#3"], image=0)
    assert m.shape == (3, 32, 32) and torch.isfinite(m).all()
    assert res.word_maps("ugly", image=0, branch="uncond").max() == 1


def test_weighted_prompt_changes_embeddings_like_comfyui(sd):
    from daam_core.hosts.diffusers.prompt import encode_prompt

    a = encode_prompt(sd, "a red car")["prompt_embeds"]
    b = encode_prompt(sd, "a (red:1.5) car")["prompt_embeds"]
    c = encode_prompt(sd, "a (red:1.0) car")["prompt_embeds"]
    torch.testing.assert_close(a, c)
    empty = encode_prompt(sd, "")["prompt_embeds"]
    # only the weighted position moves, along the direction away from the empty prompt
    diff = (b - a).abs().sum(-1)[0]
    assert diff[2] > 1 and diff[[0, 1, 3, 4]].max() < 1e-4  # others move by rounding only
    torch.testing.assert_close(b[0, 2], empty[0, 2] + 1.5 * (a[0, 2] - empty[0, 2]))


def test_planted_attention_is_recovered_as_mask(sd):
    """Force the queries of a chosen region to align with the key of 'dog' in every layer; the mask finds the region."""
    prompt = "a cat and a dog"
    dog = sd.tokenizer(prompt).input_ids.index(sd.tokenizer.convert_tokens_to_ids("dog</w>"))
    latent = (24, 32)
    region = ((1 / 3, 2 / 3), (0.5, 0.875))  # fractions of height and width, on every layer's grid

    def plant(module):
        state = {}

        def grab(mod, args, kwargs):
            state["ehs"] = kwargs.get("encoder_hidden_states")

        def force_q(mod, args, output):
            ehs = state["ehs"]
            b, n, c = output.shape
            f = int(round(math.sqrt(latent[0] * latent[1] / n)))
            h, w = -(-latent[0] // f), -(-latent[1] // f)
            k_dog = module.to_k(ehs[:, dog])  # [b, c]
            grid = output.clone().view(b, h, w, c)
            rows = slice(round(h * region[0][0]), round(h * region[0][1]))
            cols = slice(round(w * region[1][0]), round(w * region[1][1]))
            d = c // module.heads
            planted = k_dog * (300 * math.sqrt(d) / k_dog.pow(2).sum(-1, keepdim=True))  # dog's logit ~300 per head
            grid[:, rows, cols] = planted[:, None, None]
            return grid.view(b, n, c)

        return [module.register_forward_pre_hook(grab, with_kwargs=True), module.to_q.register_forward_hook(force_q)]

    handles = [h for m in cross_attention_modules(sd).values() for h in plant(m)]
    try:
        with trace(sd) as tc:
            run(sd, prompt=prompt, steps=2, height=latent[0] * 2, width=latent[1] * 2)
    finally:
        for h in handles:
            h.remove()
    res = tc.result()
    H, W = res.image_hw
    truth = torch.zeros(H, W)
    truth[round(H * region[0][0]):round(H * region[0][1]), round(W * region[1][0]):round(W * region[1][1])] = 1
    mask = res.word_map("dog").mask(0.4)
    assert metrics.iou(mask, truth) >= 0.9, "the mask of 'dog' misses its planted region"
    assert metrics.iou(res.word_map("cat").mask(0.4), truth) < 0.5, "the mask of 'cat' took 'dog's planted region"


def test_time_window_and_layer_selection(sd):
    with trace(sd, time_window=(0.5, 1.0), factors=[1, 2], locations=["down", "up"]) as tc:
        run(sd, steps=4)
    res = tc.result()
    assert {res.layers[n].factor for n in res.sums} <= {1, 2}
    assert all(res.layers[n].location in ("down", "up") for n in res.sums)
    expected = sum(0.5 <= 1 - float(t) / 1000 <= 1.0 for t in sd.scheduler.timesteps)
    assert 0 < expected < 4 and set(res.calls.values()) == {expected}
    only_up = res.word_maps("car", image=0, locations=["up"])
    both = res.word_maps("car", image=0)
    assert not torch.allclose(only_up, both)
    with pytest.raises(ValueError, match="no recorded layer"):
        res.word_maps("car", image=0, factors=[8])


def test_guidance_one_records_only_conditional(sd):
    with trace(sd) as tc:
        sd("a dog", num_inference_steps=2, guidance_scale=1.0, height=32, width=32, output_type="np",
           generator=torch.Generator().manual_seed(0))
    res = tc.result()
    assert res.branches() == ["cond"] and res.meta["cfg"] is False
    assert res.word_maps("dog", image=0).max() == 1
    with pytest.raises(ValueError, match="without classifier-free guidance"):
        res.word_maps("dog", image=0, branch="uncond")


def test_img2img_and_inpaint_variants(sd):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    init = np.random.default_rng(0).random((32, 48, 3)).astype(np.float32)
    i2i = StableDiffusionImg2ImgPipeline(**sd.components)
    i2i.set_progress_bar_config(disable=True)
    plain = i2i("a dog", image=init, strength=0.5, num_inference_steps=4, output_type="np",
                generator=torch.Generator().manual_seed(1)).images
    with trace(i2i) as tc:
        traced = i2i("a dog", image=init, strength=0.5, num_inference_steps=4, output_type="np",
                     generator=torch.Generator().manual_seed(1)).images
    assert_close_image(plain, traced, 1e-5, "img2img traced image")
    assert tc.result().meta["unet_calls"] == 2 and tc.result().image_hw == (32, 48)
    inpaint = StableDiffusionInpaintPipeline(**sd.components)
    inpaint.set_progress_bar_config(disable=True)
    mask = np.zeros((32, 48), np.float32)
    mask[8:24, 8:40] = 1
    with trace(inpaint) as tc:
        inpaint("a dog", image=init, mask_image=mask, num_inference_steps=2, output_type="np", height=32, width=48,
                generator=torch.Generator().manual_seed(1))
    assert tc.word_maps("dog", image=0).shape == (1, 32, 48)


def test_sdxl_both_encoders_exact_and_mapped(sdxl):
    plain = run(sdxl, prompt="a blue bird on a branch", steps=2, size=64)
    with trace(sdxl) as tc:
        traced = run(sdxl, prompt="a blue bird on a branch", steps=2, size=64)
    assert_close_image(plain, traced, 1e-5, "SDXL traced image")
    res = tc.result()
    assert {res.layers[n].factor for n in res.sums} == {2, 4}
    assert res.sums[next(iter(res.sums))].shape[-1] == 77
    m = res.word_maps(["bird", "branch"], image=0)
    assert m.shape == (2, 64, 64) and not torch.allclose(m[0], m[1])
    # long prompt through both SDXL encoders, with pooled embeddings
    with trace(sdxl) as tc:
        kw = tc.encode_prompt(", ".join(["a tall tree"] * 30) + ", a bird", "")
        assert kw["prompt_embeds"].shape[-1] == 64 and kw["pooled_prompt_embeds"].shape == (1, 32)
        assert kw["negative_prompt_embeds"].abs().sum() == 0  # force_zeros_for_empty_prompt
        sdxl(num_inference_steps=2, height=64, width=64, output_type="np", **kw)
    assert tc.result().layout(0).positions("bird")[0] > 77


def test_errors_are_clear(sd):
    with trace(sd) as tc:
        run(sd, prompt="a dog", steps=1)
    with pytest.raises(WordNotFoundError, match="dog"):
        tc.word_maps("zebra")
    with pytest.raises(ValueError, match="no words"):
        tc.word_maps([])
    with pytest.raises(RuntimeError, match="nothing was traced"):
        with trace(sd) as tc2:
            pass
        tc2.result()
    with pytest.raises(ValueError, match="prompt text"):
        with trace(sd):
            emb = sd.encode_prompt("a dog", "cpu", 1, True)[0]
            sd(prompt_embeds=emb, negative_prompt_embeds=emb, num_inference_steps=1, height=32, width=32)
    with pytest.raises(TypeError, match="not a supported pipeline"):
        trace(object())
