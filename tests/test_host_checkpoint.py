"""The tiny random-weight checkpoints load, are detected and sample with the real ComfyUI host (in-process)."""

from __future__ import annotations

import pytest
import torch
from helpers.images import assert_same_image

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def sd15(comfy_host, sd15_checkpoint):
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint))
    return model, clip, vae


def test_sd15_checkpoint_is_detected(sd15):
    import comfy.model_base

    model, clip, vae = sd15
    config = model.model.model_config
    assert type(config).__name__ == "SD15"
    assert type(model.model) is comfy.model_base.BaseModel
    assert config.unet_config["context_dim"] == 768
    assert config.unet_config["transformer_depth"] == [1, 1, 0]
    assert clip is not None and vae is not None


def test_sd15_checkpoint_has_every_weight(sd15, sd15_checkpoint):
    """ComfyUI leaves weights that a checkpoint lacks uninitialised: the file must cover the whole model."""
    from safetensors import safe_open

    model, clip, vae = sd15
    with safe_open(str(sd15_checkpoint), "pt") as f:
        keys = set(f.keys())
    unet = {"model.diffusion_model." + k for k in model.model.diffusion_model.state_dict()}
    assert unet <= keys
    vae_keys = {"first_stage_model." + k for k in vae.first_stage_model.state_dict()}
    assert vae_keys <= keys
    # SD1 CLIP keys are renamed clip_l.* -> cond_stage_model.*; projection and logit scale are unused by SD1.
    clip_keys = {k.replace("clip_l.", "cond_stage_model.", 1) for k in clip.cond_stage_model.state_dict()
                 if not k.endswith(("logit_scale", "text_projection.weight"))}
    assert clip_keys <= keys


def test_sd15_samples_and_decodes(sd15):
    import nodes  # the host's nodes.py (comfy_host put the host first on sys.path)

    model, clip, vae = sd15
    with torch.inference_mode():
        positive = nodes.CLIPTextEncode().encode(clip, "a photo of a cat on a red sofa")[0]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    assert positive[0][0].shape == (1, 77, 768)
    assert torch.isfinite(positive[0][0]).all()

    latent = {"samples": torch.zeros([1, 4, 64 // 8, 96 // 8])}
    with torch.inference_mode():  # as the host's executor runs nodes
        samples = nodes.common_ksampler(model, 0, 2, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]
        image = vae.decode(samples)
    assert samples.shape == (1, 4, 8, 12)
    assert torch.isfinite(samples).all()
    assert image.shape == (1, 64, 96, 3)
    assert torch.isfinite(image).all()
    assert float(image.std()) > 1e-3, "decoded image is constant"

    # Same seed -> same image: the weights and the sampler are deterministic.
    with torch.inference_mode():
        again = nodes.common_ksampler(model, 0, 2, 5.0, "euler", "normal", positive, negative, latent)[0]
    assert_same_image(samples, again["samples"], "second sampling with the same seed")


def test_sdxl_model_builds_and_samples(comfy_host):
    import comfy.model_base
    import comfy.supported_models
    import nodes
    from helpers.checkpoints import build_tiny_sdxl_model, sdxl_conditioning

    model, vae = build_tiny_sdxl_model(seed=0)
    assert isinstance(model.model, comfy.model_base.SDXL)
    assert type(model.model.model_config) is comfy.supported_models.SDXL
    assert model.model.model_config.unet_config["context_dim"] == 2048

    positive = sdxl_conditioning(seed=1, width=64, height=64)
    negative = sdxl_conditioning(seed=2, width=64, height=64)
    latent = {"samples": torch.zeros([1, 4, 8, 8])}
    with torch.inference_mode():
        samples = nodes.common_ksampler(model, 0, 2, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]
        image = vae.decode(samples)
    assert torch.isfinite(samples).all()
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(image).all() and float(image.std()) > 1e-3


def _stock_sd15_prompt(ckpt_name: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a cat"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 0, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "daam_host_test"}},
    }


@pytest.mark.e2e
def test_server_runs_stock_workflow_with_tiny_checkpoint(comfyui_dir, sd15_checkpoint, tmp_path):
    import io
    import sys

    from PIL import Image

    from helpers.comfy_server import ComfyServerError, running_comfyui

    with running_comfyui(comfyui_dir, sys.executable, work_dir=tmp_path,
                         checkpoints_dir=sd15_checkpoint.parent) as client:
        assert client.system_stats()["system"]["comfyui_version"]
        info = client.object_info()
        assert sd15_checkpoint.name in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]

        prompt = _stock_sd15_prompt(sd15_checkpoint.name)
        entry = client.wait(client.queue(prompt), timeout=120)
        assert entry["error"] is None, entry["error"]
        (image_ref,) = client.output_images(entry)
        image = Image.open(io.BytesIO(client.view(*image_ref)))
        assert image.size == (64, 48)
        lo, hi = image.convert("L").getextrema()
        assert hi > lo, "saved image is constant"

        # A prompt the server rejects raises with its validation message.
        bad = dict(prompt, **{"5": {**prompt["5"], "inputs": {**prompt["5"]["inputs"], "sampler_name": "nope"}}})
        with pytest.raises(ComfyServerError, match="sampler_name"):
            client.queue(bad)
    assert client.proc.poll() is not None, "server still running after the context exited"
    assert client.log_path.stat().st_size > 0


def test_clip_tokenizer_fixture_matches_host_tokenizer(comfy_host, clip_tokenizer):
    """transformers' CLIPTokenizer from the host's vocabulary gives the ids ComfyUI's SD1 tokenizer uses."""
    from comfy.sd1_clip import SD1Tokenizer

    text = "a photo of an astronaut riding a horse, oil painting"
    host_ids = [t[0] for t in SD1Tokenizer().tokenize_with_weights(text)["l"][0]]  # padded to 77
    ids = clip_tokenizer(text)["input_ids"]
    assert ids[0] == 49406 and ids[-1] == 49407  # <|startoftext|> ... <|endoftext|>
    assert len(host_ids) == 77 and host_ids[:len(ids)] == ids
