"""Tracing diffusers SD3 and Flux pipelines: tiny random-weight models built from configs.

How the models are built (``tests/helpers/tiny_pipelines.py``): SD3 is a 2-block MMDiT (4 heads x 8, patch 2, 16
latent channels; SD3.5's q/k RMS norms and its image-only ``attn2`` in block 0 for the main fixture), Flux a
transformer with 1 double-stream and 2 single-stream blocks (2 heads x 16, RoPE, guidance embedding). Text
encoders: CLIP-L/G of width 32 with the CLIP BPE vocabulary ComfyUI ships (``comfy/sd1_tokenizer``) and a 2-layer
T5 of width 32/64 with ComfyUI's T5 SentencePiece tokenizer (``comfy/text_encoders/t5_tokenizer``). VAEs are tiny
(scale 2). The fp64 reference takes q and k where the host's attention function receives them
(``dispatch_attention_fn`` for Flux, after RoPE; SDPA for SD3) and applies the softmax over the whole joint sequence.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from daam_core import trace  # noqa: E402
from helpers.tiny_pipelines import find_t5_tokenizer_dir, tiny_flux_pipeline, tiny_sd3_pipeline  # noqa: E402
from helpers.images import assert_same_image

PROMPT = "a red car and a dog"
T5_LEN = 32  # max_sequence_length: T5 tokens in the joint sequence


@pytest.fixture(scope="module")
def t5_dir(comfyui_dir):
    d = comfyui_dir / "comfy" / "text_encoders" / "t5_tokenizer"
    if not (d / "tokenizer.json").is_file():
        d = find_t5_tokenizer_dir()
    return d


@pytest.fixture(scope="module")
def flux(clip_tokenizer_dir, t5_dir):
    return tiny_flux_pipeline(seed=0, tokenizer_dir=clip_tokenizer_dir, t5_dir=t5_dir)


@pytest.fixture(scope="module")
def sd35(clip_tokenizer_dir, t5_dir):
    return tiny_sd3_pipeline(seed=0, tokenizer_dir=clip_tokenizer_dir, t5_dir=t5_dir, qk_norm="rms_norm",
                             dual_attention_layers=(0,))


@pytest.fixture(scope="module")
def sd3(clip_tokenizer_dir, t5_dir):
    return tiny_sd3_pipeline(seed=1, tokenizer_dir=clip_tokenizer_dir, t5_dir=t5_dir)


def run(pipe, prompt=PROMPT, steps=2, height=32, width=48, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, height=height, width=width, output_type="np", generator=gen,
                max_sequence_length=T5_LEN, **kw).images


def joint_modules(pipe):
    return {n: m for n, m in pipe.transformer.named_modules()
            if n.endswith(".attn") and (hasattr(m, "add_k_proj") or type(m).__name__ == "FluxAttention")}


def fp64_text_probs(q, k, text, image, mask=None):
    """``q``, ``k`` ``[B, H, L, D]``: softmax over all L keys in float64, image rows x text columns, summed over
    heads -> ``[B, N_img, T]``."""
    s = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    p = torch.softmax(s, dim=-1)
    return p[:, :, image[0]:image[1], text[0]:text[1]].sum(1)


class AttentionSpy:
    """Captures q and k where the host's attention function receives them, per joint-attention module (a
    pre-hook names the module being run), and sums the fp64 reference probabilities per module. A context
    manager: its own hooks (never DAAM's) are removed on exit.

    ``ranges`` is (text range, image range) on the joint sequence; ``length``, for SD3, the key length of a joint
    call (SD3.5's image-only attention has another)."""

    def __init__(self, pipe, monkeypatch, family, ranges, length=None):
        self.current = None
        self.calls = {}
        self.ranges, self.length = ranges, length
        self.handles = []
        for name, m in joint_modules(pipe).items():
            self.handles += [m.register_forward_pre_hook(lambda mod, args, name=name: setattr(self, "current", name)),
                             m.register_forward_hook(lambda mod, args, out: setattr(self, "current", None))]
        if family == "flux":
            import diffusers.models.transformers.transformer_flux as tf

            original = tf.dispatch_attention_fn

            def spy(query, key, value, attn_mask=None, **kw):
                if self.current is not None:  # [B, L, H, D]
                    self.add(query.transpose(1, 2), key.transpose(1, 2), attn_mask)
                return original(query, key, value, attn_mask=attn_mask, **kw)

            monkeypatch.setattr(tf, "dispatch_attention_fn", spy)
        else:
            import torch.nn.functional as F

            original = F.scaled_dot_product_attention

            def spy(query, key, value, *args, **kw):
                if self.current is not None and key.shape[2] == self.length:  # not SD3.5's image-only attn2
                    self.add(query, key, None)
                return original(query, key, value, *args, **kw)

            monkeypatch.setattr(F, "scaled_dot_product_attention", spy)

    def add(self, q, k, mask):
        text, image = self.ranges
        self.calls.setdefault(self.current, []).append(fp64_text_probs(q, k, text, image, mask))

    @property
    def ref(self):
        """Per module: the reference summed over its calls."""
        return {name: sum(calls) for name, calls in self.calls.items()}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def test_flux_exact_image_identical_and_words(flux, monkeypatch):
    plain = run(flux)
    n_img = (32 // 4) * (48 // 4)
    with trace(flux) as tc:
        with AttentionSpy(flux, monkeypatch, "flux", ((0, T5_LEN), (T5_LEN, T5_LEN + n_img))) as spy:
            traced = run(flux)
    assert_same_image(plain, traced, "Flux traced image")
    res = tc.result()
    assert set(res.sums) == set(joint_modules(flux)) == set(spy.ref)
    assert {res.layers[n].part for n in res.sums} == {"double", "single"}
    assert {res.layers[n].hw for n in res.sums} == {(8, 12)} and res.layers[next(iter(res.sums))].kind == "joint"
    for name, ref in spy.ref.items():
        torch.testing.assert_close(res.sums[name][0].double(), ref[0], atol=1e-5, rtol=0)
    # words on T5: no BOS, "▁dog" where the tokenizer puts it
    ids = flux.tokenizer_2(PROMPT).input_ids
    assert res.layout(0).positions("dog") == (ids.index(flux.tokenizer_2.convert_tokens_to_ids("\u2581dog")),)
    assert res.layout(0).length == T5_LEN
    maps = res.word_maps(["dog", "car"], image=0)
    assert maps.shape == (2, 32, 48) and maps.amax(dim=(1, 2)).tolist() == [1.0, 1.0]
    assert not torch.allclose(maps[0], maps[1])
    with pytest.raises(ValueError, match="without classifier-free guidance"):
        res.word_maps("dog", image=0, branch="uncond")  # distilled guidance: no negative branch


def test_flux_mask_true_cfg_batch_two_and_blocks(flux, monkeypatch):
    n_img = (32 // 4) * (32 // 4)
    length = T5_LEN + n_img
    mask = torch.ones(1, 1, length, length, dtype=torch.bool)
    mask[..., 10:T5_LEN] = False  # the padding keys are masked out for every query
    kw = dict(height=32, width=32, num_images_per_prompt=2, negative_prompt="blurry photo", true_cfg_scale=2.0,
              joint_attention_kwargs={"attention_mask": mask})
    plain = run(flux, **kw)
    with trace(flux) as tc:
        with AttentionSpy(flux, monkeypatch, "flux", ((0, T5_LEN), (T5_LEN, length))) as spy:
            traced = run(flux, **kw)
    assert_same_image(plain, traced, "Flux true-CFG batch traced image")
    res = tc.result()
    assert res.meta["unet_calls"] == 4 and res.branches() == ["cond", "uncond"]
    for name, calls in spy.calls.items():  # each step: a call with the prompt (2 rows), then one with the negative
        torch.testing.assert_close(res.sums[name][0:2].double(), sum(calls[0::2]), atol=1e-5, rtol=0)
        torch.testing.assert_close(res.sums[name][2:4].double(), sum(calls[1::2]), atol=1e-5, rtol=0)
        assert res.sums[name][:, :, 10:].abs().max() == 0  # masked keys get no probability
    assert res.word_maps("blurry", image=1, branch="uncond").max() == 1
    with trace(flux, blocks="single:1") as tc:
        run(flux, steps=1, height=32, width=32)
    assert set(tc.result().sums) == {"transformer_blocks.0.attn", "single_transformer_blocks.1.attn"}


def test_sd35_exact_image_identical_clip_and_t5_words_negative(sd35, monkeypatch):
    n_img = (32 // 4) * (48 // 4)
    length = n_img + 77 + T5_LEN
    kw = dict(negative_prompt="blurry photo", guidance_scale=5.0)
    plain = run(sd35, **kw)
    with trace(sd35) as tc:
        # image first, then CLIP + T5
        with AttentionSpy(sd35, monkeypatch, "sd3", ((n_img, length), (0, n_img)), length=length) as spy:
            traced = run(sd35, **kw)
    assert_same_image(plain, traced, "SD3.5 traced image")
    res = tc.result()
    assert set(res.sums) == {"transformer_blocks.0.attn", "transformer_blocks.1.attn"} == set(spy.ref)
    for name, ref in spy.ref.items():  # rows [uncond, cond] -> streams [cond, uncond]
        torch.testing.assert_close(res.sums[name][0].double(), ref[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(res.sums[name][1].double(), ref[0], atol=1e-5, rtol=0)
    layout = res.layout(0)
    assert layout.length == 77 + T5_LEN
    clip_ids = sd35.tokenizer(PROMPT).input_ids
    t5_ids = sd35.tokenizer_3(PROMPT).input_ids
    dog = (clip_ids.index(sd35.tokenizer.convert_tokens_to_ids("dog</w>")),
           77 + t5_ids.index(sd35.tokenizer_3.convert_tokens_to_ids("\u2581dog")))
    assert layout.positions("dog") == dog
    m = res.word_maps(["dog", "car"], image=0)
    assert m.shape == (2, 32, 48) and not torch.allclose(m[0], m[1])
    assert res.word_maps("blurry", image=0, branch="uncond").max() == 1


def test_sd3_without_t5_exact_and_image_identical(clip_tokenizer_dir, t5_dir, monkeypatch):
    """SD3 loaded without its T5 (``text_encoder_3=None``, a documented way to save memory): the pipeline's
    zero T5 vectors follow the 77 CLIP positions; they take part in the softmax and are no word."""
    pipe = tiny_sd3_pipeline(seed=2, tokenizer_dir=clip_tokenizer_dir, t5_dir=t5_dir)
    pipe.text_encoder_3, pipe.tokenizer_3 = None, None
    n_img = (32 // 4) * (48 // 4)
    length = n_img + 77 + T5_LEN
    plain = run(pipe, guidance_scale=1.0)
    with trace(pipe) as tc:
        with AttentionSpy(pipe, monkeypatch, "sd3", ((n_img, length), (0, n_img)), length=length) as spy:
            traced = run(pipe, guidance_scale=1.0)
    assert_same_image(plain, traced, "SD3 without T5, traced image")
    res = tc.result()
    for name, ref in spy.ref.items():
        torch.testing.assert_close(res.sums[name][0].double(), ref[0], atol=1e-5, rtol=0)
    layout = res.layout(0)
    assert layout.length == 77 + T5_LEN and [(g.name, g.start, g.stop) for g in layout.segments] == \
        [("clip", 0, 77), ("t5", 77, 77 + T5_LEN)]
    dog = pipe.tokenizer(PROMPT).input_ids.index(pipe.tokenizer.convert_tokens_to_ids("dog</w>"))
    assert layout.positions("dog") == (dog,)
    assert all(w < 0 for w in layout.word_of[77:])
    with pytest.raises(Exception, match="dog"):
        res.word_maps("dog", segments="t5")


def test_sd3_img2img_and_inpaint(sd3):
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline

    init = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    i2i = StableDiffusion3Img2ImgPipeline(**sd3.components)
    i2i.set_progress_bar_config(disable=True)
    kw = dict(image=init, strength=0.6, steps=3, height=None, width=None)
    plain = run(i2i, **kw)
    with trace(i2i) as tc:
        traced = run(i2i, **kw)
    assert_same_image(plain, traced, "SD3 img2img traced image")
    assert tc.result().image_hw == plain.shape[1:3]  # the pipeline's own output size (it resizes the input)
    assert tc.word_maps("dog", image=0).max() == 1
    inpaint = StableDiffusion3InpaintPipeline(**sd3.components)
    inpaint.set_progress_bar_config(disable=True)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    kw = dict(image=init, mask_image=mask, height=32, width=32)
    plain = run(inpaint, **kw)
    with trace(inpaint) as tc:
        traced = run(inpaint, **kw)
    assert_same_image(plain, traced, "SD3 inpaint traced image")
    assert tc.word_maps("car", image=0).shape == (1, *plain.shape[1:3])


def test_flux_img2img_and_inpaint(flux):
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline

    init = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    for cls, extra in ((FluxImg2ImgPipeline, {}), (FluxInpaintPipeline, {"mask_image": torch.ones(1, 1, 32, 48)})):
        pipe = cls(**flux.components)
        pipe.set_progress_bar_config(disable=True)
        kw = dict(image=init, strength=0.7, steps=3, **extra)
        plain = run(pipe, **kw)
        with trace(pipe) as tc:
            traced = run(pipe, **kw)
        assert_same_image(plain, traced, f"{cls.__name__} traced image")
        res = tc.result()
        assert res.image_hw == (32, 48) and res.word_maps("dog", image=0).max() == 1


def test_unsupported_transformer_is_named(flux):
    class Other(torch.nn.Module):
        pass

    class Pipe:
        transformer = Other()
        tokenizer = flux.tokenizer
        encode_prompt = flux.encode_prompt

    with pytest.raises(TypeError, match="Other is not supported"):
        trace(Pipe())


class OutputSpy(AttentionSpy):
    """As :class:`AttentionSpy`, but keeps the attention function's *output* (heads concatenated) and sums the fp64
    output-similarity reference ``softmax_t(o_i . o_t / sqrt(C))`` per module, masked text keys left out."""

    def __init__(self, pipe, monkeypatch, family, ranges, length=None):
        super().__init__(pipe, monkeypatch, family, ranges, length)
        monkeypatch.undo()  # replace the q/k spies by output spies
        if family == "flux":
            import diffusers.models.transformers.transformer_flux as tf

            original = tf.dispatch_attention_fn

            def spy(query, key, value, attn_mask=None, **kw):
                out = original(query, key, value, attn_mask=attn_mask, **kw)
                if self.current is not None:  # [B, L, H, D]
                    self.add_out(out.flatten(2), attn_mask)
                return out

            monkeypatch.setattr(tf, "dispatch_attention_fn", spy)
        else:
            import torch.nn.functional as F

            original = F.scaled_dot_product_attention

            def spy(query, key, value, *args, **kw):
                out = original(query, key, value, *args, **kw)
                if self.current is not None and key.shape[2] == self.length:  # [B, H, L, D]
                    self.add_out(out.transpose(1, 2).flatten(2), None)
                return out

            monkeypatch.setattr(F, "scaled_dot_product_attention", spy)

    def add_out(self, o, mask):
        (t0, t1), (i0, i1) = self.ranges
        o = o.double()
        logits = o[:, i0:i1] @ o[:, t0:t1].transpose(1, 2) / o.shape[-1] ** 0.5
        if mask is not None:  # boolean, True = attend: the text keys the image queries may not attend
            logits = logits.masked_fill(~mask[:, 0, i0:i1, t0:t1], float("-inf"))
        self.calls.setdefault(self.current, []).append(torch.softmax(logits, dim=-1))


@pytest.mark.parametrize("family", ("flux", "sd35"))
def test_output_similarity_sums_exact_and_image_identical(flux, sd35, monkeypatch, family):
    from daam_core.engine.refine import RefineRecording

    if family == "flux":
        pipe, n_img = flux, (32 // 4) * (32 // 4)
        length = T5_LEN + n_img
        mask = torch.ones(1, 1, length, length, dtype=torch.bool)
        mask[..., 10:T5_LEN] = False
        kw = dict(height=32, width=32, negative_prompt="blurry photo", true_cfg_scale=2.0,
                  joint_attention_kwargs={"attention_mask": mask})
        ranges = ((0, T5_LEN), (T5_LEN, length))
    else:
        pipe, n_img = sd35, (32 // 4) * (48 // 4)
        length = n_img + 77 + T5_LEN
        kw = dict(negative_prompt="blurry photo", guidance_scale=5.0)
        ranges = ((n_img, length), (0, n_img))
    plain = run(pipe, **kw)
    with trace(pipe, refine=RefineRecording(output_similarity=True)) as tc:
        with OutputSpy(pipe, monkeypatch, "flux" if family == "flux" else "sd3", ranges, length=length) as spy:
            traced = run(pipe, **kw)
    assert_same_image(plain, traced, f"{family} traced with output similarity")
    res = tc.result()
    assert set(res.output_sums) == set(joint_modules(pipe)) == set(spy.calls)
    for name, calls in spy.calls.items():
        if family == "flux":  # each step: the prompt's call, then the negative's
            want = [sum(calls[0::2])[0], sum(calls[1::2])[0]]
        else:  # one call per step, rows [uncond, cond]
            total = sum(calls)
            want = [total[1], total[0]]
        for stream, ref in enumerate(want):
            got = res.output_sums[name][stream, :, :ref.shape[-1]].double()
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        assert res.output_calls[name] == res.calls[name]
    if family == "flux":
        assert all(v[:, :, 10:].abs().max() == 0 for v in res.output_sums.values())  # masked text keys: nothing
    maps = res.word_maps(["dog", "car"], image=0, source="output")
    assert maps.shape[0] == 2 and not torch.equal(maps, res.word_maps(["dog", "car"], image=0))
    with pytest.raises(ValueError, match="for UNet pipelines only"):
        trace(pipe, refine=RefineRecording(head_sums=True))


def test_output_similarity_trace_saved_loaded_and_analyzed_by_the_cli(flux, tmp_path, capsys):
    """A saved trace keeps the output-similarity sums; ``daam analyze --source output`` cuts the masks of those
    maps (the ones ``word_maps(source="output")`` gives), and refuses a trace without them."""
    import cv2

    from daam_core import AttentionTrace, cli
    from daam_core.engine import masks as mask_ops
    from daam_core.engine.refine import RefineRecording

    with trace(flux, refine=RefineRecording(output_similarity=True)) as tc:
        run(flux, steps=1, height=32, width=32)
    res = tc.result()
    path = tmp_path / "flux.safetensors"
    res.save(path)
    loaded = AttentionTrace.load(path)
    assert set(loaded.output_sums) == set(res.output_sums) and loaded.output_calls == res.output_calls
    assert all(torch.equal(loaded.output_sums[n], res.output_sums[n]) for n in res.output_sums)
    assert cli.main(["analyze", str(path), "--words", "dog", "--source", "output", "--out", str(tmp_path / "a")]) == 0
    mask = cv2.imread(str(tmp_path / "a" / "mask-0-dog.png"), cv2.IMREAD_GRAYSCALE) > 127
    want = mask_ops.threshold(loaded.word_maps("dog", source="output"), 0.4, "relative")[0, 0].numpy() > 0.5
    assert np.array_equal(mask, want)
    with trace(flux) as tc:
        run(flux, steps=1, height=32, width=32)
    tc.result().save(tmp_path / "plain.safetensors")
    rc = cli.main(["analyze", str(tmp_path / "plain.safetensors"), "--words", "dog", "--source", "output",
                   "--out", str(tmp_path / "b")])
    assert rc == 2 and "output-similarity sums" in capsys.readouterr().err
