"""ComfyUI nodes (V3 schema, ``comfy_api.v0_0_2``): a thin layer that turns host types into ``daam_core`` calls
and back.

MASK outputs are plain ``[batch, H, W]`` float masks in [0, 1]; IMAGE outputs are ``[batch, H, W, 3]``.
Outputs that cover several words are ordered image-major: (image 0, word 0), (image 0, word 1), ...; DAAM
Heatmaps' ``output_order`` can make them word-major (every image or video frame of word 0, then of word 1, ...).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass

import torch
from comfy_api.v0_0_2 import io

from ..daam_core.engine import masks as mask_ops
from ..daam_core.engine import render
from ..daam_core.engine.aggregate import COMBINE_MODES, NORMALIZE_MODES
from ..daam_core.engine.io import TraceFormatError
from ..daam_core.engine.recorder import RecordFilter
from ..daam_core.engine.trace import AttentionTrace, load_trace, save_trace
from ..daam_core.engine.refine import DEFAULT_MAX_QUERIES
from ..daam_core.hosts.comfy.maps import (MAP_SOURCES, PROPAGATE_AT, build_trace, heatmap_trace, record_filter,
                                          refine_recording, refined_word_maps)
from ..daam_core.hosts.comfy.graph import attention_replacers_after
from ..daam_core.hosts.comfy.session import session_of
from ..daam_core.text.layout import SEGMENT_CHOICES
from ..daam_core.text.query import WordNotFoundError, split_words
from .preview import build_payload
from .relations import DAAMWordRelations
from .tracing import patch_model

__all__ = ["NODES", "build_trace", "session_of"]

CATEGORY = "DAAM"
PROPAGATE_MAX, HEAD_POWER_MAX = 16, 8.0
PROPAGATE_TIP = ("Sharpen the maps by spreading them k times through the image's own self-attention (a pixel "
                 "takes the mean map of the pixels it attends to); 0 = plain DAAM.")
HEAD_POWER_TIP = ("Weight each head by how concentrated its map is, to the power g; 0 = every head alike (plain "
                  "DAAM).")
MAP_SOURCE_TIP = ("attention: DAAM's attention from image to text. output similarity (joint-attention models): "
                  "how alike each image token's attention output is to the word's tokens' (ConceptAttention-style).")
PROPAGATE_AT_TIP = ("Where propagate_steps spreads the maps: each resolution = every layer size with its own "
                    "self-attention; finest resolution = all layers summed at the finest size whose self-attention "
                    "was recorded and spread there; both = the first, then the second.")
EXCLUSIVE_TIP = ("The words compete for pixels: each keeps only the pixels where it attends more than the other "
                 "words, each judged against its own average (masks of 'dog, cat' never overlap).")
AS_MAPS = "as maps"
Maps = io.Custom("DAAM_MAPS")  # DaamMaps between DAAM nodes
BRANCH = {"positive": "cond", "negative": "uncond"}
TRACE_FOLDER = "daam"
log = logging.getLogger(__name__)


@dataclass
class DaamMaps:
    """What flows between DAAM nodes: the trace of one sampling, the decoded images (if given) and the map
    settings they were made with, so that every node downstream reads the maps the same way."""

    trace: AttentionTrace
    images: torch.Tensor | None = None  # [B, H, W, 3]
    normalize: str = "minmax"
    combine: str = "mean"
    segments: str = "both"
    propagate_steps: int = 0  # refinements the maps were made with (0: plain DAAM)
    head_power: float = 0.0
    map_source: str = "attention"
    propagate_at: str = "each resolution"


def maps_for(trace: AttentionTrace, words: list[str], branch: str, **kwargs) -> torch.Tensor:
    """``[B, W, H, W]`` maps with errors that name the word and list the prompt's words; ``propagate_steps`` and
    ``head_power`` refine them (errors name the DAAM Trace Model input they need)."""
    if not words:
        raise ValueError("no words given: type words or phrases of the prompt, separated by commas")
    try:
        return refined_word_maps(trace, words, branch=branch, **kwargs)
    except WordNotFoundError as e:
        raise ValueError(f"DAAM: {e}") from None


def flat(x: torch.Tensor, order: str = "image-major") -> torch.Tensor:
    """[B, W, ...] -> [B * W, ...], image-major, or word-major (``[W, B, ...]`` flattened)."""
    if order == "word-major":
        x = x.transpose(0, 1)
    elif order != "image-major":
        raise ValueError(f"unknown output_order {order!r}; use one of {list(OUTPUT_ORDERS)}")
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


OUTPUT_ORDERS = ("image-major", "word-major")


class DAAMTraceModel(io.ComfyNode):
    """Returns a clone of MODEL that records cross-attention during any sampler's run."""

    # Layer sizes relative to the latent (the VAE's own factor is the model's: 8 for SD, 1 for the shapes model).
    RESOLUTIONS = {"all": None, "low (latent/4, latent/8)": (4, 8), "middle (latent/2, latent/4)": (2, 4),
                   "high (latent, latent/2)": (1, 2)}
    LEGACY_RESOLUTIONS = {"low (1/32, 1/64)": "low (latent/4, latent/8)",  # labels of 0.1 workflows
                          "middle (1/16, 1/32)": "middle (latent/2, latent/4)", "high (1/8, 1/16)": "high (latent, latent/2)"}
    PARTS = {"all": None, "down": ("down",), "mid": ("mid",), "up": ("up",), "down+up": ("down", "up"),
             "double (Flux)": ("double",), "single (Flux)": ("single",)}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DAAMTraceModel", display_name="DAAM Trace Model", category=CATEGORY,
            description="Trace a model so that any sampler records where each prompt word acts (DAAM).",
            inputs=[
                io.Model.Input("model", tooltip="The model to trace. It is cloned; the original is never modified."),
                io.Combo.Input("resolutions", options=list(cls.RESOLUTIONS), default="all",
                               tooltip="Which cross-attention layers to record, by their size relative to the latent "
                               "(SD1.5 at 512: latent 64x64, latent/4 = 16x16 maps)."),
                io.Combo.Input("unet_parts", options=list(cls.PARTS), default="all",
                               tooltip="Which parts of the network to record: UNet down/mid/up blocks, or the double- "
                               "or single-stream blocks of Flux, Flux.2, Chroma, HiDream and HunyuanVideo / "
                               "HunyuanImage (other transformers have one kind: all)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Start of the recorded part of the sampling (0 = first step), read as "
                               "ComfyUI's own timestep-range percents."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="End of the recorded part of the sampling (1 = last step), read as ComfyUI's "
                               "own timestep-range percents."),
                io.String.Input("heads", default="", tooltip="Attention heads to sum, e.g. '0,1,2'; empty = all."),
                io.Boolean.Input("record_negative", default=True, tooltip="Also record the negative prompt's maps."),
                io.Int.Input("time_buckets", default=1, min=1, max=32, optional=True,
                             tooltip="1 = one sum over the sampling. K > 1 also keeps one sum per K-th of the "
                             "sampling's steps (K times the memory), so the DAAM Heatmaps preview can scrub through "
                             "time."),
                io.String.Input("blocks", default="", optional=True,
                                tooltip="Transformers only: block ranges to record by the model's part names, e.g. "
                                "'double:0-9, single:20-37' (Flux, Chroma, HiDream, Hunyuan), 'joint:4-12' (SD3), "
                                "'block:10-20' (Wan, LTXV), 'layer:0-15' (Lumina 2, Z-Image), 'double:0-59' "
                                "(Qwen-Image); inclusive; a part not named is kept whole. Empty = every block."),
                io.Boolean.Input("record_self_attention", default=False, optional=True,
                                 tooltip="UNet models: also keep the image self-attention (summed over heads and "
                                 "steps) at the small resolutions, so DAAM Heatmaps / DAAM Mask can sharpen maps "
                                 "with propagate_steps. Costs 4 bytes x (h*w)^2 per resolution and branch."),
                io.Int.Input("self_attention_max", default=DEFAULT_MAX_QUERIES, min=16, max=16384, optional=True,
                             tooltip="The largest resolution (latent cells h*w) whose self-attention is kept: 1024 = "
                             "32x32 (4 MiB per branch)."),
                io.Boolean.Input("record_head_sums", default=False, optional=True,
                                 tooltip="UNet models: also keep each head's sums, so the heat-map nodes can weight "
                                 "heads by how localised their maps are (head_power). Costs heads x the plain sums."),
                io.Boolean.Input("record_output_similarity", default=False, optional=True,
                                 tooltip="Joint-attention models (SD3, Flux, Chroma, Qwen-Image, ...): also keep how "
                                 "similar each image token's attention output is to each prompt token's "
                                 "(ConceptAttention-style), for map_source 'output similarity'. Costs as much as "
                                 "the plain sums; the image is unchanged."),
            ],
            outputs=[io.Model.Output("traced", display_name="model",
                                     tooltip="A traced clone: give it to any sampler and to the DAAM Heatmaps node.")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],  # to see what follows this node in the graph
        )

    @classmethod
    def execute(cls, model, resolutions="all", unet_parts="all", start_percent=0.0, end_percent=1.0, heads="",
                record_negative=True, time_buckets=1, blocks="", record_self_attention=False,
                self_attention_max=DEFAULT_MAX_QUERIES, record_head_sums=False, record_output_similarity=False):
        try:
            head_list = tuple(int(h) for h in split_words(heads)) or None
        except ValueError:
            raise ValueError(f"heads must be comma-separated integers, got {heads!r}") from None
        resolutions = cls.LEGACY_RESOLUTIONS.get(resolutions, resolutions)
        if resolutions not in cls.RESOLUTIONS:
            raise ValueError(f"unknown resolutions {resolutions!r}; use one of {list(cls.RESOLUTIONS)}")
        if unet_parts not in cls.PARTS:
            raise ValueError(f"unknown unet_parts {unet_parts!r}; use one of {list(cls.PARTS)}")
        f = record_filter(model, factors=cls.RESOLUTIONS[resolutions], parts=cls.PARTS[unet_parts],
                          parts_choices=cls.PARTS, parts_label=unet_parts, resolutions_label=resolutions,
                          heads=head_list, start=start_percent, end=end_percent, negative=record_negative,
                          time_buckets=time_buckets, blocks=blocks)
        refine = refine_recording(record_self_attention, record_head_sums, self_attention_max,
                                  record_output_similarity)
        patched, _ = patch_model(model, f, refine)
        hidden = cls.hidden  # None when called outside a prompt
        warnings = attention_replacers_after(hidden.prompt, hidden.unique_id) if hidden is not None else []
        for w in warnings:
            log.warning("DAAM Trace Model: %s", w)
        return io.NodeOutput(patched, ui={"text": warnings} if warnings else None)


def host_nodes():
    """ComfyUI's own ``nodes`` module (loaded by the host before any custom node)."""
    import importlib

    module = sys.modules.get("nodes")
    if module is None or not hasattr(module, "common_ksampler"):
        module = importlib.import_module("nodes")
    return module


class DAAMKSampler(io.ComfyNode):
    """KSampler with DAAM tracing in one node: the stock sampler on a traced clone of MODEL."""

    @classmethod
    def define_schema(cls):
        import comfy.samplers

        return io.Schema(
            node_id="DAAMKSampler", display_name="KSampler (DAAM)", category=CATEGORY,
            description="Sample exactly like KSampler while recording where each prompt word acts (DAAM).",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with; it is cloned and traced, never modified."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The random seed of the noise."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Denoising steps."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               tooltip="The sampling algorithm."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="The noise schedule."),
                io.Conditioning.Input("positive", tooltip="The positive prompt's conditioning."),
                io.Conditioning.Input("negative", tooltip="The negative prompt's conditioning."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of the latent is replaced by noise (1 = all)."),
            ],
            outputs=[io.Latent.Output("LATENT", display_name="LATENT",
                                      tooltip="The denoised latent (the same as KSampler's)."),
                     io.Model.Output("traced_model", display_name="traced_model",
                                     tooltip="The traced clone that recorded this run: give it to DAAM Heatmaps.")],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise=1.0):
        traced, _ = patch_model(model, RecordFilter())
        (latent,) = host_nodes().common_ksampler(traced, seed, steps, cfg, sampler_name, scheduler, positive,
                                                 negative, latent_image, denoise=denoise)
        return io.NodeOutput(latent, traced)


class DAAMHeatmaps(io.ComfyNode):
    """Heat maps, overlays and masks of words after sampling."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DAAMHeatmaps", display_name="DAAM Heatmaps", category=CATEGORY,
            description="Per-word heat maps (DAAM) of the last sampling of a traced model.",
            is_output_node=True,  # its preview shows on every run, also when its result comes from the cache
            inputs=[
                io.Model.Input("model", tooltip="The traced MODEL from 'DAAM Trace Model' (the one the sampler used)."),
                io.Clip.Input("clip",
                              tooltip="The CLIP that encoded the prompts (its tokenizer maps words to tokens)."),
                io.Latent.Input("samples", tooltip="The sampler's LATENT output: it picks the sampling and makes this "
                                "node run after it."),
                io.String.Input("positive", multiline=True, default="",
                                tooltip="The positive prompt text, exactly as encoded."),
                io.String.Input("negative", multiline=True, default="",
                                tooltip="The negative prompt text, exactly as encoded."),
                io.String.Input("words", default="", tooltip="Words or phrases of the positive prompt, comma "
                                "separated; 'dog#2' is the second 'dog'."),
                io.String.Input("negative_words", default="", tooltip="Words of the negative prompt to map too."),
                io.Float.Input("threshold", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="Mask threshold as a fraction of each map's maximum (paper: 0.4)."),
                io.Combo.Input("normalize", options=list(NORMALIZE_MODES), default="minmax",
                               tooltip="Per-map min-max or max, or 'shared' across the words of an image so their "
                               "strengths compare."),
                io.Combo.Input("combine", options=list(COMBINE_MODES), default="mean",
                               tooltip="How the tokens of a word or phrase are combined."),
                io.Combo.Input("colormap", options=list(render.COLORMAPS), default="jet",
                               tooltip="Colour map of the heat maps."),
                io.Float.Input("alpha", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Opacity of the heat map in overlays."),
                io.Image.Input("images", optional=True,
                               tooltip="The decoded images (or video frames), for overlays and the output size."),
                io.Combo.Input("segments", options=list(SEGMENT_CHOICES), default="both", optional=True,
                               tooltip="SD3 and HiDream, where a word has positions in several text encoders' "
                               "parts of the conditioning: use both (default: all), or only clip or t5 (SD3), t5 or "
                               "llama (HiDream). Other models have one part (both = it)."),
                io.Int.Input("propagate_steps", default=0, min=0, max=PROPAGATE_MAX, optional=True,
                             tooltip=PROPAGATE_TIP + " Needs record_self_attention in DAAM Trace Model."),
                io.Float.Input("head_power", default=0.0, min=0.0, max=HEAD_POWER_MAX, step=0.5, optional=True,
                               tooltip=HEAD_POWER_TIP + " Needs record_head_sums in DAAM Trace Model."),
                io.Combo.Input("map_source", options=list(MAP_SOURCES), default="attention", optional=True,
                               tooltip=MAP_SOURCE_TIP + " Needs record_output_similarity in DAAM Trace Model."),
                io.Combo.Input("output_order", options=list(OUTPUT_ORDERS), default="image-major", optional=True,
                               tooltip="Order of the heatmaps / overlays / masks batches when several words are "
                               "mapped: image-major = each image's words together; word-major = every image (every "
                               "video frame, in order) of the first word, then of the next: one video per word."),
                io.Combo.Input("propagate_at", options=list(PROPAGATE_AT), default="each resolution", optional=True,
                               tooltip=PROPAGATE_AT_TIP),
                io.Boolean.Input("exclusive", default=False, optional=True, tooltip=EXCLUSIVE_TIP + " Per prompt."),
            ],
            outputs=[
                io.Image.Output("heatmaps", display_name="heatmaps",
                                tooltip="Colour heat maps, one per image and word (image-major)."),
                io.Image.Output("overlays", display_name="overlays",
                                tooltip="Heat maps over the decoded images (the heat maps alone without images)."),
                io.Mask.Output("masks", display_name="masks",
                               tooltip="Thresholded masks at image size, one per image and word."),
                Maps.Output("maps", display_name="maps", tooltip="Raw maps for the other DAAM nodes."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, samples, positive, negative, words, negative_words="", threshold=0.4,
                normalize="minmax", combine="mean", colormap="jet", alpha=0.5, images=None, segments="both",
                propagate_steps=0, head_power=0.0, map_source="attention", output_order="image-major",
                propagate_at="each resolution", exclusive=False):
        if clip is None:
            raise ValueError("a CLIP is needed to read the prompt's tokens")
        pos_words, neg_words = split_words(words), split_words(negative_words)
        if not pos_words and not neg_words:
            raise ValueError("no words given: type words or phrases of the prompt, separated by commas")
        trace = heatmap_trace(model, clip, samples, positive, negative, neg_words, images)
        how = dict(normalize=normalize, combine=combine, segments=segments, propagate_steps=propagate_steps,
                   head_power=head_power, map_source=map_source, propagate_at=propagate_at)
        parts = []
        if pos_words:
            parts.append(maps_for(trace, pos_words, "cond", exclusive=exclusive, **how))
        if neg_words:
            parts.append(maps_for(trace, neg_words, "uncond", exclusive=exclusive, **how))
        maps = torch.cat(parts, dim=1)  # [B, W, H, W]
        masks = mask_ops.threshold(maps, threshold, "relative")
        heat = torch.stack([torch.from_numpy(render.colorize(m.detach(), colormap))
                            for m in flat(maps, output_order)])
        if images is not None:
            index = flat(torch.arange(maps.shape[0])[:, None].expand(maps.shape[:2]), output_order)  # image of each
            over = torch.stack([torch.from_numpy(render.overlay(images[int(b)].detach().cpu().numpy(), m, alpha,
                                                                colormap))
                                for b, m in zip(index, flat(maps, output_order))])
        else:
            over = heat
        ui = {"daam_preview": [build_payload(trace, pos_words, neg_words, threshold=threshold, normalize=normalize,
                                             combine=combine, alpha=alpha, segments=segments,
                                             images=preview(images, "daam_preview") if images is not None else None,
                                             propagate_steps=propagate_steps, head_power=head_power,
                                             map_source=map_source, propagate_at=propagate_at,
                                             exclusive=exclusive)]}
        return io.NodeOutput(heat, over, flat(masks, output_order), DaamMaps(trace, images, **how), ui=ui)


def preview(images: torch.Tensor, prefix: str) -> list[dict]:
    """Save ``[B, H, W, 3]`` images to the host's temp folder and describe them for the UI preview."""
    import folder_paths

    folder = folder_paths.get_temp_directory()
    full, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, folder, images.shape[2],
                                                                         images.shape[1])
    out = []
    for i, im in enumerate(images):
        file = f"{name}_{counter + i:05}_.png"
        render.save_png(os.path.join(full, file), im.detach().cpu().numpy())
        out.append({"filename": file, "subfolder": subfolder, "type": "temp"})
    return out


class DAAMMask(io.ComfyNode):
    """One MASK from the maps of one or more words: threshold, clean-up and set operations."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DAAMMask", display_name="DAAM Mask", category=CATEGORY,
            description="Mask of words taken from the generation itself (e.g. 'dog') for inpainting and compositing.",
            inputs=[
                Maps.Input("maps", tooltip="Maps from 'DAAM Heatmaps' or 'DAAM Load Trace'."),
                io.String.Input("words", default="", tooltip="Words or phrases, comma separated; their masks are "
                                "combined with the operation below."),
                io.Combo.Input("prompt", options=["positive", "negative"], default="positive",
                               tooltip="Which prompt the words are in."),
                io.Combo.Input("operation", options=list(mask_ops.SET_OPERATIONS), default="union",
                               tooltip="union: any word; intersection: all words; difference: the first word minus "
                               "the others."),
                io.Combo.Input("threshold_mode", options=list(mask_ops.THRESHOLD_MODES), default="relative",
                               tooltip="relative: fraction of each map's max; absolute: level of the normalised map; "
                               "otsu: automatic."),
                io.Float.Input("threshold", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="Threshold value (ignored by otsu)."),
                io.Int.Input("open_px", default=0, min=0, max=64, tooltip="Remove specks up to this radius."),
                io.Int.Input("close_px", default=0, min=0, max=64, tooltip="Fill holes up to this radius."),
                io.Int.Input("grow_px", default=0, min=-256, max=256,
                             tooltip="Grow (positive) or shrink (negative) the mask, in pixels."),
                io.Int.Input("feather_px", default=0, min=0, max=256, tooltip="Soften the edge, in pixels."),
                io.Int.Input("propagate_steps", default=-1, min=-1, max=PROPAGATE_MAX, optional=True,
                             tooltip="-1 = as the maps were made (DAAM Heatmaps). " + PROPAGATE_TIP),
                io.Float.Input("head_power", default=-1.0, min=-1.0, max=HEAD_POWER_MAX, step=0.5, optional=True,
                               tooltip="-1 = as the maps were made (DAAM Heatmaps). " + HEAD_POWER_TIP),
                io.Combo.Input("map_source", options=[AS_MAPS, *MAP_SOURCES], default=AS_MAPS, optional=True,
                               tooltip="'as maps' = as the maps were made (DAAM Heatmaps). " + MAP_SOURCE_TIP),
                io.Combo.Input("propagate_at", options=[AS_MAPS, *PROPAGATE_AT], default=AS_MAPS, optional=True,
                               tooltip="'as maps' = as the maps were made (DAAM Heatmaps). " + PROPAGATE_AT_TIP),
                io.String.Input("compete_with", default="", optional=True,
                                tooltip="Other words of the same prompt that compete with the mask's words for "
                                "pixels, comma separated (e.g. 'cat, person' for the mask of 'dog'): a pixel is left "
                                "out where one of them attends more, each judged against its own average. Empty = "
                                "no competition."),
            ],
            outputs=[io.Mask.Output("mask", display_name="mask",
                                    tooltip="One [batch, H, W] mask per image, for inpainting and compositing nodes.")],
        )

    @classmethod
    def execute(cls, maps, words, prompt="positive", operation="union", threshold_mode="relative", threshold=0.4,
                open_px=0, close_px=0, grow_px=0, feather_px=0, propagate_steps=-1, head_power=-1.0,
                map_source=AS_MAPS, propagate_at=AS_MAPS, compete_with=""):
        word_list = split_words(words)
        m = maps_for(maps.trace, word_list, BRANCH[prompt], normalize=maps.normalize, combine=maps.combine,
                     segments=maps.segments,
                     propagate_steps=maps.propagate_steps if propagate_steps < 0 else propagate_steps,
                     head_power=maps.head_power if head_power < 0 else head_power,
                     map_source=maps.map_source if map_source == AS_MAPS else map_source,
                     propagate_at=maps.propagate_at if propagate_at == AS_MAPS else propagate_at,
                     rivals=split_words(compete_with))
        binary = mask_ops.threshold(m, threshold, threshold_mode)
        combined = mask_ops.combine([binary[:, j] for j in range(binary.shape[1])], operation)
        return io.NodeOutput(mask_ops.refine(combined, open_px=open_px, close_px=close_px, grow_px=grow_px,
                                             feather_px=feather_px).clamp_(0, 1))


def _output_dir() -> str:
    import folder_paths

    return folder_paths.get_output_directory()


def safe_prefix(prefix: str) -> str:
    """A file-name prefix without path traversal: only the last component, restricted characters."""
    name = os.path.basename(prefix.replace("\\", "/")) or "daam"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "daam"


class DAAMSaveTrace(io.ComfyNode):
    """Save the raw maps (safetensors + JSON) into ComfyUI's output folder."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DAAMSaveTrace", display_name="DAAM Save Trace", category=CATEGORY,
            description="Save a DAAM trace to output/daam/ as safetensors with a JSON sidecar.",
            is_output_node=True,
            inputs=[Maps.Input("maps", tooltip="Maps to save."),
                    io.String.Input("filename_prefix", default="daam",
                                    tooltip="File name prefix, written to output/daam/.")],
            outputs=[],
        )

    @classmethod
    def execute(cls, maps, filename_prefix="daam"):
        folder = os.path.join(_output_dir(), TRACE_FOLDER)
        os.makedirs(folder, exist_ok=True)
        prefix = safe_prefix(filename_prefix)
        n = 1
        while os.path.exists(os.path.join(folder, f"{prefix}_{n:05}.safetensors")):
            n += 1
        path = save_trace(maps.trace, os.path.join(folder, f"{prefix}_{n:05}.safetensors"))
        return io.NodeOutput(ui={"text": [os.path.join(TRACE_FOLDER, path.name)]})


class DAAMLoadTrace(io.ComfyNode):
    """Load a trace saved by 'DAAM Save Trace' (safetensors only)."""

    @classmethod
    def define_schema(cls):
        folder = os.path.join(_output_dir(), TRACE_FOLDER)
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
        return io.Schema(
            node_id="DAAMLoadTrace", display_name="DAAM Load Trace", category=CATEGORY,
            description="Load a DAAM trace from output/daam/.",
            inputs=[io.Combo.Input("trace", options=files or [""], tooltip="A trace in output/daam/."),
                    io.Image.Input("images", optional=True, tooltip="The images the trace belongs to, for overlays.")],
            outputs=[Maps.Output("maps", display_name="maps")],
        )

    @classmethod
    def validate_inputs(cls, trace):
        return True if trace and os.path.basename(trace) == trace else f"invalid trace file name {trace!r}"

    @classmethod
    def execute(cls, trace, images=None):
        folder = os.path.realpath(os.path.join(_output_dir(), TRACE_FOLDER))
        path = os.path.realpath(os.path.join(folder, trace))
        if os.path.dirname(path) != folder:
            raise ValueError(f"invalid trace file name {trace!r}")
        try:
            loaded = load_trace(path)
        except (TraceFormatError, FileNotFoundError) as e:
            raise ValueError(f"DAAM: {e}") from None
        if images is not None:
            loaded.image_hw = (int(images.shape[1]), int(images.shape[2]))
        return io.NodeOutput(DaamMaps(loaded, images))


class DAAMShapesLoader(io.ComfyNode):
    """The embedded shapes model as MODEL, CLIP and VAE: a checkpoint-free model with meaningful maps."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DAAMShapesLoader", display_name="DAAM Shapes Model Loader", category=CATEGORY,
            description="Load the small 'shapes' model trained by this project (no checkpoint needed).",
            inputs=[io.String.Input("folder", default="", optional=True,
                                    tooltip="A shapes pipeline folder (diffusers layout); empty = the model shipped "
                                    "with the pack. It draws 32x32 scenes of coloured circles, squares and triangles, "
                                    "e.g. 'a red circle on the left and a blue square on the right'.")],
            outputs=[io.Model.Output("MODEL", display_name="MODEL", tooltip="The shapes UNet (pixel space: use 32x32 "
                                     "latents, e.g. Empty Latent Image at 256x256)."),
                     io.Clip.Output("CLIP", display_name="CLIP", tooltip="Its text encoder."),
                     io.Vae.Output("VAE", display_name="VAE", tooltip="Its VAE (the identity at scale 1).")],
        )

    @classmethod
    def execute(cls, folder=""):
        from pathlib import Path

        from ..daam_core.shapes import model as shapes_model
        from . import shapes_loader

        path = Path(folder) if folder.strip() else shapes_model.ASSET_DIR
        if not shapes_model.available(path):
            raise ValueError(f"DAAM: no shapes model in {path} (a diffusers folder with model_index.json and unet/)")
        return io.NodeOutput(shapes_loader.load_model(path), shapes_loader.load_clip(path),
                             shapes_loader.load_vae(path))


NODES = [DAAMTraceModel, DAAMKSampler, DAAMHeatmaps, DAAMMask, DAAMSaveTrace, DAAMLoadTrace, DAAMShapesLoader,
         DAAMWordRelations]
