"""MODEL, CLIP and VAE of the shapes model (a diffusers folder) built from the host's own classes.

The UNet becomes ComfyUI's ``UNetModel`` through the host's diffusers key map, the text encoder a
``SDClipModel`` with the folder's config and the real CLIP tokenizer, and the one-level VAE an
``AutoencoderKL`` whose latents are pixels (scale 1).

In ComfyUI a latent cell stands for 8x8 pixels (``EmptyLatentImage`` makes width/8 cells; from 0.10 on the
sampler rescales an empty latent to the model's ``spacial_downscale_ratio``). The shapes model works on one
pixel per cell, so its VAE shows each cell as an 8x8 block (nearest) and encodes an image by its 8x8 means:
the latent format, the VAE and ``EmptyLatentImage`` then agree on 8 on every host, and a 256x256 empty latent
is the model's 32x32 canvas, shown as a 256x256 image.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CELL = 8  # pixels per latent cell on each side, as ComfyUI's EmptyLatentImage assumes


def _read(folder: Path, sub: str, weights: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    config = json.loads((folder / sub / "config.json").read_text())
    return config, load_file(str(folder / sub / weights))


def comfy_unet_config(cfg: dict) -> dict:
    """ComfyUI ``UNetModel`` arguments for a diffusers ``UNet2DConditionModel`` config of the SD1.x kind."""
    channels = list(cfg["block_out_channels"])
    base = channels[0]
    if any(c % base for c in channels):
        raise ValueError(f"block channels {channels} are not multiples of the first")
    n, per = len(channels), int(cfg["layers_per_block"])
    cross_down = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]
    cross_up = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]  # deepest level first
    heads = cfg.get("num_attention_heads") or cfg["attention_head_dim"]  # diffusers names the head count so
    if not isinstance(heads, int):
        raise ValueError("per-block head counts are not supported")
    return {
        "image_size": cfg.get("sample_size", 32), "in_channels": cfg["in_channels"], "out_channels": cfg["out_channels"],
        "model_channels": base, "num_res_blocks": [per] * n, "channel_mult": [c // base for c in channels],
        "transformer_depth": [int(c) for c in cross_down for _ in range(per)],
        "transformer_depth_output": [int(cross_up[n - 1 - level]) for level in range(n) for _ in range(per + 1)],
        "transformer_depth_middle": 1, "context_dim": cfg["cross_attention_dim"], "num_heads": heads,
        "num_head_channels": -1, "use_linear_in_transformer": bool(cfg.get("use_linear_projection", False)),
        "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None, "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }


# diffusers beta_schedule -> the name ComfyUI's make_beta_schedule gives the same betas
SCHEDULES = {"squaredcos_cap_v2": "squaredcos_cap_v2", "linear": "sqrt_linear", "scaled_linear": "linear"}


def load_model(folder: Path):
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models_base
    import comfy.utils

    cfg, weights = _read(folder, "unet", "diffusion_pytorch_model.safetensors")
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if cfg.get("norm_num_groups", 32) != 32:
        raise ValueError("ComfyUI's UNet uses 32 norm groups; this UNet has " + str(cfg["norm_num_groups"]))
    if sched.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"only epsilon prediction is supported, not {sched['prediction_type']!r}")
    given_betas = sched.get("trained_betas")
    if given_betas is None and sched.get("beta_schedule") not in SCHEDULES:
        raise ValueError(f"unknown beta schedule {sched.get('beta_schedule')!r}; known: {sorted(SCHEDULES)}")
    schedule = SCHEDULES.get(sched.get("beta_schedule"), "linear")
    unet_config = comfy_unet_config(cfg)

    class PixelLatent(comfy.latent_formats.LatentFormat):
        latent_channels = cfg["in_channels"]
        scale_factor = 1.0
        latent_rgb_factors = [[1.0 if i == j else 0.0 for j in range(3)] for i in range(cfg["in_channels"])]
        latent_rgb_factors_bias = [0.5, 0.5, 0.5]
        spacial_downscale_ratio = CELL  # what the VAE below shows a cell as (the UNet sees one pixel per cell)

    class ShapesConfig(comfy.supported_models_base.BASE):
        unet_extra_config = {}
        latent_format = PixelLatent
        sampling_settings = {"beta_schedule": schedule, "linear_start": sched.get("beta_start", 0.00085),
                             "linear_end": sched.get("beta_end", 0.012),
                             "timesteps": sched.get("num_train_timesteps", 1000)}
        memory_usage_factor = 1.0

    model_config = ShapesConfig(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(model_config, device=mm.unet_offload_device())
    if given_betas is not None:  # the folder's own betas: timestep i of ComfyUI is timestep i of diffusers
        model.model_sampling._register_schedule(given_betas=torch.tensor(given_betas, dtype=torch.float64))
    key_map = comfy.utils.unet_to_diffusers(unet_config)
    state = {key_map[k]: v.float() for k, v in weights.items() if k in key_map}
    missing, unexpected = model.diffusion_model.load_state_dict(state, strict=False)
    left = sorted(set(weights) - set(key_map))
    if missing or left:
        raise ValueError(f"the UNet weights do not fit ComfyUI's UNetModel: missing {missing[:5]}, unused {left[:5]}")
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                           offload_device=mm.unet_offload_device())


def load_clip(folder: Path, embedding_directory=None):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    text_cfg, weights = _read(folder, "text_encoder", "model.safetensors")
    tok_dir = folder / "tokenizer"
    config = dict(text_cfg)  # the transformers config: ComfyUI's CLIPTextModel reads the same keys
    width = config["hidden_size"]

    class ShapesTextModel(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, textmodel_json_config=dict(config), layer="last",
                             return_projected_pooled=False, model_options={**model_options, "model_name": "clip_l"})

    class ShapesClip(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=ShapesTextModel)

    class ShapesTokenizerL(comfy.sd1_clip.SDTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(tokenizer_path=str(tok_dir), embedding_directory=embedding_directory,
                             embedding_size=width, embedding_key="clip_l", tokenizer_data=tokenizer_data)

    class ShapesTokenizer(comfy.sd1_clip.SD1Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                             tokenizer=ShapesTokenizerL)

    target = comfy.supported_models_base.ClipTarget(ShapesTokenizer, ShapesClip)
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, model_options={"dtype": torch.float32})
    # transformers 5 writes the keys without the "text_model." prefix that ComfyUI's CLIPTextModel uses
    state = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v.float()
             for k, v in weights.items()}
    missing, unexpected = clip.load_sd(state)
    missing = [m for m in missing if "text_projection" not in m]
    if missing:
        raise ValueError(f"the text encoder weights do not fit: missing {missing[:5]}")
    return clip


def load_vae(folder: Path):
    import comfy.diffusers_convert
    import comfy.sd

    cfg, weights = _read(folder, "vae", "diffusion_pytorch_model.safetensors")
    if len(cfg["block_out_channels"]) != 1 or cfg.get("norm_num_groups", 32) != 32:
        raise ValueError("expected the shapes VAE: one level, 32 norm groups")
    state = comfy.diffusers_convert.convert_vae_state_dict({k: v.float() for k, v in weights.items()})
    # the host's converter numbers decoder levels for 4-level VAEs (up_blocks.0 -> up.3); this one has one level
    state = {k.replace("decoder.up.3.", "decoder.up.0."): v for k, v in state.items()}
    ch = cfg["block_out_channels"][0]
    for part in ("encoder", "decoder"):
        if f"{part}.mid.attn_1.q.weight" not in state:  # no mid attention in diffusers: a zero output projection
            for name in ("q", "k", "v", "proj_out"):  # makes ComfyUI's block the identity
                state[f"{part}.mid.attn_1.{name}.weight"] = torch.zeros(ch, ch, 1, 1)
                state[f"{part}.mid.attn_1.{name}.bias"] = torch.zeros(ch)
            state[f"{part}.mid.attn_1.norm.weight"] = torch.ones(ch)
            state[f"{part}.mid.attn_1.norm.bias"] = torch.zeros(ch)
    dd = {"double_z": True, "z_channels": cfg["latent_channels"], "resolution": cfg.get("sample_size", 32),
          "in_channels": cfg["in_channels"], "out_ch": cfg["out_channels"], "ch": ch, "ch_mult": [1],
          "num_res_blocks": cfg["layers_per_block"], "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.sd.VAE(sd=state, config={"params": {"embed_dim": cfg["latent_channels"], "ddconfig": dd}},
                       dtype=torch.float32)
    missing, _ = vae.first_stage_model.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"the VAE weights do not fit ComfyUI's AutoencoderKL: missing {missing[:5]}")
    model = vae.first_stage_model
    model.encoder = _Cells(model.encoder, up=False)
    model.decoder = _Cells(model.decoder, up=True)
    vae.downscale_ratio = vae.upscale_ratio = CELL
    vae.latent_channels = cfg["latent_channels"]
    return vae


class _Cells(torch.nn.Module):
    """The shapes VAE's encoder (``up=False``: on the image's CELL x CELL means) or decoder (``up=True``: each
    output pixel shown as a CELL x CELL block), so that one latent cell is CELL x CELL pixels."""

    def __init__(self, inner: torch.nn.Module, up: bool):
        super().__init__()
        self.inner, self.up = inner, up

    def forward(self, x, **kwargs):
        if self.up:
            return torch.nn.functional.interpolate(self.inner(x, **kwargs), scale_factor=CELL, mode="nearest")
        return self.inner(torch.nn.functional.avg_pool2d(x, CELL), **kwargs)
