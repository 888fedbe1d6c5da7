"""The joint-attention transformer families DAAM traces in diffusers: a registry of :class:`JointFamily` entries.

A family says which transformer classes it covers, which attention modules are joint and their part, how to
rebuild the joint queries and keys from what the module's projections computed, where text and image sit on the
sequence, the spatial grid, which tokenizers made the text tokens and how the pipeline hands over the negative
prompt. :class:`~daam_core.hosts.diffusers.joint.JointTrace` reads only this; a new family is one more class here
and a :func:`register` call.
"""

from __future__ import annotations

import torch

from ...engine.geometry import PatchGrid
from ..contract import add_family


class JointFamily:
    """One joint-attention transformer family of diffusers.

    Attributes
    ----------
    name, label : str
    transformers : tuple of str
        Class names of ``pipe.transformer`` this family traces.
    parts : tuple of str
        Network parts of its layers.
    t5_tokenizer : str
        The pipeline attribute of the T5 tokenizer.
    clip_segment : bool
        The text sequence starts with a CLIP segment (then the T5 one).
    default_t5_length : int
        ``max_sequence_length`` when the call does not give one.
    negative_in_second_call : bool
        The negative prompt (true CFG) comes in a second ``encode_prompt`` call and its own transformer calls;
        otherwise it comes with the prompt and the CFG branches are batched.
    timestep_scale : float
        The transformer's timestep argument times this is the scheduler's timestep.
    """

    name = ""
    label = ""
    transformers: tuple[str, ...] = ()
    parts: tuple[str, ...] = ()
    t5_tokenizer = "tokenizer_2"
    clip_segment = False
    default_t5_length = 512
    negative_in_second_call = False
    timestep_scale = 1.0

    def part_of(self, name: str, module) -> str | None:
        """The part of a joint-attention module, None for any other module."""
        raise NotImplementedError

    def joint_qk(self, module, kept: dict, kwargs: dict, text: int, image: int):
        """``(q, k, text span, image span, mask)`` of a call: queries and keys ``[B, H, L, D]`` as the processor
        built them, from ``kept`` (outputs of the module's projection / norm layers) and the module's kwargs."""
        raise NotImplementedError

    def grid(self, transformer, hidden: torch.Tensor, kwargs: dict) -> PatchGrid:
        """The generated image's patch grid at the first transformer call of a sampling."""
        raise NotImplementedError

    def joint_out(self, module, kept: dict, output, text: tuple[int, int], image: tuple[int, int]) -> torch.Tensor:
        """The call's attention output ``[B, L, C]`` before the output projections (heads concatenated), laid out
        as :meth:`joint_qk`'s spans: from ``kept["out_image"]`` / ``kept["out_text"]`` (inputs of ``to_out[0]`` /
        ``to_add_out``) or the module's own ``output`` where the processor returns it unprojected."""
        raise NotImplementedError


def missing(name: str, module, what: str) -> RuntimeError:
    return RuntimeError(
        f"DAAM cannot observe {name}: its processor {type(module.processor).__name__} computed the {what} without "
        f"calling the module's projection / norm layers, so there is nothing to record")


class SD3(JointFamily):
    """SD3 / SD3.5 (``JointAttnProcessor2_0``): image queries ``to_q`` (then ``norm_q``), text queries
    ``add_q_proj`` (then ``norm_added_q``), joined image first ``[image | text]``. SD3.5 Medium's image-only
    ``attn2`` is not joint."""

    name = "sd3"
    label = "Stable Diffusion 3 / 3.5"
    transformers = ("SD3Transformer2DModel",)
    parts = ("joint",)
    t5_tokenizer = "tokenizer_3"
    clip_segment = True
    default_t5_length = 256

    def part_of(self, name, module):
        from diffusers.models.attention_processor import Attention

        if name.endswith(".attn") and isinstance(module, Attention) and getattr(module, "add_k_proj", None) is not None:
            return "joint"
        return None

    def joint_qk(self, module, kept, kwargs, text, image):
        heads = module.heads

        def side(norm, proj, fused, index):
            if norm in kept:  # norm_q / norm_added_q run on [B, H, N, D]
                return kept[norm]
            if proj in kept:
                x = kept[proj]
            elif fused in kept:  # fuse_qkv_projections(): q, k, v = split(qkv, 3)
                qkv = kept[fused]
                x = qkv[..., index * (qkv.shape[-1] // 3):(index + 1) * (qkv.shape[-1] // 3)]
            else:
                raise missing(kept.get("__name__", "a joint attention"), module, f"{proj} output")
            return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

        q_img, k_img = side("norm_q", "to_q", "to_qkv", 0), side("norm_k", "to_k", "to_qkv", 1)
        q_txt = side("norm_added_q", "add_q_proj", "to_added_qkv", 0)
        k_txt = side("norm_added_k", "add_k_proj", "to_added_qkv", 1)
        q, k, n = torch.cat([q_img, q_txt], dim=2), torch.cat([k_img, k_txt], dim=2), q_img.shape[2]
        return q, k, (n, q.shape[2]), (0, n), None  # JointAttnProcessor2_0 attends without a mask

    def joint_out(self, module, kept, output, text, image):
        name = kept.get("__name__", "a joint attention")
        if "out_image" not in kept:
            raise missing(name, module, "attention output (the input of to_out[0])")
        # the last block (context_pre_only) projects no text: the processor returns its text output as it is
        txt = kept["out_text"] if "out_text" in kept else output[1] if isinstance(output, tuple) else None
        if txt is None:
            raise missing(name, module, "text attention output (the input of to_add_out)")
        return torch.cat([kept["out_image"], txt], dim=1)  # [image | text]

    def grid(self, transformer, hidden, kwargs):
        h, w = hidden.shape[-2:]
        return PatchGrid((int(h), int(w)), transformer.config.patch_size, self.parts)


class Flux(JointFamily):
    """Flux.1 (``FluxAttention`` + ``FluxAttnProcessor``): per-head ``norm_q`` / ``norm_added_q`` outputs
    ``[B, L, H, D]`` joined text first ``[text | image (| reference latents)]``, then RoPE (diffusers' own
    ``apply_rotary_emb`` on the same tensors). Single-stream blocks attend over the already joined sequence."""

    name = "flux"
    label = "Flux.1"
    transformers = ("FluxTransformer2DModel",)
    parts = ("double", "single")
    negative_in_second_call = True
    timestep_scale = 1000.0  # the transformer gets sigma = timestep / 1000

    def part_of(self, name, module):
        if not name.endswith(".attn") or (type(module).__name__ != "FluxAttention" and not hasattr(module, "norm_q")):
            return None
        return "single" if name.startswith("single_transformer_blocks") else "double"

    def joint_qk(self, module, kept, kwargs, text, image):
        from diffusers.models.embeddings import apply_rotary_emb

        name = kept.get("__name__", "a joint attention")
        if "norm_q" not in kept or "norm_k" not in kept:
            raise missing(name, module, "per-head query / key norms (norm_q, norm_k)")
        q, k = kept["norm_q"], kept["norm_k"]  # [B, N, H, D]
        if getattr(module, "added_kv_proj_dim", None) is not None:
            if "norm_added_q" not in kept or "norm_added_k" not in kept:
                raise missing(name, module, "text query / key norms (norm_added_q, norm_added_k)")
            q = torch.cat([kept["norm_added_q"], q], dim=1)
            k = torch.cat([kept["norm_added_k"], k], dim=1)
        rotary = kwargs.get("image_rotary_emb")
        if rotary is not None:
            q = apply_rotary_emb(q, rotary, sequence_dim=1)
            k = apply_rotary_emb(k, rotary, sequence_dim=1)
        return q.transpose(1, 2), k.transpose(1, 2), (0, text), (text, text + image), kwargs.get("attention_mask")

    def joint_out(self, module, kept, output, text, image):
        if getattr(module, "added_kv_proj_dim", None) is None:  # single-stream: returned unprojected
            return output
        name = kept.get("__name__", "a joint attention")
        if "out_image" not in kept or "out_text" not in kept:
            raise missing(name, module, "attention outputs (the inputs of to_out[0] and to_add_out)")
        return torch.cat([kept["out_text"], kept["out_image"]], dim=1)  # [text | image (| references)]

    def grid(self, transformer, hidden, kwargs):
        """From the generated latent's image ids ``[N, 3]`` (id 0, row, col; reference latents of Kontext carry
        another first id): ids count 2x2 latent patches. One host sync per sampling."""
        img_ids = kwargs.get("img_ids")
        if img_ids is None:
            raise ValueError("DAAM needs Flux's img_ids to place the image tokens on a grid")
        ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        gen = ids[ids[:, 0] == ids[0, 0]]
        rows, cols = int(gen[:, 1].max()) + 1, int(gen[:, 2].max()) + 1
        return PatchGrid((2 * rows, 2 * cols), 2, self.parts)


FAMILIES: list[JointFamily] = []


def register(family: JointFamily) -> JointFamily:
    """Add a family to the registry (once per name)."""
    return add_family(FAMILIES, family)


def family_of(transformer) -> JointFamily:
    """The registered family of ``pipe.transformer``; a TypeError naming the supported ones otherwise."""
    name = type(transformer).__name__
    classes = {c.__name__ for c in type(transformer).__mro__}
    for f in FAMILIES:
        if classes & set(f.transformers):
            return f
    known = " and ".join(t for f in FAMILIES for t in f.transformers)
    raise TypeError(f"a pipeline with a {name} is not supported: DAAM traces the joint attention of {known}")


register(SD3())
register(Flux())
