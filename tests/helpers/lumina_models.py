"""Tiny random-weight Lumina 2 and Z-Image models (the host's ``NextDiT``) and a tiny Gemma tokenizer.

The host picks the model class and every field of its config from the keys and shapes of a full-width checkpoint
(``comfy.model_detection.detect_unet_config``: Lumina 2 at width 2304, Z-Image at 3840 with ``cap_pad_token``; no
data is read), exactly as it loads a real file. Only then are the widths cut (``dim``, heads, grouped-query
``n_kv_heads``), keeping the head width the detected RoPE axes need (Lumina 2: 32 + 32 + 32, Z-Image: 32 + 48 +
48); every other field (Z-Image's modulation, time scale, 32-token padding, refiner layers) is the host's own.
Weights are seeded per key (``helpers.dit_checkpoints._fill``).
"""

from __future__ import annotations

import io

import torch

from helpers.dit_checkpoints import _patcher

CONTEXT_DIM = 64  # the tests' conditioning width


def _config(width: int, layers: int, z_image: bool, **cut):
    import comfy.model_detection as md

    shapes = {"cap_embedder.1.weight": (width, CONTEXT_DIM)}
    shapes.update({f"layers.{i}.attention.qkv.weight": (3 * width, width) for i in range(layers)})
    shapes["noise_refiner.0.attention.k_norm.weight"] = (128 if z_image else 96,)  # newer hosts look for it
    if z_image:
        shapes["cap_pad_token"] = (1, width)
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    unet_config = md.detect_unet_config(state, "")
    config = md.model_config_from_unet_config(unet_config, state)
    assert config is not None, f"no supported model matches {unet_config}"
    config.unet_config.update(cut)  # after the host chose the class: only widths change
    return config


def build_z_image(seed: int = 0, layers: int = 2):
    """A Z-Image-shaped ``ModelPatcher`` (``supported_models.ZImage``, ``model_base.Lumina2``): 2 heads of 128,
    ``layers`` main layers, the host's two context and two noise refiner layers, caption and image padded to 32."""
    return _patcher(_config(3840, layers, True, dim=256, n_heads=2, n_kv_heads=2), seed)


def build_lumina2(seed: int = 0, layers: int = 2):
    """A Lumina 2-shaped ``ModelPatcher`` (``supported_models.Lumina2``): 4 query heads of 96 sharing 2 key/value
    heads (grouped-query attention, as Lumina 2's 24 / 8), ``layers`` main layers, no padding."""
    return _patcher(_config(2304, layers, False, dim=384, n_heads=4, n_kv_heads=2), seed)


def tiny_gemma_tokenizer(gemma3: bool = False):
    """The host's ``LuminaTokenizer`` (Gemma 2 through ``SPieceTokenizer``, BOS first; ``gemma3``: its
    ``NTokenizer`` for a Gemma 3 encoder) around a small SentencePiece model trained here with Gemma's special ids
    (pad 0, EOS 1, BOS 2, unk 3); the real one travels in the text-encoder file, which the tests cannot have."""
    import sentencepiece as spm
    from comfy.text_encoders.lumina2 import LuminaTokenizer, NTokenizer

    corpus = ["a cat and a dog on a red sofa", "blurry, low quality", "a small wooden house",
              "a golden dragon flies over the sea", "You are an assistant designed to generate superior images with "
              "the superior degree of image-text alignment based on textual prompts or user prompts. <Prompt Start>",
              "the cat sleeps on the sofa at night"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=90, pad_id=0,
                                   eos_id=1, bos_id=2, unk_id=3, num_threads=1, hard_vocab_limit=False,
                                   minloglevel=2)
    cls = NTokenizer if gemma3 else LuminaTokenizer
    return cls(tokenizer_data={"spiece_model": torch.ByteTensor(list(model.getvalue()))})


QWEN3_TINY = {"hidden_size": CONTEXT_DIM, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 1,
              "num_key_value_heads": 1}
GEMMA2_TINY = {"hidden_size": CONTEXT_DIM, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 1,
               "num_key_value_heads": 1, "vocab_size": 90}


def _clip(tokenizer, te, key: str, config: dict, seed: int, tokenizer_data=None):
    import comfy.sd
    import comfy.supported_models_base

    from helpers.dit_checkpoints import _fill

    options = {f"{key}_model_config": config, "dtype": torch.float32}
    clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(tokenizer, te), model_options=options,
                         tokenizer_data=tokenizer_data or {})
    _fill(clip.cond_stage_model, seed)
    return clip


def build_tiny_z_image_clip(seed: int = 0):
    """A ``comfy.sd.CLIP`` of Z-Image's target (``ZImageTokenizer`` with its shipped Qwen3 vocabulary, the host's
    ``Qwen3_4B`` encoder code at 3 layers of width 64 (it reads the second to last), seeded weights): its conditioning is ``[1, tokens, 64]``."""
    from comfy.text_encoders import z_image

    return _clip(z_image.ZImageTokenizer, z_image.te(), "qwen3_4b", QWEN3_TINY, seed)


def build_tiny_lumina2_clip(seed: int = 0):
    """A ``comfy.sd.CLIP`` of Lumina 2's target (``LuminaTokenizer`` around :func:`tiny_gemma_tokenizer`'s model,
    the host's ``Gemma2_2B`` encoder code at 3 layers of width 64 (it reads the second to last) over its 90-piece vocabulary, seeded weights)."""
    from comfy.text_encoders import lumina2

    spiece = tiny_gemma_tokenizer().gemma2_2b.tokenizer.serialize_model()
    return _clip(lumina2.LuminaTokenizer, lumina2.te(), "gemma2_2b", GEMMA2_TINY, seed,
                 tokenizer_data={"spiece_model": spiece})
