"""Chroma on ComfyUI: Flux's double- then single-stream blocks over ``[text, image]``, T5 alone, real CFG.

ComfyUI names each call's block in ``transformer_options`` (``block_type``, ``block_index``). The text may be
masked where T5 padded it; the mask reaches the attention call and the recorder applies it. Chroma has no
guidance distillation: the negative prompt is evaluated at cfg > 1 and has maps. Chroma Radiance (pixel space)
is not this family.
"""

from __future__ import annotations

from .base import DiTSpec, JointFamily, flat_length, register


class Chroma(JointFamily):
    name = "chroma"
    label = "Chroma"
    networks = ("comfy.ldm.chroma.model.Chroma",)

    def describe(self, model, net, config):
        if config.get("image_model", "chroma") != "chroma":
            return None
        return DiTSpec(self, patch=int(net.patch_size), heads=int(net.num_heads),
                       blocks=(("double", len(net.double_blocks)), ("single", len(net.single_blocks))))

    def text_segments(self, tokenizer, tokens, encoders=None):
        return [[("t5", "t5xxl", flat_length(tokens["t5xxl"]))]] if "t5xxl" in tokens else []


register(Chroma())
