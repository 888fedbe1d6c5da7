"""Tiny random-weight LTXV models and a tiny LTXV text encoder of the host's own classes.

``build_ltxv`` goes through the host's model detection like the builders of ``helpers/dit_checkpoints.py``: the keys
``detect_unet_config`` reads (``adaln_single...``, ``transformer_blocks.N.attn2.to_k.weight``) pick
``supported_models.LTXV`` and the block count; the detection fixes 32 heads and a 4096-wide T5 input, so the heads
(2 of 64) and the caption width are set after it. ``build_tiny_ltxv_clip`` is the host's LTXV text encoder
(``comfy.text_encoders.lt``: its T5-XXL code with the attention mask on, and its ``LTXVT5Tokenizer``, the real T5
tokenizer that ships with ComfyUI) at a small T5 config with seeded weights.
"""

from __future__ import annotations

import torch

from helpers.dit_checkpoints import T5_TINY, _fill, _patcher, detected_config

LTXV_WIDTH = 128  # 2 heads of 64
LTXV_TEXT_DIM = T5_TINY["d_model"]  # the tiny T5's width is the caption input


def build_ltxv(seed: int = 0, layers: int = 2):
    """An LTXV-shaped ``ModelPatcher`` (``model_base.LTXV`` around the host's ``LTXVModel``): ``layers`` blocks of
    2 heads of 64, 128 latent channels (LTXV's latent format), a caption input of ``LTXV_TEXT_DIM``."""
    shapes = {"adaln_single.emb.timestep_embedder.linear_1.bias": (LTXV_WIDTH,)}
    shapes.update({f"transformer_blocks.{i}.attn2.to_k.weight": (LTXV_WIDTH, LTXV_WIDTH) for i in range(layers)})
    return _patcher(detected_config(shapes, num_attention_heads=2, attention_head_dim=LTXV_WIDTH // 2,
                                    caption_channels=LTXV_TEXT_DIM), seed)


def build_tiny_ltxv_clip(seed: int = 0):
    """A ``comfy.sd.CLIP`` made of the host's LTXV text-encoder target (``LTXVT5Tokenizer`` + ``ltxv_te()``), T5 at
    ``T5_TINY`` with seeded weights. Its conditioning is ``[1, tokens (>= 128), 64]`` with the padding mask as
    ``attention_mask``."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.lt as lt

    target = comfy.supported_models_base.ClipTarget(lt.LTXVT5Tokenizer, lt.ltxv_te())
    clip = comfy.sd.CLIP(target, model_options={"t5xxl_model_config": T5_TINY, "dtype": torch.float32})
    _fill(clip.cond_stage_model.t5xxl.transformer, seed)
    return clip
