"""ComfyUI nodes: a thin layer that turns host types into ``daam_core`` calls and back.

MASK outputs are plain ``[batch, H, W]`` float masks in [0, 1]; IMAGE outputs are ``[batch, H, W, 3]``.
Outputs that cover several words are ordered image-major: (image 0, word 0), (image 0, word 1), ...
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

import torch

from ..daam_core.engine import masks as mask_ops
from ..daam_core.engine import render
from ..daam_core.engine.aggregate import COMBINE_MODES, NORMALIZE_MODES
from ..daam_core.engine.io import TraceFormatError
from ..daam_core.engine.recorder import RecordFilter
from ..daam_core.engine.trace import AttentionTrace, load_trace, save_trace
from ..daam_core.hosts.comfy.maps import build_trace, heatmap_trace, record_filter
from ..daam_core.hosts.comfy.session import session_of
from ..daam_core.text.layout import SEGMENT_CHOICES
from ..daam_core.text.query import WordNotFoundError, split_words
from .preview import build_payload
from .relations import DAAMWordRelations
from .tracing import patch_model

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "build_trace", "session_of"]

CATEGORY = "DAAM"
MAPS_TYPE = "DAAM_MAPS"
BRANCH = {"positive": "cond", "negative": "uncond"}
TRACE_FOLDER = "daam"


@dataclass
class DaamMaps:
    """What flows between DAAM nodes: the trace of one sampling, the decoded images (if given) and the map
    settings they were made with, so that every node downstream reads the maps the same way."""

    trace: AttentionTrace
    images: torch.Tensor | None = None  # [B, H, W, 3]
    normalize: str = "minmax"
    combine: str = "mean"
    segments: str = "both"

def maps_for(trace: AttentionTrace, words: list[str], branch: str, **kwargs) -> torch.Tensor:
    """``[B, W, H, W]`` maps with errors that name the word and list the prompt's words."""
    if not words:
        raise ValueError("no words given: type words or phrases of the prompt, separated by commas")
    try:
        return trace.word_maps(words, branch=branch, **kwargs)
    except WordNotFoundError as e:
        raise ValueError(f"DAAM: {e}") from None


def flat(x: torch.Tensor) -> torch.Tensor:
    """[B, W, ...] -> [B * W, ...] (image-major)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


class DAAMTraceModel:
    """Returns a clone of MODEL that records cross-attention during any sampler's run."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to trace. It is cloned; the original is never modified."}),
                "resolutions": (list(cls.RESOLUTIONS),
                                {"default": "all", "tooltip": "Which cross-attention layers to record, by their size "
                                 "relative to the latent (SD1.5 at 512: latent 64x64, latent/4 = 16x16 maps)."}),
                "unet_parts": (list(cls.PARTS),
                               {"default": "all", "tooltip": "Which parts of the network to record: UNet down/mid/"
                                "up blocks, or Flux's double- or single-stream blocks (SD3 has one kind: all)."}),
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                            "tooltip": "Start of the recorded part of the sampling (0 = first step), "
                                            "read as ComfyUI's own timestep-range percents."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "End of the recorded part of the sampling (1 = last step), "
                                          "read as ComfyUI's own timestep-range percents."}),
                "heads": ("STRING", {"default": "", "tooltip": "Attention heads to sum, e.g. '0,1,2'; empty = all."}),
                "record_negative": ("BOOLEAN", {"default": True,
                                                "tooltip": "Also record the negative prompt's maps."}),
            },
            "optional": {
                "time_buckets": ("INT", {"default": 1, "min": 1, "max": 32, "tooltip": "1 = one sum over the "
                                         "sampling. K > 1 also keeps one sum per K-th of the sampling's steps (K times "
                                         "the memory), so the DAAM Heatmaps preview can scrub through time."}),
                "blocks": ("STRING", {"default": "", "tooltip": "SD3/Flux only: block ranges to record, e.g. "
                                      "'double:0-9, single:20-37' (Flux) or 'joint:4-12' (SD3), inclusive; a part "
                                      "not named is kept whole. Empty = every block."}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A traced clone: give it to any sampler and to the DAAM Heatmaps node.",)
    FUNCTION = "trace"
    CATEGORY = CATEGORY
    DESCRIPTION = "Trace a model so that any sampler records where each prompt word acts (DAAM)."

    # Layer sizes relative to the latent (the VAE's own factor is the model's: 8 for SD, 1 for the shapes model).
    RESOLUTIONS = {"all": None, "low (latent/4, latent/8)": (4, 8), "middle (latent/2, latent/4)": (2, 4),
                   "high (latent, latent/2)": (1, 2)}
    LEGACY_RESOLUTIONS = {"low (1/32, 1/64)": "low (latent/4, latent/8)",  # labels of 0.1 workflows
                          "middle (1/16, 1/32)": "middle (latent/2, latent/4)", "high (1/8, 1/16)": "high (latent, latent/2)"}
    PARTS = {"all": None, "down": ("down",), "mid": ("mid",), "up": ("up",), "down+up": ("down", "up"),
             "double (Flux)": ("double",), "single (Flux)": ("single",)}

    def trace(self, model, resolutions="all", unet_parts="all", start_percent=0.0, end_percent=1.0, heads="",
              record_negative=True, time_buckets=1, blocks=""):
        try:
            head_list = tuple(int(h) for h in split_words(heads)) or None
        except ValueError:
            raise ValueError(f"heads must be comma-separated integers, got {heads!r}") from None
        resolutions = self.LEGACY_RESOLUTIONS.get(resolutions, resolutions)
        if resolutions not in self.RESOLUTIONS:
            raise ValueError(f"unknown resolutions {resolutions!r}; use one of {list(self.RESOLUTIONS)}")
        if unet_parts not in self.PARTS:
            raise ValueError(f"unknown unet_parts {unet_parts!r}; use one of {list(self.PARTS)}")
        f = record_filter(model, factors=self.RESOLUTIONS[resolutions], parts=self.PARTS[unet_parts],
                          parts_choices=self.PARTS, parts_label=unet_parts, resolutions_label=resolutions,
                          heads=head_list, start=start_percent, end=end_percent, negative=record_negative,
                          time_buckets=time_buckets, blocks=blocks)
        patched, _ = patch_model(model, f)
        return (patched,)


def host_nodes():
    """ComfyUI's own ``nodes`` module (loaded by the host before any custom node)."""
    import importlib

    module = sys.modules.get("nodes")
    if module is None or not hasattr(module, "common_ksampler"):
        module = importlib.import_module("nodes")
    return module


class DAAMKSampler:
    """KSampler with DAAM tracing in one node: the stock sampler on a traced clone of MODEL."""

    @classmethod
    def INPUT_TYPES(cls):
        import comfy.samplers

        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to sample with; it is cloned and traced, never modified."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                                 "tooltip": "The random seed of the noise."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Denoising steps."}),
                "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale."}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"tooltip": "The sampling algorithm."}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"tooltip": "The noise schedule."}),
                "positive": ("CONDITIONING", {"tooltip": "The positive prompt's conditioning."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt's conditioning."}),
                "latent_image": ("LATENT", {"tooltip": "The latent to denoise."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "How much of the latent is replaced by noise (1 = all)."}),
            }
        }

    RETURN_TYPES = ("LATENT", "MODEL")
    RETURN_NAMES = ("LATENT", "traced_model")
    OUTPUT_TOOLTIPS = ("The denoised latent (the same as KSampler's).",
                       "The traced clone that recorded this run: give it to DAAM Heatmaps.")
    FUNCTION = "sample"
    CATEGORY = CATEGORY
    DESCRIPTION = "Sample exactly like KSampler while recording where each prompt word acts (DAAM)."

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0):
        traced, _ = patch_model(model, RecordFilter())
        (latent,) = host_nodes().common_ksampler(traced, seed, steps, cfg, sampler_name, scheduler, positive,
                                                 negative, latent_image, denoise=denoise)
        return (latent, traced)


class DAAMHeatmaps:
    """Heat maps, overlays and masks of words after sampling."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The traced MODEL from 'DAAM Trace Model' (the one the sampler used)."}),
                "clip": ("CLIP", {"tooltip": "The CLIP that encoded the prompts (its tokenizer maps words to tokens)."}),
                "samples": ("LATENT", {"tooltip": "The sampler's LATENT output: it picks the sampling and makes this "
                                       "node run after it."}),
                "positive": ("STRING", {"multiline": True, "default": "",
                                        "tooltip": "The positive prompt text, exactly as encoded."}),
                "negative": ("STRING", {"multiline": True, "default": "",
                                        "tooltip": "The negative prompt text, exactly as encoded."}),
                "words": ("STRING", {"default": "", "tooltip": "Words or phrases of the positive prompt, comma "
                                     "separated; 'dog#2' is the second 'dog'."}),
                "negative_words": ("STRING", {"default": "", "tooltip": "Words of the negative prompt to map too."}),
                "threshold": ("FLOAT", {"default": 0.4, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Mask threshold as a fraction of each map's maximum (paper: 0.4)."}),
                "normalize": (list(NORMALIZE_MODES), {"default": "minmax", "tooltip": "Per-map min-max or max, or "
                              "'shared' across the words of an image so their strengths compare."}),
                "combine": (list(COMBINE_MODES), {"default": "mean",
                                                  "tooltip": "How the tokens of a word or phrase are combined."}),
                "colormap": (list(render.COLORMAPS), {"default": "jet", "tooltip": "Colour map of the heat maps."}),
                "alpha": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                    "tooltip": "Opacity of the heat map in overlays."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "The decoded images, for overlays and the output size."}),
                "segments": (list(SEGMENT_CHOICES), {"default": "both", "tooltip": "SD3 only, where a word has "
                             "positions in the CLIP and the T5 part of the conditioning: use both (default), "
                             "or only clip or t5. Other models have one part (both = it)."}),
            },
        }

    RETURN_TYPES = ("IMAGE", "IMAGE", "MASK", MAPS_TYPE)
    RETURN_NAMES = ("heatmaps", "overlays", "masks", "maps")
    OUTPUT_TOOLTIPS = ("Colour heat maps, one per image and word (image-major).",
                       "Heat maps over the decoded images (the heat maps alone without images).",
                       "Thresholded masks at image size, one per image and word.",
                       "Raw maps for the other DAAM nodes.")
    FUNCTION = "heatmaps"
    OUTPUT_NODE = True  # its preview shows on every run, also when its result comes from the cache
    CATEGORY = CATEGORY
    DESCRIPTION = "Per-word heat maps (DAAM) of the last sampling of a traced model."

    def heatmaps(self, model, clip, samples, positive, negative, words, negative_words="", threshold=0.4,
                 normalize="minmax", combine="mean", colormap="jet", alpha=0.5, images=None, segments="both"):
        if clip is None:
            raise ValueError("a CLIP is needed to read the prompt's tokens")
        pos_words, neg_words = split_words(words), split_words(negative_words)
        if not pos_words and not neg_words:
            raise ValueError("no words given: type words or phrases of the prompt, separated by commas")
        trace = heatmap_trace(model, clip, samples, positive, negative, neg_words, images)
        parts = []
        if pos_words:
            parts.append(maps_for(trace, pos_words, "cond", normalize=normalize, combine=combine, segments=segments))
        if neg_words:
            parts.append(maps_for(trace, neg_words, "uncond", normalize=normalize, combine=combine,
                                  segments=segments))
        maps = torch.cat(parts, dim=1)  # [B, W, H, W]
        masks = mask_ops.threshold(maps, threshold, "relative")
        heat = torch.stack([torch.from_numpy(render.colorize(m.detach(), colormap)) for m in flat(maps)])
        if images is not None:
            per = [images[b].detach().cpu().numpy() for b in range(maps.shape[0]) for _ in range(maps.shape[1])]
            over = torch.stack([torch.from_numpy(render.overlay(im, m, alpha, colormap))
                                for im, m in zip(per, flat(maps))])
        else:
            over = heat
        ui = {"daam_preview": [build_payload(trace, pos_words, neg_words, threshold=threshold, normalize=normalize,
                                             combine=combine, alpha=alpha, segments=segments,
                                             images=preview(images, "daam_preview") if images is not None else None)]}
        return {"ui": ui, "result": (heat, over, flat(masks), DaamMaps(trace, images, normalize, combine,
                                                                             segments))}


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


class DAAMMask:
    """One MASK from the maps of one or more words: threshold, clean-up and set operations."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "maps": (MAPS_TYPE, {"tooltip": "Maps from 'DAAM Heatmaps' or 'DAAM Load Trace'."}),
                "words": ("STRING", {"default": "", "tooltip": "Words or phrases, comma separated; their masks are "
                                     "combined with the operation below."}),
                "prompt": (["positive", "negative"], {"default": "positive", "tooltip": "Which prompt the words are in."}),
                "operation": (list(mask_ops.SET_OPERATIONS), {"default": "union", "tooltip": "union: any word; "
                              "intersection: all words; difference: the first word minus the others."}),
                "threshold_mode": (list(mask_ops.THRESHOLD_MODES), {"default": "relative", "tooltip": "relative: "
                                   "fraction of each map's max; absolute: level of the normalised map; otsu: automatic."}),
                "threshold": ("FLOAT", {"default": 0.4, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Threshold value (ignored by otsu)."}),
                "open_px": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "Remove specks up to this radius."}),
                "close_px": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "Fill holes up to this radius."}),
                "grow_px": ("INT", {"default": 0, "min": -256, "max": 256,
                                    "tooltip": "Grow (positive) or shrink (negative) the mask, in pixels."}),
                "feather_px": ("INT", {"default": 0, "min": 0, "max": 256, "tooltip": "Soften the edge, in pixels."}),
            }
        }

    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("mask",)
    OUTPUT_TOOLTIPS = ("One [batch, H, W] mask per image, for inpainting and compositing nodes.",)
    FUNCTION = "mask"
    CATEGORY = CATEGORY
    DESCRIPTION = "Mask of words taken from the generation itself (e.g. 'dog') for inpainting and compositing."

    def mask(self, maps, words, prompt="positive", operation="union", threshold_mode="relative", threshold=0.4,
             open_px=0, close_px=0, grow_px=0, feather_px=0):
        word_list = split_words(words)
        m = maps_for(maps.trace, word_list, BRANCH[prompt], normalize=maps.normalize, combine=maps.combine,
                     segments=maps.segments)
        binary = mask_ops.threshold(m, threshold, threshold_mode)
        combined = mask_ops.combine([binary[:, j] for j in range(binary.shape[1])], operation)
        return (mask_ops.refine(combined, open_px=open_px, close_px=close_px, grow_px=grow_px,
                                feather_px=feather_px).clamp_(0, 1),)


def _output_dir() -> str:
    import folder_paths

    return folder_paths.get_output_directory()


def safe_prefix(prefix: str) -> str:
    """A file-name prefix without path traversal: only the last component, restricted characters."""
    name = os.path.basename(prefix.replace("\\", "/")) or "daam"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".") or "daam"


class DAAMSaveTrace:
    """Save the raw maps (safetensors + JSON) into ComfyUI's output folder."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "maps": (MAPS_TYPE, {"tooltip": "Maps to save."}),
            "filename_prefix": ("STRING", {"default": "daam", "tooltip": "File name prefix, written to output/daam/."}),
        }}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = "Save a DAAM trace to output/daam/ as safetensors with a JSON sidecar."

    def save(self, maps, filename_prefix="daam"):
        folder = os.path.join(_output_dir(), TRACE_FOLDER)
        os.makedirs(folder, exist_ok=True)
        prefix = safe_prefix(filename_prefix)
        n = 1
        while os.path.exists(os.path.join(folder, f"{prefix}_{n:05}.safetensors")):
            n += 1
        path = save_trace(maps.trace, os.path.join(folder, f"{prefix}_{n:05}.safetensors"))
        return {"ui": {"text": [os.path.join(TRACE_FOLDER, path.name)]}}


class DAAMLoadTrace:
    """Load a trace saved by 'DAAM Save Trace' (safetensors only)."""

    @classmethod
    def INPUT_TYPES(cls):
        folder = os.path.join(_output_dir(), TRACE_FOLDER)
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) if os.path.isdir(folder) else []
        return {"required": {"trace": (files or [""], {"tooltip": "A trace in output/daam/."})},
                "optional": {"images": ("IMAGE", {"tooltip": "The images the trace belongs to, for overlays."})}}

    RETURN_TYPES = (MAPS_TYPE,)
    RETURN_NAMES = ("maps",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Load a DAAM trace from output/daam/."

    @classmethod
    def VALIDATE_INPUTS(cls, trace):
        return True if trace and os.path.basename(trace) == trace else f"invalid trace file name {trace!r}"

    def load(self, trace, images=None):
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
        return (DaamMaps(loaded, images),)


class DAAMShapesLoader:
    """The embedded shapes model as MODEL, CLIP and VAE: a checkpoint-free model with meaningful maps."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {
            "folder": ("STRING", {"default": "", "tooltip": "A shapes pipeline folder (diffusers layout); empty = the "
                                  "model shipped with the pack. It draws 32x32 scenes of coloured circles, squares "
                                  "and triangles, e.g. 'a red circle on the left and a blue square on the right'."})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The shapes UNet (pixel space: use 32x32 latents, e.g. Empty Latent Image at 256x256).",
                       "Its text encoder.",
                       "Its VAE (the identity at scale 1).")
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Load the small 'shapes' model trained by this project (no checkpoint needed)."

    def load(self, folder=""):
        from pathlib import Path

        from ..daam_core.shapes import model as shapes_model
        from . import shapes_loader

        path = Path(folder) if folder.strip() else shapes_model.ASSET_DIR
        if not shapes_model.available(path):
            raise ValueError(f"DAAM: no shapes model in {path} (a diffusers folder with model_index.json and unet/)")
        return (shapes_loader.load_model(path), shapes_loader.load_clip(path), shapes_loader.load_vae(path))


NODE_CLASS_MAPPINGS = {
    "DAAMTraceModel": DAAMTraceModel,
    "DAAMKSampler": DAAMKSampler,
    "DAAMHeatmaps": DAAMHeatmaps,
    "DAAMMask": DAAMMask,
    "DAAMSaveTrace": DAAMSaveTrace,
    "DAAMLoadTrace": DAAMLoadTrace,
    "DAAMShapesLoader": DAAMShapesLoader,
    "DAAMWordRelations": DAAMWordRelations,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DAAMTraceModel": "DAAM Trace Model",
    "DAAMKSampler": "KSampler (DAAM)",
    "DAAMHeatmaps": "DAAM Heatmaps",
    "DAAMMask": "DAAM Mask",
    "DAAMSaveTrace": "DAAM Save Trace",
    "DAAMLoadTrace": "DAAM Load Trace",
    "DAAMShapesLoader": "DAAM Shapes Model Loader",
    "DAAMWordRelations": "DAAM Word Relations",
}
