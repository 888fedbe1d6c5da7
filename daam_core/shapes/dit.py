"""The shapes model with joint attention: an SD3-shaped MMDiT trained on :mod:`daam_core.shapes.scenes`.

The UNet shapes model (:mod:`daam_core.shapes.model`) has cross-attention only, so the joint-attention
refinement (output similarity, ConceptAttention-style) cannot be measured on it. This one is a diffusers
``StableDiffusion3Pipeline``: a small ``SD3Transformer2DModel`` (patch 2 over the 32x32 pixel-space canvas: 16x16
image tokens) trained with the rectified-flow objective, conditioned by the UNet model's own trained CLIP text
encoder (frozen, used for both of SD3's CLIP slots; no T5: the pipeline's zero T5 tokens) and decoded by its
identity VAE. Only the transformer is stored (``assets/shapes_dit``); the rest is read from ``assets/shapes``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .model import ASSET_DIR, TEXT_WIDTH

DIT_DIR = ASSET_DIR.parent / "shapes_dit"
T5_TOKENS = 8  # the pipeline's (zero) T5 positions after the 77 CLIP positions
TRANSFORMER_CONFIG = dict(sample_size=32, patch_size=2, in_channels=3, out_channels=3, num_layers=4,
                          attention_head_dim=32, num_attention_heads=4, joint_attention_dim=2 * TEXT_WIDTH,
                          caption_projection_dim=128, pooled_projection_dim=2 * TEXT_WIDTH, pos_embed_max_size=16)


def build_transformer(seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**TRANSFORMER_CONFIG)


def _text_encoder(folder: Path, dtype):
    """The shapes CLIP as ``CLIPTextModelWithProjection`` with an identity projection (its pooled vector is the
    end token's hidden state, as SD3's pipeline reads it)."""
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    enc = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))
    state = load_file(str(folder / "text_encoder" / "model.safetensors"))
    enc.text_model.load_state_dict({k.removeprefix("text_model."): v for k, v in state.items()})  # strict
    with torch.no_grad():
        enc.text_projection.weight.copy_(torch.eye(TEXT_WIDTH))
    return enc.to(dtype).eval().requires_grad_(False)


def assemble(transformer, shapes_folder: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """A ``StableDiffusion3Pipeline`` around ``transformer`` with the shapes model's tokenizer, text encoder (in
    both CLIP slots) and VAE."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    folder = Path(shapes_folder) if shapes_folder else ASSET_DIR
    vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=dtype).eval().requires_grad_(False)
    vae.register_to_config(shift_factor=0.0)  # SD3's pipeline shifts latents; the identity VAE needs none
    tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    if transformer.dtype != dtype:
        transformer = transformer.to(dtype)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae,
        text_encoder=_text_encoder(folder, dtype), tokenizer=tok, text_encoder_2=_text_encoder(folder, dtype),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(folder / "tokenizer")), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def available(path: str | Path | None = None) -> bool:
    return (Path(path or DIT_DIR) / "transformer" / "config.json").is_file() and (ASSET_DIR / "vae").is_dir()


def load_shapes_dit_pipeline(path: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """The shipped joint-attention shapes pipeline (call it with ``max_sequence_length=T5_TOKENS``)."""
    from diffusers import SD3Transformer2DModel

    folder = Path(path or DIT_DIR)
    if not available(folder):
        raise FileNotFoundError(f"no shapes DiT transformer in {folder} (train one: tools/train_shapes_dit.py)")
    transformer = SD3Transformer2DModel.from_pretrained(str(folder / "transformer"), torch_dtype=dtype,
                                                        use_safetensors=True)
    return assemble(transformer.eval(), dtype=dtype)
