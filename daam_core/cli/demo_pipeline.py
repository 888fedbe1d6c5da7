"""The random-weight Stable Diffusion 1.x pipeline of ``daam demo`` when no shapes model is at hand.

Built from a config with seeded weights (nothing downloaded): its maps are meaningless, it shows that tracing,
maps and outputs run end to end. The tests build the same pipeline (``tests/helpers/tiny_pipelines.py``).
"""

from __future__ import annotations

import torch

from ..hosts.diffusers.tokenizers import clip_tokenizer


def _text_encoder(hidden: int, seed: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _vae(seed: int, levels: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,) * levels,
                         down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                         layers_per_block=1, norm_num_groups=32, sample_size=64).eval()


def tiny_sd_unet(seed: int = 0, sample_size: int = 16):
    """The SD1.x-shaped UNet of :func:`tiny_sd_pipeline` (random weights from ``seed``)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32).eval()


def tiny_sd_pipeline(seed: int = 0, tokenizer_dir=None, vae_levels: int = 2, scheduler: str = "ddim"):
    """A Stable Diffusion 1.x-shaped pipeline with random weights.

    UNet: channels (32, 64, 64), cross-attention in the first two down blocks, the mid block and the
    last two up blocks (latent factors 1 and 2, 4 for the mid block); 2 heads of width 16 / 32;
    text width 32. The VAE downsamples by ``2 ** (vae_levels - 1)``.
    """
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    unet = tiny_sd_unet(seed)
    sched_cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[scheduler]
    sched = sched_cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    pipe = StableDiffusionPipeline(vae=_vae(seed + 1, vae_levels), text_encoder=_text_encoder(32, seed + 2),
                                   tokenizer=clip_tokenizer(tokenizer_dir), unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
