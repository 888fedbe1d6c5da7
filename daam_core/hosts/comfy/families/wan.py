"""Wan 2.1 / 2.2 (text- and image-to-video) on ComfyUI: per block a self-attention over the video tokens, then a
cross-attention from the video tokens to the umT5 text.

The cross-attention is recorded: its keys are the text conditioning, its queries the ``frames x h x w`` video
tokens (patch ``(1, 2, 2)``), frame after frame. The self-attention (keys: the video) and I2V's image-prompt
attention (keys: the CLIP-vision tokens) are not text and are not recorded. ComfyUI names no Wan block: the
n-th cross-attention of a model call is block n. VACE, camera, S2V, HuMo and Animate models add attention of
their own on Wan's code and are not this family.
"""

from __future__ import annotations

from .base import DiTSpec, JointFamily, flat_length, register


class Wan(JointFamily):
    name = "wan"
    label = "Wan 2.1 / 2.2"
    variants = "text-to-video, image-to-video"
    networks = ("comfy.ldm.wan.model.WanModel",)
    attention = "cross"
    video = True

    def describe(self, model, net, config):
        if config.get("image_model", "wan2.1") != "wan2.1" or config.get("model_type", "t2v") not in ("t2v", "i2v"):
            return None
        frame_patch, patch, patch_w = (int(p) for p in net.patch_size)
        if patch != patch_w:
            return None
        return DiTSpec(self, patch=patch, heads=int(net.num_heads), blocks=(("block", len(net.blocks)),),
                       frame_patch=frame_patch)

    def text_segments(self, tokenizer, tokens, encoders=None):
        return [[("t5", "umt5xxl", flat_length(tokens["umt5xxl"]))]] if "umt5xxl" in tokens else []


register(Wan())
