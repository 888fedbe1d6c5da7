"""SD3 / SD3.5 (MMDiT) on ComfyUI: one joint attention per block over ``[registers, text, image]``.

The conditioning is CLIP-L/G (77 tokens per chunk, side by side in width) followed by T5-XXL on the token axis;
either may be absent when its encoder is not loaded. SD3.5's image-only ``x_block_self_attn`` call is not joint
(its keys are the image alone) and is told apart by its key length.
"""

from __future__ import annotations

from .base import DiTSpec, JointFamily, flat_length, register


class SD3(JointFamily):
    name = "sd3"
    label = "SD3 / SD3.5 (MMDiT)"
    networks = ("comfy.ldm.modules.diffusionmodules.mmdit.MMDiT",)

    def describe(self, model, net, config):
        first = net.joint_blocks[0]
        return DiTSpec(self, patch=int(net.patch_size), heads=int(first.x_block.attn.num_heads),
                       blocks=(("joint", len(net.joint_blocks)),),
                       registers=int(getattr(net, "register_length", 0) or 0))

    def layer(self, spec, index, options):
        return f"joint.{index}", "joint"  # the host names no MMDiT block: blocks run in order

    def text_segments(self, tokenizer, tokens, encoders=None):
        has_t5 = "t5xxl" in tokens
        if encoders is not None and hasattr(encoders, "t5xxl"):  # the loaded encoders decide
            loaded = {k: getattr(encoders, f"clip_{k}", None) is not None for k in ("l", "g")}
            clip = []
            if loaded["l"] or loaded["g"]:
                lengths = [flat_length(tokens[k]) for k in ("l", "g") if loaded[k] and k in tokens]
                clip = [("clip", "l" if loaded["l"] else "g", min(lengths))]
            t5 = [("t5", "t5xxl", flat_length(tokens["t5xxl"]))] if getattr(encoders, "t5xxl", None) is not None \
                else []
            return [clip + t5]
        # CLIP-L/G are cut to the shorter one: a whole number of 77-token chunks
        lengths = [flat_length(tokens[k]) for k in ("l", "g") if k in tokens]
        if not lengths:
            return []  # not SD3's tokenizer (another family's, e.g. Wan's umT5 alone)
        clip = [("clip", "l" if "l" in tokens else "g", min(lengths))]
        t5 = [("t5", "t5xxl", flat_length(tokens["t5xxl"]))] if has_t5 else []
        return [clip + t5, clip] + ([t5] if t5 else [])


register(SD3())
