"""LTXV (Lightricks LTX-Video) on ComfyUI: per block a self-attention over the video tokens, then a cross-attention
from the video tokens to the T5-XXL text.

The cross-attention is recorded: its keys are the text conditioning, its queries the ``frames x h x w`` video
tokens (``SymmetricPatchifier``: patch ``(1, p, p)``, ``p`` = 1 in the released models), frame after frame. The
host's LTXV tokenizer pads the text to at least 128 T5 tokens and its encoder returns the padding mask; the model
hands that mask to the cross-attention (``optimized_attention_masked``) and the recorder applies it, so padding
keys get the zero weight they get in the host's softmax. ComfyUI names no LTXV block: the n-th cross-attention of a
model call is block n. Guide frames (``LTXVAddGuide``) are frames of the latent like any other. LTX-2 (its audio
and video model, ``"ltxav"``) is not this family.
"""

from __future__ import annotations

from .base import DiTSpec, JointFamily, flat_length, register


class LTXV(JointFamily):
    name = "ltxv"
    label = "LTXV"
    variants = "LTX-Video text- and image-to-video"
    networks = ("comfy.ldm.lightricks.model.LTXVModel",)
    attention = "cross"
    video = True
    pixels_per_cell = 32  # LTXV's VAE downsamples 32x (newer hosts' latent format says so; 0.3.75's does not)

    def describe(self, model, net, config):
        if config.get("image_model", "ltxv") != "ltxv":
            return None
        frame_patch, patch, patch_w = (int(p) for p in net.patchifier.patch_size)
        blocks = list(net.transformer_blocks)
        if patch != patch_w or not blocks:
            return None
        return DiTSpec(self, patch=patch, heads=int(blocks[0].attn2.heads), blocks=(("block", len(blocks)),),
                       frame_patch=frame_patch)

    def text_segments(self, tokenizer, tokens, encoders=None):
        return [[("t5", "t5xxl", flat_length(tokens["t5xxl"]))]] if "t5xxl" in tokens else []


register(LTXV())
