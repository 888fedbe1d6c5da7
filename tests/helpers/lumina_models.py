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


def tiny_gemma_tokenizer():
    """The host's ``LuminaTokenizer`` (Gemma 2 through ``SPieceTokenizer``, BOS first) around a small SentencePiece
    model trained here with Gemma's special ids (pad 0, EOS 1, BOS 2, unk 3); the real one travels in the
    text-encoder file, which the tests cannot have."""
    import sentencepiece as spm
    from comfy.text_encoders.lumina2 import LuminaTokenizer

    corpus = ["a cat and a dog on a red sofa", "blurry, low quality", "a small wooden house",
              "a golden dragon flies over the sea", "You are an assistant designed to generate superior images with "
              "the superior degree of image-text alignment based on textual prompts or user prompts. <Prompt Start>",
              "the cat sleeps on the sofa at night"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=90, pad_id=0,
                                   eos_id=1, bos_id=2, unk_id=3, num_threads=1, hard_vocab_limit=False,
                                   minloglevel=2)
    return LuminaTokenizer(tokenizer_data={"spiece_model": torch.ByteTensor(list(model.getvalue()))})
