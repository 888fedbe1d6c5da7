"""Tiny random-weight SD3- and Flux-shaped models for the host's joint-attention code.

How they are built (no weights can be downloaded; every tensor is seeded from the file seed and its key, like
``helpers/checkpoints.py``):

In process (``build_sd3`` / ``build_flux`` / ``build_chroma`` / ``build_flux2``)
    Built the way the host loads a checkpoint: the keys and shapes of a (small) checkpoint go through
    ``comfy.model_detection.detect_unet_config`` and ``model_config_from_unet_config``, which pick the model class
    (``supported_models.SD3`` / ``Flux`` / ``FluxSchnell`` / ...) and every field of its config; only the widths
    that some host versions fix instead of reading them from the shapes (Flux's 24 heads and 3072 width, Chroma's
    approximator) are set after detection. ``get_model()`` then gives ``model_base.SD3`` / ``model_base.Flux`` (the
    host's conditioning, guidance and reference-latent handling), random weights, wrapped in a ``ModelPatcher``.
    A field a new host version adds comes from its own detection, so a test fails only when behaviour changed.
    SD3's MMDiT width is ``64 * depth`` with ``depth`` heads of 64; ``sd35=True`` adds SD3.5 Medium's
    ``x_block_self_attn`` (a second, image-only attention) to block 0 and RMS q/k norms. Flux uses 2 heads of
    128 (its RoPE needs 128 per head: axes 16 + 56 + 56). Conditionings are hand-made tensors of a token length
    the tests choose (``conditioning``), because these widths fit no real text encoder.

Files the real loaders detect (``cached_sd3_checkpoint`` / ``cached_flux_unet`` / ``cached_clip_l`` /
``cached_flux_vae``)
    ``comfy/model_detection.py`` reads an MMDiT's depth from ``x_embedder.proj.weight.shape[0] // 64`` and
    ``supported_models.SD3`` wants 16 input channels: a depth-2 MMDiT (width 128) with a 4096-wide context
    embedder (CLIP-L output padded to 4096) and a 2048-wide pooled input is detected as SD3; the checkpoint also
    holds CLIP-L (``text_encoders.clip_l.*``, so ``CheckpointLoaderSimple`` gives a CLIP that encodes CLIP-L only)
    and the 16-channel AE (``first_stage_model.*``). Flux's detection fixes 24 heads of 128 (width 3072) and, on
    0.3.64, a 4096-wide text input, so depth is what is cut: 1 double + 1 single block, guidance embedding on
    (``FluxDev``, ``dev=True``) or off (``FluxSchnell``), ~1.1 GB in bf16, written once into the cache. Its text
    encoder is CLIP-L alone loaded by ``CLIPLoader(type="sd3")`` (SD3's encoder pads it to 4096), and its VAE the
    full-size 16-channel AE (``VAELoader``, 84 M parameters): reduced-channel VAEs are refused by the host.

Cached under ``$DAAM_CACHE/checkpoints`` (see ``helpers.checkpoints.checkpoint_cache_dir``); the SD3 and Flux
files once per ComfyUI version, as they hold the key names of the host classes that wrote them (0.33's Flux saves
its q/k norms as ``.weight``, which 0.3.75's detection does not know; real checkpoints say ``.scale``).
"""

from __future__ import annotations

import zlib

import torch

from helpers.checkpoints import (CLIP_L_WIDTH, _clip_l_specs, _materialise, _save_atomic, _Specs, _vae_specs,
                                 checkpoint_cache_dir)

DIT_LAYOUT_VERSION = 1
STD = 0.02
QK_STD = 0.2  # larger q/k weights: per-token attention with some contrast


def _fill(module: torch.nn.Module, seed: int) -> None:
    """Seeded values for every parameter and float buffer (the host allocates them uninitialised, e.g. SD3's
    ``pos_embed``): norm scales 1, biases 0, the rest normal (q/k projections wider)."""
    tensors = list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers() if b.is_floating_point()]
    with torch.no_grad():
        for name, p in tensors:
            if p.ndim == 1 and (name.endswith(".scale") or "norm" in name):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
                std = QK_STD if ("qkv" in name or "img_in" in name or "txt_in" in name
                                 or "context_embedder" in name) else STD
                p.copy_(torch.randn(p.shape, generator=g) * std)


def detected_config(shapes: dict[str, tuple[int, ...]], **fixed):
    """The host's model config for a checkpoint holding ``shapes`` (key -> shape; no data is read): its
    ``detect_unet_config``, then ``fixed`` (sizes some versions do not read from the shapes), then the
    supported-model class that matches, as ``comfy.sd`` picks it."""
    import comfy.model_detection as md

    state = {k: torch.empty(shape, device="meta") for k, shape in shapes.items()}
    unet_config = md.detect_unet_config(state, "")
    assert unet_config is not None, f"the host detects no model from {sorted(shapes)[:4]}..."
    unet_config.update(fixed)
    config = md.model_config_from_unet_config(unet_config, state)
    assert config is not None, f"no supported model matches {unet_config}"
    return config


def _patcher(config, seed: int):
    import comfy.model_management as mm
    import comfy.model_patcher

    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device="cpu")
    _fill(model.diffusion_model, seed)
    model.diffusion_model.to(torch.float32)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device="cpu")


def _sd3_shapes(depth: int, context_dim: int, pooled_dim: int, patches: int, sd35: bool = False) -> dict:
    """The keys of an MMDiT checkpoint that ``detect_unet_config`` reads (width ``64 * depth``)."""
    width = 64 * depth
    shapes = {"x_embedder.proj.weight": (width, 16, 2, 2), "final_layer.linear.weight": (16 * 4, width),
              "y_embedder.mlp.0.weight": (width, pooled_dim), "context_embedder.weight": (width, context_dim),
              "pos_embed": (1, patches * patches, width)}
    shapes.update({f"joint_blocks.{i}.context_block.attn.qkv.weight": (3 * width, width) for i in range(depth)})
    if sd35:
        shapes["joint_blocks.0.context_block.attn.ln_q.weight"] = (64,)
        shapes["joint_blocks.0.x_block.attn2.qkv.weight"] = (3 * width, width)
    return shapes


def _flux_shapes(hidden: int, context_dim: int, pooled_dim: int | None, double: int, single: int,
                 guidance: bool, in_channels: int = 16, patch: int = 2) -> dict:
    """The keys of a Flux-family checkpoint that ``detect_unet_config`` reads."""
    shapes = {"img_in.weight": (hidden, in_channels * patch * patch), "txt_in.weight": (hidden, context_dim)}
    if pooled_dim is not None:
        shapes["vector_in.in_layer.weight"] = (hidden, pooled_dim)
    if guidance:
        shapes["guidance_in.in_layer.weight"] = (hidden, 256)
    shapes.update({f"double_blocks.{i}.img_attn.norm.key_norm.scale": (128,) for i in range(double)})
    shapes.update({f"single_blocks.{i}.norm.key_norm.scale": (128,) for i in range(single)})
    return shapes


def build_sd3(seed: int = 0, depth: int = 2, sd35: bool = False, context_dim: int = 64, pooled_dim: int = 32):
    """An SD3-shaped ``ModelPatcher`` (``model_base.SD3`` around the host's MMDiT), ``depth`` heads of 64."""
    return _patcher(detected_config(_sd3_shapes(depth, context_dim, pooled_dim, 32, sd35)), seed)


def build_flux(seed: int = 0, dev: bool = True, double: int = 1, single: int = 2, context_dim: int = 64,
               pooled_dim: int = 32):
    """A Flux.1-shaped ``ModelPatcher`` (``model_base.Flux``), 2 heads of 128; ``dev``: guidance embedding."""
    shapes = _flux_shapes(256, context_dim, pooled_dim, double, single, guidance=dev)
    return _patcher(detected_config(shapes, hidden_size=256, num_heads=2, context_in_dim=context_dim), seed)


def build_chroma(seed: int = 0, context_dim: int = 64):
    """A Chroma-shaped ``ModelPatcher`` (1 double + 1 single block, 2 heads of 128, a one-layer approximator)."""
    shapes = _flux_shapes(256, context_dim, None, 1, 1, guidance=False)
    shapes["distilled_guidance_layer.norms.0.scale"] = (64,)
    return _patcher(detected_config(shapes, hidden_size=256, num_heads=2, context_in_dim=context_dim,
                                    out_dim=256, hidden_dim=64, n_layers=1), seed)


def build_flux2(seed: int = 0, context_dim: int = 64):
    """A Flux.2-shaped ``ModelPatcher`` (1 double + 1 single block, 2 heads of 128), on hosts that have Flux.2."""
    shapes = _flux_shapes(256, context_dim, None, 1, 1, guidance=True, in_channels=128, patch=1)
    shapes["double_stream_modulation_img.lin.weight"] = (6 * 256, 256)
    return _patcher(detected_config(shapes, hidden_size=256, num_heads=2, context_in_dim=context_dim), seed)


def build_qwen_image(seed: int = 0, layers: int = 2, context_dim: int = 64):
    """A Qwen-Image-shaped ``ModelPatcher`` (``model_base.QwenImage``): the host detects the input channels and the
    block count from the keys and fixes 24 heads of 128 and a 3584-wide text input, so those are set after
    detection (2 heads of 128: its RoPE axes 16 + 56 + 56 need 128 per head)."""
    shapes = {"txt_norm.weight": (context_dim,), "img_in.weight": (256, 64)}
    shapes.update({f"transformer_blocks.{i}.attn.to_q.weight": (256, 256) for i in range(layers)})
    return _patcher(detected_config(shapes, num_attention_heads=2, attention_head_dim=128,
                                    joint_attention_dim=context_dim), seed)


class IndexEncoder:
    """In place of a text encoder: the hidden state at each position is that position's index (one channel)."""

    def encode_token_weights(self, pairs):
        n = sum(len(c) for c in pairs)
        return torch.arange(n, dtype=torch.float64).view(1, n, 1), None, {"attention_mask": torch.ones(1, n)}


def kept_positions(te_class, tokens, module: bool = False, **parts) -> list[int]:
    """The positions the host's ``te_class.encode_token_weights`` keeps of ``tokens``, run without weights on an
    instance whose sub-encoders are ``parts`` (an :class:`IndexEncoder` for the one whose positions are read):
    the cut is the host's code, the language model is not run. ``module``: the class needs ``nn.Module`` state."""
    te = object.__new__(te_class)
    if module:
        torch.nn.Module.__init__(te)
    te.__dict__.update(parts)
    out, _, _ = te_class.encode_token_weights(te, tokens)
    return [int(p) for p in out[0, :, 0]]


def qwen_kept_positions(tokenizer, text: str):
    """``(tokens, positions)``: the host's ``QwenImageTokenizer`` tokens of ``text`` and the positions its encoder
    keeps (:func:`kept_positions`; Qwen2.5-VL, 7B with no small config of its vision tower, is not run)."""
    from comfy.text_encoders.qwen_image import QwenImageTEModel

    tokens = tokenizer.tokenize_with_weights(text, return_word_ids=True)
    return tokens, kept_positions(QwenImageTEModel, tokens, clip_name="qwen25_7b", clip="qwen25_7b",
                                  qwen25_7b=IndexEncoder())


def conditioning(tokens: int, context_dim: int = 64, pooled_dim: int = 32, seed: int = 0, batch: int = 1,
                 **extra):
    """A hand-made CONDITIONING ``[[cross_attn [B, tokens, context_dim], {"pooled_output": [B, pooled_dim]}]]``."""
    g = torch.Generator().manual_seed(seed)
    cross = torch.randn((batch, tokens, context_dim), generator=g)
    pooled = torch.randn((batch, pooled_dim), generator=g)
    return [[cross, {"pooled_output": pooled, **extra}]]


# -- files for the stock loaders ------------------------------------------------------------------------------

def _state_dict(module: torch.nn.Module, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}


def _meta(name: str, seed: int) -> dict[str, str]:
    return {"daam_test_checkpoint": name, "seed": str(seed), "layout_version": str(DIT_LAYOUT_VERSION)}


def _cache_path(name: str, seed: int, dtype: torch.dtype, by_host: bool = False):
    """``by_host``: the file is saved from the host's own model classes, so it is kept per ComfyUI version."""
    tag = ""
    if by_host:
        import comfyui_version  # the host's, first on sys.path

        tag = f"-comfyui{comfyui_version.__version__}"
    dtype_name = str(dtype).removeprefix("torch.")
    return checkpoint_cache_dir() / f"daam-{name}-v{DIT_LAYOUT_VERSION}-seed{seed}-{dtype_name}{tag}.safetensors"


def _ae_specs(s: _Specs, p: str) -> None:
    """The Flux / SD3 autoencoder: SD's layout with 16 latent channels and no quant convs."""
    _vae_specs(s, p, z=16, quant_convs=False)


def sd3_checkpoint_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Depth-2 MMDiT (detected as SD3) + CLIP-L + the 16-channel AE, in the single-file checkpoint layout."""
    model = _patcher(detected_config(_sd3_shapes(2, 4096, 2048, 64)), seed).model
    out = _state_dict(model.diffusion_model, "model.diffusion_model.", dtype)
    del model
    s = _Specs()
    _clip_l_specs(s, p="text_encoders.clip_l.transformer.text_model.")
    s.add("text_encoders.clip_l.transformer.text_projection.weight", (CLIP_L_WIDTH, CLIP_L_WIDTH))
    _ae_specs(s, "first_stage_model.")
    out.update(_materialise(s, seed, dtype))
    return out


def cached_sd3_checkpoint(seed: int = 0, dtype: torch.dtype = torch.float16):
    """Path of the tiny SD3 checkpoint (MMDiT + CLIP-L + AE, ~430 MB in fp16), written on first use."""
    path = _cache_path("sd3-tiny", seed, dtype, by_host=True)
    if not path.is_file():
        _save_atomic(sd3_checkpoint_state_dict(seed, dtype), path, _meta("sd3-tiny", seed))
    return path


def flux_unet_state_dict(seed: int = 0, dev: bool = True, dtype: torch.dtype = torch.bfloat16):
    """Full-width Flux.1 (24 heads of 128, 4096-wide text input), 1 double + 1 single block, bare UNet keys."""
    model = _patcher(detected_config(_flux_shapes(3072, 4096, 768, 1, 1, guidance=dev)), seed).model
    return _state_dict(model.diffusion_model, "", dtype)


def cached_flux_unet(seed: int = 0, dev: bool = True, dtype: torch.dtype = torch.bfloat16):
    """Path of the tiny Flux.1 dev (``dev``) or schnell diffusion model (~1.1 GB in bf16), written on first use."""
    name = "flux-dev-tiny" if dev else "flux-schnell-tiny"
    path = _cache_path(name, seed, dtype, by_host=True)
    if not path.is_file():
        _save_atomic(flux_unet_state_dict(seed, dev, dtype), path, _meta(name, seed))
    return path


def cached_clip_l(seed: int = 0, dtype: torch.dtype = torch.float16):
    """Path of a random CLIP-L text encoder file (``text_model.*`` keys, for ``CLIPLoader``)."""
    path = _cache_path("clip-l", seed, dtype)
    if not path.is_file():
        s = _Specs()
        _clip_l_specs(s, p="text_model.")
        s.add("text_projection.weight", (CLIP_L_WIDTH, CLIP_L_WIDTH))
        _save_atomic(_materialise(s, seed, dtype), path, _meta("clip-l", seed))
    return path


def cached_flux_vae(seed: int = 0, dtype: torch.dtype = torch.float16):
    """Path of a random 16-channel AE file (``encoder.*`` / ``decoder.*`` keys, for ``VAELoader``)."""
    path = _cache_path("flux-ae", seed, dtype)
    if not path.is_file():
        s = _Specs()
        _ae_specs(s, "")
        _save_atomic(_materialise(s, seed, dtype), path, _meta("flux-ae", seed))
    return path


# -- a tiny real Flux text encoder (CLIP-L + T5 of the host's own classes, small configs) ------------------------

T5_TINY = {"d_model": 64, "d_ff": 128, "d_kv": 32, "num_heads": 2, "num_layers": 2}
CLIP_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2,
             "projection_dim": 32}
TINY_TE_OPTIONS = {"t5xxl_model_config": T5_TINY, "clip_l_model_config": CLIP_TINY}


def build_tiny_flux_clip(seed: int = 0):
    """A ``comfy.sd.CLIP`` of type Flux (CLIP-L + T5-XXL code, 2-layer, 64-wide configs, seeded weights), loaded
    through ``comfy.sd.load_text_encoder_state_dicts(..., model_options=...)`` as ``DualCLIPLoader`` loads one.
    Its conditioning is ``[1, T5 tokens (>= 256), 64]``, its pooled output 32 wide (``build_flux(context_dim=64,
    pooled_dim=32)`` takes both)."""
    import comfy.sd
    import comfy.text_encoders.flux as flux_te

    shapes = flux_te.flux_clip()(device="cpu", dtype=torch.float32, model_options=TINY_TE_OPTIONS)
    dicts = []
    for name, part in (("clip_l", shapes.clip_l), ("t5xxl", shapes.t5xxl)):
        _fill(part.transformer, seed + zlib.crc32(name.encode()))
        dicts.append({k: v.detach().clone() for k, v in part.transformer.state_dict().items()})
    del shapes
    # load_text_encoder_state_dicts rewrites "clip_l_model_config" from the file's position embedding, starting
    # from model_options["model_config"]: the CLIP-L config goes there
    options = {"model_config": dict(CLIP_TINY), "t5xxl_model_config": T5_TINY}
    return comfy.sd.load_text_encoder_state_dicts(dicts, clip_type=comfy.sd.CLIPType.FLUX, model_options=options)


# -- Wan 2.1 / 2.2 (video) ------------------------------------------------------------------------------------------

WAN_TEXT_DIM = 4096  # Wan's text embedding input, fixed by the host's detection (umT5-XXL's width)


def _wan_shapes(dim: int, ffn: int, layers: int, in_dim: int, out_dim: int, i2v: bool) -> dict:
    """The keys of a Wan checkpoint that ``detect_unet_config`` reads (``dim // 128`` heads)."""
    shapes = {"head.modulation": (1, 2, dim), "head.head.weight": (out_dim * 4, dim),
              "patch_embedding.weight": (dim, in_dim, 1, 2, 2), "text_embedding.0.weight": (dim, WAN_TEXT_DIM)}
    shapes.update({f"blocks.{i}.ffn.0.weight": (ffn, dim) for i in range(layers)})
    if i2v:
        shapes["img_emb.proj.0.bias"] = (1280,)
    return shapes


def build_wan(seed: int = 0, layers: int = 2, i2v: bool = False, wan22: bool = False):
    """A Wan-shaped ``ModelPatcher`` (``model_base.WAN21`` / ``WAN22`` around the host's ``WanModel``): 2 heads of
    128, ``layers`` blocks. ``i2v``: Wan 2.1 image-to-video (36 input channels, the CLIP-vision image prompt);
    ``wan22``: Wan 2.2's 48-channel latent (the 5B model)."""
    channels = 48 if wan22 else 16
    in_dim = 36 if i2v else channels
    return _patcher(detected_config(_wan_shapes(256, 64, layers, in_dim, channels, i2v)), seed)


def tiny_umt5_tokenizer(extra: tuple[str, ...] = ()):
    """The host's Wan tokenizer (``WanT5Tokenizer``: umT5 through ``SPieceTokenizer``, padded to 512) around a small
    SentencePiece model trained here (umT5's ids: pad 0, EOS 1, unk 2, no BOS); the real one travels in the
    text-encoder file. Words of the tests' prompts split into several pieces."""
    import io

    import sentencepiece as spm
    from comfy.text_encoders.wan import WanT5Tokenizer

    corpus = ["a cat and a dog on a red sofa", "blurry, low quality", "a small wooden house",
              "a golden dragon flies over the sea", "a video of a dog running in a green park",
              "the cat sleeps on the sofa at night", *extra] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=60, pad_id=0,
                                   eos_id=1, unk_id=2, bos_id=-1, num_threads=1, hard_vocab_limit=False,
                                   minloglevel=2)
    return WanT5Tokenizer(tokenizer_data={"spiece_model": torch.ByteTensor(list(model.getvalue()))})


UMT5_TINY = {"d_model": 4096, "d_ff": 8, "d_kv": 8, "num_heads": 1, "num_layers": 24, "vocab_size": 60}


def build_tiny_wan_clip(seed: int = 0):
    """A ``comfy.sd.CLIP`` of type Wan (the host's umT5 code) loaded as ``CLIPLoader(type="wan")`` loads one: the
    host detects umT5-XXL from block 23's 4096-wide ``wi_1``, so the width stays 4096 (Wan's text input) and the
    rest is cut (1 head of 8, ``d_ff`` 8, the vocabulary of ``tiny_umt5_tokenizer``, whose SentencePiece model
    travels in the state dict as in the real file). Its conditioning is ``[1, tokens (>= 512), 4096]``."""
    import comfy.sd
    import comfy.text_encoders.wan as wan_te

    options = {"umt5xxl_model_config": UMT5_TINY}
    shapes = wan_te.te()(device="cpu", dtype=torch.float32, model_options=options)
    _fill(shapes.umt5xxl.transformer, seed)
    state = {k: v.detach().clone() for k, v in shapes.umt5xxl.transformer.state_dict().items()}
    del shapes
    state["spiece_model"] = tiny_umt5_tokenizer().clip_umt5xxl.tokenizer.serialize_model()
    return comfy.sd.load_text_encoder_state_dicts([state], clip_type=comfy.sd.CLIPType.WAN, model_options=options)
