"""Flux.1 (dev, schnell, Kontext) on ComfyUI: double-stream blocks, then single-stream blocks.

Calls attend over ``[text, image, reference latents]`` (Kontext-style references follow the generated image and
are never mapped); double blocks with ``flipped_img_txt`` put the image first. ComfyUI >= 0.3.7x names each
call's block in ``transformer_options`` (``block_type``, ``block_index``); 0.3.64 does not, and the n-th joint call
of a model call is the n-th block. The conditioning is T5 alone (CLIP-L gives only the pooled vector). Flux.2
(:mod:`.flux2`), Chroma and other models that run on ComfyUI's Flux code are not this family.
"""

from __future__ import annotations

from .base import DiTSpec, JointFamily, clip_only, flat_length, register


class Flux1(JointFamily):
    name = "flux"
    label = "Flux.1"
    variants = "dev, schnell, Kontext"
    networks = ("comfy.ldm.flux.model.Flux",)
    image_first_parts = ("double",)
    distilled_guidance = True
    reference_latents = True

    def describe(self, model, net, config):
        if config.get("image_model", "flux") != "flux" or getattr(getattr(net, "params", None), "global_modulation",
                                                                  False):
            return None  # Flux.2 and other models on Flux's code
        return flux_spec(self, net)

    def text_segments(self, tokenizer, tokens, encoders=None):
        if "t5xxl" in tokens:
            return [[("t5", "t5xxl", flat_length(tokens["t5xxl"]))]]
        return [clip_only(tokens)]  # not Flux's text encoder: the conditioning's width check names it

    def no_negative_reason(self):
        return ("Flux.1's guidance is distilled into the model: there is no negative branch (at cfg 1 the negative "
                "prompt is never evaluated), so negative words have no maps. Clear negative_words")


def flux_spec(family: JointFamily, net) -> DiTSpec:
    """The spec of a network of ComfyUI's Flux code (``comfy.ldm.flux.model.Flux``): double then single blocks."""
    double = list(net.double_blocks)
    return DiTSpec(family, patch=int(net.patch_size), heads=int(net.num_heads),
                   blocks=(("double", len(double)), ("single", len(net.single_blocks))),
                   image_first=bool(double and getattr(double[0], "flipped_img_txt", False)))


register(Flux1())
