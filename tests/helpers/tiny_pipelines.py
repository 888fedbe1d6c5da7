"""Small random-weight diffusers pipelines built from configs (seeded), for the tests.

SD1.x comes from ``daam_core.cli.demo_pipeline`` (the ``daam demo`` fallback); SDXL, SD3 and Flux are test-only.
Tokenizers are the local files of :mod:`daam_core.hosts.diffusers.tokenizers`.
"""

from __future__ import annotations

import torch

from daam_core.cli.demo_pipeline import _text_encoder, _vae, tiny_sd_pipeline, tiny_sd_unet  # noqa: F401
from daam_core.hosts.diffusers.tokenizers import (clip_tokenizer, find_clip_tokenizer_dir,  # noqa: F401
                                                  find_t5_tokenizer_dir, t5_tokenizer)


def tiny_sdxl_pipeline(seed: int = 0, tokenizer_dir=None, vae_levels: int = 2):
    """An SDXL-shaped pipeline with random weights: two text encoders (widths 32 and 32, concatenated to 64),
    text-time conditioning, cross-attention at latent factors 2 and 4 with 2 transformer blocks in the last level."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), cross_attention_dim=64,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=32).eval()
    tok = clip_tokenizer(tokenizer_dir)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=_vae(seed + 1, vae_levels), text_encoder=_text_encoder(32, seed + 2),
                                     text_encoder_2=_text_encoder(32, seed + 3, projection=True), tokenizer=tok,
                                     tokenizer_2=clip_tokenizer(tokenizer_dir), unet=unet, scheduler=sched,
                                     force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- joint-attention transformers (SD3 MMDiT, Flux) -------------------------------------------------------------

def _t5_encoder(width: int, seed: int):
    """A 2-layer T5 encoder of width ``width`` with the real vocabulary (32128 ids), random weights."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=32128, d_model=width, d_ff=2 * width, d_kv=width // 4, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                      is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(config).eval()


def _dit_vae(seed: int, latent_channels: int, levels: int = 2):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(32,) * levels, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1, norm_num_groups=32,
                         sample_size=64, shift_factor=0.0609, scaling_factor=1.5305).eval()


def tiny_sd3_pipeline(seed: int = 0, tokenizer_dir=None, t5_dir=None, qk_norm: str | None = None,
                      dual_attention_layers: tuple[int, ...] = ()):
    """A Stable Diffusion 3-shaped pipeline with random weights.

    MMDiT: 2 joint blocks of 4 heads x 8 (width 32), patch 2, 16 latent channels; text encoders CLIP-L and
    CLIP-G of width 32 (2 layers, the real BPE vocabulary) and a 2-layer T5 of width 64 (the real SentencePiece
    vocabulary), so the joint text sequence is 77 CLIP tokens followed by ``max_sequence_length`` T5 tokens.
    ``qk_norm="rms_norm"`` and ``dual_attention_layers`` give SD3.5's variants (SD3.5 Medium's image-only second
    attention in those blocks). The VAE downsamples by 2.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
        pos_embed_max_size=32, qk_norm=qk_norm, dual_attention_layers=tuple(dual_attention_layers)).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_dit_vae(seed + 1, 16), text_encoder=_text_encoder(32, seed + 2, projection=True),
        tokenizer=clip_tokenizer(tokenizer_dir), text_encoder_2=_text_encoder(32, seed + 3, projection=True),
        tokenizer_2=clip_tokenizer(tokenizer_dir), text_encoder_3=_t5_encoder(64, seed + 4),
        tokenizer_3=t5_tokenizer(t5_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, tokenizer_dir=None, t5_dir=None, guidance: bool = True):
    """A Flux-shaped pipeline with random weights.

    Transformer: 1 double-stream and 2 single-stream blocks of 2 heads x 16 (width 32), RoPE axes (4, 4, 8), the
    guidance embedding of Flux dev when ``guidance``; CLIP-L of width 32 gives the pooled vector and a 2-layer T5
    of width 32 the text tokens (``max_sequence_length`` of them, text first in the joint sequence). The VAE
    downsamples by 2 and has 4 latent channels, packed 2x2 into 16-wide tokens.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance,
        axes_dims_rope=(4, 4, 8)).eval()
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                        vae=_dit_vae(seed + 1, 4), text_encoder=_text_encoder(32, seed + 2),
                        tokenizer=clip_tokenizer(tokenizer_dir), text_encoder_2=_t5_encoder(32, seed + 3),
                        tokenizer_2=t5_tokenizer(t5_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe
