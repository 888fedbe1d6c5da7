"""The "shapes" model: a small pixel-space text-to-image model trained on :mod:`daam_core.shapes.scenes`.

It is a standard diffusers ``StableDiffusionPipeline`` folder (``daam_core/shapes/assets/shapes``): a
UNet2DConditionModel at 32x32 with cross-attention at 16x16 and 8x8, a 2-layer CLIPTextModel over
the real CLIP BPE vocabulary, and a one-level AutoencoderKL trained to be the identity (the latents
are the pixels, scaling factor 1), so ``trace(pipe)`` and ``daam generate`` use it unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "shapes"
IMAGE_SIZE = 32
TEXT_WIDTH = 96

# 32 norm groups everywhere: ComfyUI's UNet and VAE classes hard-code GroupNorm(32, ...)
UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64, 96),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=32)
TEXT_CONFIG = dict(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_WIDTH,
                   bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(32,),
                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                  layers_per_block=1, norm_num_groups=32, sample_size=IMAGE_SIZE, scaling_factor=1.0,
                  mid_block_add_attention=False)
# Training noises with the full 1000-step cosine schedule. Its last steps reach sigma ~2e4, where Euler
# and DPM-Solver++ multiply tiny epsilon errors into noise, so the pipeline ships the first 956 steps
# only (sigma_max 14.6, as SD1.x): the same alphas for every timestep it keeps.
TRAINING_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                 prediction_type="epsilon")
INFERENCE_TIMESTEPS = 956


def cosine_betas(n: int = 1000, keep: int | None = None) -> list[float]:
    """The ``squaredcos_cap_v2`` betas of an ``n``-step schedule (first ``keep`` of them)."""
    import math

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
    return betas[:keep]


SCHEDULER_CONFIG = dict(num_train_timesteps=INFERENCE_TIMESTEPS, trained_betas=cosine_betas(1000, INFERENCE_TIMESTEPS),
                        prediction_type="epsilon")


def build_components(seed: int = 0):
    """Fresh (untrained) ``unet, text_encoder, vae`` with the shapes architecture."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    vae = AutoencoderKL(**VAE_CONFIG)
    return unet, text, vae


def assemble_pipeline(unet, text_encoder, vae, tokenizer=None):
    """A ``StableDiffusionPipeline`` around the components (DPM-Solver++ scheduler)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from ..hosts.diffusers.tokenizers import clip_tokenizer

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer or clip_tokenizer(),
                                   unet=unet, scheduler=DPMSolverMultistepScheduler(**SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe


def save_pipeline(pipe, out: str | Path, dtype: torch.dtype = torch.float16) -> int:
    """Write ``pipe`` as a pipeline folder (safetensors); returns its size in bytes.

    The CLIP ``vocab.json``/``merges.txt`` go beside the tokenizer files so that older transformers
    (and ComfyUI's tokenizer) read the folder too; the fast tokenizer's ``tokenizer.json`` is left out
    (transformers rebuilds it from those two).
    """
    import shutil

    from ..hosts.diffusers.tokenizers import TOKENIZER_FILES, find_clip_tokenizer_dir

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.to(dtype)
    pipe.save_pretrained(str(out), safe_serialization=True)
    src = find_clip_tokenizer_dir()
    for name in TOKENIZER_FILES:
        if not (out / "tokenizer" / name).exists():
            shutil.copyfile(src / name, out / "tokenizer" / name)
    (out / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)  # 3.6 MB, rebuilt from vocab + merges
    return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())


def available(path: str | Path | None = None) -> bool:
    p = Path(path or ASSET_DIR)
    return (p / "model_index.json").is_file() and (p / "unet").is_dir()


def load_shapes_pipeline(path: str | Path | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The trained shapes pipeline from its folder (default: the one shipped in the package)."""
    from diffusers import StableDiffusionPipeline

    p = Path(path or ASSET_DIR)
    if not available(p):
        raise FileNotFoundError(f"no shapes model at {p}: train one with tools/train_shapes.py")
    pipe = StableDiffusionPipeline.from_pretrained(str(p), torch_dtype=dtype, local_files_only=True,
                                                   use_safetensors=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
