"""The shapes model in ComfyUI: the loader's MODEL, CLIP and VAE compute what the diffusers pipeline computes."""

from __future__ import annotations

import pytest
import torch
from helpers.images import assert_same_image

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory, comfy_host):
    from daam_core.shapes import model as shapes_model

    unet, text, vae = shapes_model.build_components(seed=3)
    with torch.no_grad():  # a random VAE is far from the identity: give its decoder some signal
        for p in vae.parameters():
            p.add_(0.02 * torch.randn_like(p))
    pipe = shapes_model.assemble_pipeline(unet.eval(), text.eval(), vae.eval())
    folder = tmp_path_factory.mktemp("shapes")
    shapes_model.save_pipeline(pipe, folder, dtype=torch.float32)
    return folder, shapes_model.load_shapes_pipeline(folder)


@pytest.fixture(scope="module")
def loaded(pack, shapes_folder):
    folder, _ = shapes_folder
    return pack.DAAMShapesLoader.execute(str(folder))


def test_unet_matches_diffusers(shapes_folder, loaded):
    _, pipe = shapes_folder
    model, _, _ = loaded
    torch.manual_seed(0)
    x, ctx = torch.randn(2, 3, 32, 32), torch.randn(2, 77, pipe.text_encoder.config.hidden_size)
    t = torch.tensor([999.0, 120.0])
    with torch.inference_mode():
        ref = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        out = model.model.diffusion_model(x, timesteps=t, context=ctx)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_text_encoder_matches_diffusers(shapes_folder, loaded):
    _, pipe = shapes_folder
    _, clip, _ = loaded
    text = "a red circle on the left and a blue square on the right"
    with torch.inference_mode():
        ids = pipe.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
        ref = pipe.text_encoder(ids)[0]
        cond = clip.encode_from_tokens(clip.tokenize(text))
    torch.testing.assert_close(cond.float(), ref, rtol=1e-4, atol=1e-4)


def test_vae_matches_diffusers_and_keeps_pixel_size(shapes_folder, loaded):
    _, pipe = shapes_folder
    _, _, vae = loaded
    torch.manual_seed(1)
    z = torch.randn(1, 3, 32, 48)
    with torch.inference_mode():
        ref = (pipe.vae.decode(z).sample / 2 + 0.5).clamp(0, 1)
        ref = ref.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3).permute(0, 2, 3, 1)  # 8x8 px a cell
        out = vae.decode(z)
        enc = vae.encode(out)
        ref_enc = pipe.vae.encode(out.permute(0, 3, 1, 2)[:, :, ::8, ::8] * 2 - 1).latent_dist.mode()
    assert out.shape == (1, 256, 384, 3) and enc.shape == (1, 3, 32, 48)
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(enc.float(), ref_enc, rtol=1e-4, atol=1e-4)  # a block's mean is its pixel


def test_sampling_with_daam_on_the_loaded_model(pack, loaded):
    import comfy.sample
    import nodes as host_nodes

    model, clip, vae = loaded
    text = "a red circle and a blue square"
    pos = host_nodes.CLIPTextEncode().encode(clip, text)[0]
    neg = host_nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = {"samples": torch.zeros(1, 3, 32, 32)}
    (stock,) = host_nodes.KSampler().sample(model, 1, 3, 4.0, "euler", "normal", pos, neg, latent)
    daam_latent, traced = pack.DAAMKSampler.execute(model, 1, 3, 4.0, "euler", "normal", pos, neg, latent)
    assert_same_image(stock["samples"], daam_latent["samples"], "shapes model KSampler (DAAM) latent")
    images = host_nodes.VAEDecode().decode(vae, daam_latent)[0]
    heat, over, masks, _ = pack.DAAMHeatmaps.execute(traced, clip, daam_latent, text, "", "circle, square",
                                                        images=images).result
    assert images.shape == (1, 256, 256, 3)
    assert heat.shape == (2, 256, 256, 3) and masks.shape == (2, 256, 256)
    assert not torch.equal(masks[0], masks[1]), "masks of 'circle' and 'square' are the same"
    # without images the size comes from the model's latent format: 8 pixels a cell, as its VAE decodes
    no_images = pack.DAAMHeatmaps.execute(traced, clip, daam_latent, text, "", "circle, square").result
    assert no_images[2].shape == (2, 256, 256) and torch.equal(no_images[2], masks)


def test_empty_latent_is_the_32px_canvas_on_every_host(pack, loaded):
    """EmptyLatentImage(256) samples the model's 32x32 canvas: ComfyUI >= 0.10 rescales an empty latent from
    EmptyLatentImage's 8 pixels a cell to the model's latent format, older hosts take it as it is."""
    import comfy.sample
    import nodes as host_nodes

    model, clip, vae = loaded
    (latent,) = host_nodes.EmptyLatentImage().generate(256, 256, 1)
    assert latent["samples"].shape[-2:] == (32, 32)
    tag = [latent["downscale_ratio_spacial"]] if "downscale_ratio_spacial" in latent else []  # >= 0.10 only
    assert comfy.sample.fix_empty_latent_channels(model, latent["samples"], *tag).shape == (1, 3, 32, 32)
    pos = host_nodes.CLIPTextEncode().encode(clip, "a red circle")[0]
    (out,) = host_nodes.KSampler().sample(model, 1, 1, 1.0, "euler", "normal", pos, pos, latent)
    assert out["samples"].shape == (1, 3, 32, 32)
    assert host_nodes.VAEDecode().decode(vae, out)[0].shape == (1, 256, 256, 3)


def test_noise_schedule_matches_diffusers(shapes_folder, loaded):
    """ComfyUI samples over the folder's own betas: same sigmas, timestep i is diffusers' timestep i."""
    _, pipe = shapes_folder
    model, _, _ = loaded
    ac = pipe.scheduler.alphas_cumprod.double()
    ref = ((1 - ac) / ac).sqrt()
    sampling = model.get_model_object("model_sampling")
    torch.testing.assert_close(sampling.sigmas.double(), ref, rtol=1e-5, atol=1e-5)  # fp32 both sides
    assert float(sampling.sigma_max) == pytest.approx(14.56, abs=0.01)  # SD1.x's range, not the cosine's 2e4
    assert float(sampling.timestep(sampling.sigma_max)) == len(ac) - 1
