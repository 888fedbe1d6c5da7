"""The Forge extension's logic: options, the per-generation run, outputs. ``scripts/daam_forge.py`` is its skin.

Forge calls an always-visible script at fixed points of ``modules/processing.py``; what happens at each:

- ``process``: read and check the options (a bad option is a message, never an exception into Forge).
- ``process_before_every_sampling`` (each pass; twice before a hires pass): build the token layouts from the
  prompts Forge is about to sample with, and put a DAAM clone of ``p.sd_model.forge_objects.unet`` in its place.
  A live first-pass session is finished first, so each pass has its own trace.
- ``post_sample``: finish the session and put back the patcher DAAM replaced.
- ``postprocess_batch``: keep the decoded images of the batch for the overlays.
- ``postprocess``: heat maps, overlays and masks of every image into the gallery (labelled), masks as PNG and the
  trace as safetensors + JSON under Forge's output folder; problems into the comments and the infotext.

Nothing here imports Forge at module level; the hooks receive Forge's objects.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ...engine import masks as mask_ops
from ...engine import render
from ...engine.outputs import file_stem
from ...engine.recorder import RecordFilter
from ...text.query import WordNotFoundError, split_words
from .session import ForgeSession, UnsupportedModelError, distinct, transformer_blocks
from .tokens import TokenMismatchError, forge_layout, pad_layout, text_engine

TITLE = "DAAM"
RESOLUTIONS = {"1/8": 1, "1/16": 2, "1/32": 4, "1/64": 8}  # layer grid relative to the image -> latent factor
HIRES_PASSES = ("hires", "first", "both")
OUTPUTS = ("heat maps", "overlays", "masks")
ARG_NAMES = ("enabled", "words", "negative_words", "threshold", "resolutions", "start", "end", "hires_pass",
             "outputs", "save_trace")
DEFAULTS = dict(enabled=False, words="", negative_words="", threshold=0.4, resolutions=list(RESOLUTIONS),
                start=0.0, end=1.0, hires_pass="hires", outputs=["overlays", "masks"], save_trace=True)


class OptionError(ValueError):
    """An option given in the UI or in ``alwayson_scripts`` is not valid."""


def _words(value) -> list[str]:
    """Words from the UI's comma-separated text, or from a list given through the API."""
    if isinstance(value, (list, tuple)):
        return [str(w).strip() for w in value if str(w).strip()]
    return split_words(None if value is None else str(value))


def _as_list(value, name: str) -> list[str]:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise OptionError(f"DAAM option {name!r} must be a list of strings, got {type(value).__name__}")


@dataclass
class Options:
    """The DAAM section's values (UI order = ``alwayson_scripts`` ``args`` order, see :data:`ARG_NAMES`)."""

    enabled: bool = False
    words: list[str] = field(default_factory=list)
    negative_words: list[str] = field(default_factory=list)
    threshold: float = 0.4
    factors: tuple[int, ...] = tuple(RESOLUTIONS.values())
    start: float = 0.0
    end: float = 1.0
    hires_pass: str = "hires"
    outputs: tuple[str, ...] = ("overlays", "masks")
    save_trace: bool = True

    @classmethod
    def parse(cls, args) -> "Options":
        values = dict(DEFAULTS)
        if len(args) > len(ARG_NAMES):
            raise OptionError(f"DAAM takes at most {len(ARG_NAMES)} args ({', '.join(ARG_NAMES)}), got {len(args)}")
        values.update(zip(ARG_NAMES, args))
        try:
            threshold, start, end = float(values["threshold"]), float(values["start"]), float(values["end"])
        except (TypeError, ValueError):
            raise OptionError("DAAM threshold, start and end must be numbers") from None
        if not 0.0 <= threshold <= 1.0:
            raise OptionError(f"DAAM threshold must be in [0, 1] (a fraction of each map's maximum), got {threshold}")
        if not 0.0 <= start <= end <= 1.0:
            raise OptionError(f"DAAM time window must satisfy 0 <= start <= end <= 1, got start={start}, end={end}")
        res = _as_list(values["resolutions"], "resolutions")
        bad = [r for r in res if r not in RESOLUTIONS]
        if bad or not res:
            raise OptionError(f"DAAM resolutions must be a non-empty subset of {list(RESOLUTIONS)}, got {res}")
        if values["hires_pass"] not in HIRES_PASSES:
            raise OptionError(f"DAAM hires_pass must be one of {list(HIRES_PASSES)}, got {values['hires_pass']!r}")
        outputs = _as_list(values["outputs"], "outputs")
        bad = [o for o in outputs if o not in OUTPUTS]
        if bad:
            raise OptionError(f"DAAM outputs must be a subset of {list(OUTPUTS)}, got {outputs}")
        opts = cls(enabled=bool(values["enabled"]), words=_words(values["words"]),
                   negative_words=_words(values["negative_words"]), threshold=threshold,
                   factors=tuple(sorted(RESOLUTIONS[r] for r in res)), start=start, end=end,
                   hires_pass=values["hires_pass"], outputs=tuple(outputs), save_trace=bool(values["save_trace"]))
        if opts.enabled and not (opts.words or opts.negative_words):
            raise OptionError("DAAM is enabled but no words are given: name words or phrases of the prompt "
                              "(e.g. 'dog, red car') or of the negative prompt")
        return opts

    def record_filter(self) -> RecordFilter:
        return RecordFilter(factors=self.factors, start=self.start, end=self.end,
                            branches=("cond", "uncond") if self.negative_words else ("cond",))


@dataclass
class PassTrace:
    """One finished sampling pass of one batch."""

    iteration: int
    name: str  # "first" or "hires" (a generation without hires fix has only "first")
    trace: object
    seeds: list[int]


class Run:
    """DAAM's state during one generation (Forge runs one generation at a time)."""

    def __init__(self, options: Options):
        self.options = options
        self.messages: list[str] = []
        self.session: ForgeSession | None = None
        self.session_pass: str | None = None
        self.replaced = None  # the patcher DAAM's clone replaced, put back after sampling
        self.patched = None  # that clone
        self.passes: list[PassTrace] = []
        self.images: dict[int, torch.Tensor] = {}  # iteration -> decoded images [B, 3, H, W] in [0, 1]
        self.disabled = False

    def note(self, message: str) -> None:
        if message not in self.messages:
            self.messages.append(message)


class DaamForge:
    """What the Forge ``Script`` delegates to."""

    def __init__(self):
        self.run: Run | None = None

    # -- hooks ---------------------------------------------------------------------------------------------------
    def process(self, p, *args) -> None:
        self._release(p)
        self.run = None
        try:
            options = Options.parse(args)
        except OptionError as e:
            self.run = Run(Options())
            self.run.disabled = True
            self.run.note(str(e))
            return
        if not options.enabled:
            return
        self.run = Run(options)
        p.extra_generation_params["DAAM"] = ", ".join(options.words + [f"neg:{w}" for w in options.negative_words])

    def process_before_every_sampling(self, p, *args, **kwargs) -> None:
        run = self.run
        if run is None or run.disabled:
            return
        hires = bool(getattr(p, "is_hr_pass", False))
        name = "hires" if hires else "first"
        if run.session is not None and run.session_pass != name:
            self._finish(p)  # first pass done: keep its trace before the hires pass starts
        elif run.session is not None:
            run.session.abort()  # Forge calls this twice before a hires pass: the second call wins
            run.session = None
        if getattr(p, "enable_hr", False):
            wanted = {"hires": ("hires",), "first": ("first",), "both": ("first", "hires")}[run.options.hires_pass]
            if name not in wanted:
                return
        try:
            run.session = self._start(p, hires, kwargs)
            run.session_pass = name
            run.replaced = p.sd_model.forge_objects.unet
            run.patched = run.session.patch(run.replaced)
            p.sd_model.forge_objects.unet = run.patched
        except (UnsupportedModelError, TokenMismatchError, ValueError) as e:
            run.session = None
            run.disabled = True
            run.note(str(e))
        except Exception as e:  # a failed hook: say so, keep the generation
            run.session = None
            run.disabled = True
            run.note(f"DAAM could not hook this model: {type(e).__name__}: {e}")

    def post_sample(self, p, *args, **kwargs) -> None:
        if self.run is not None and self.run.session is not None:
            self._finish(p)

    def postprocess_batch(self, p, *args, **kwargs) -> None:
        run = self.run
        images = kwargs.get("images")
        if run is None or run.disabled or images is None:
            return
        run.images[int(kwargs.get("batch_number", getattr(p, "iteration", 0)))] = images.detach().float().cpu()

    def postprocess(self, p, processed, *args) -> None:
        run = self.run
        self._release(p)
        if run is None:
            return
        try:
            if not run.disabled:
                self._outputs(p, processed, run)
        except Exception as e:
            run.note(f"DAAM could not make its outputs: {type(e).__name__}: {e}")
        finally:
            self.run = None
            if run.messages:
                text = "\n".join(run.messages)
                processed.comments = (processed.comments or "") + "".join(f"{m}\n" for m in run.messages)
                processed.extra_generation_params["DAAM error"] = text
                print(f"[DAAM] {text}")

    # -- sessions ------------------------------------------------------------------------------------------------
    def _start(self, p, hires: bool, kwargs) -> ForgeSession:
        x = kwargs.get("x")
        if x is None or x.ndim != 4:
            raise ValueError("DAAM got no image latent from Forge for this sampling")
        transformer_blocks(p.sd_model.forge_objects.unet.model.diffusion_model)  # refuse Flux/SD3 before anything
        prompts = list(p.hr_prompts if hires else p.prompts)
        negatives = list(p.hr_negative_prompts if hires else p.negative_prompts)
        if len(prompts) != x.shape[0]:
            raise ValueError(f"DAAM expected one prompt per image ({x.shape[0]}), got {len(prompts)}")
        engine = text_engine(p.sd_model)
        if engine is None:
            raise UnsupportedModelError(f"DAAM on Forge needs a CLIP text encoder (SD 1.x, SD 2.x, SDXL); "
                                        f"{type(p.sd_model).__name__} has none, so DAAM is off")
        c, uc = kwargs.get("c"), kwargs.get("uc")
        cond_len = _cond_lengths(c, "positive")
        use_uncond = bool(self.run.options.negative_words)
        layouts = [pad_layout(forge_layout(engine, t), n, engine) for t, n in zip(prompts, cond_len)]
        if use_uncond:
            uncond_len = _cond_lengths(uc, "negative")
            layouts += [pad_layout(forge_layout(engine, t), n, engine) for t, n in zip(negatives, uncond_len)]
        uniq, index = distinct(layouts)
        b = x.shape[0]
        predictor = getattr(p.sd_model.forge_objects.unet.model, "predictor", None)
        return ForgeSession(self.run.options.record_filter(), uniq, index[:b], index[b:] if use_uncond else None,
                            tuple(x.shape[-2:]), predictor=predictor)

    def _finish(self, p) -> None:
        run = self.run
        session, name = run.session, run.session_pass
        run.session = None
        self._restore(p)
        h, w = session.latent_hw
        trace = session.finish((h * 8, w * 8), meta=dict(host="forge", pass_name=name))
        for m in trace.warnings:
            run.note(m)
        if not trace.sums:
            run.note(f"DAAM recorded no cross-attention in the {name} pass (time window or resolutions exclude "
                     f"every call, or another extension replaced the attention without calling it)")
            return
        seeds = list(getattr(p, "seeds", []))
        run.passes.append(PassTrace(int(getattr(p, "iteration", 0)), name, trace, seeds))

    def _release(self, p) -> None:
        """Put back the patcher DAAM replaced and drop a live session (after an interrupt or an error)."""
        run = self.run
        if run is None:
            return
        if run.session is not None:
            run.session.abort()
            run.session = None
        self._restore(p)

    def _restore(self, p) -> None:
        """Put the replaced patcher back, only where DAAM's clone still is (never onto another model)."""
        run = self.run
        forge_objects = getattr(getattr(p, "sd_model", None), "forge_objects", None)
        if forge_objects is not None and run.patched is not None and forge_objects.unet is run.patched:
            forge_objects.unet = run.replaced
        run.replaced = run.patched = None

    # -- outputs -------------------------------------------------------------------------------------------------
    def _outputs(self, p, processed, run: Run) -> None:
        opts = run.options
        out_dir = _output_dir(p)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for pt in run.passes:
            images = run.images.get(pt.iteration)
            if images is None:
                run.note(f"DAAM: no decoded images for batch {pt.iteration + 1}; maps skipped")
                continue
            trace = pt.trace
            trace.image_hw = (int(images.shape[-2]), int(images.shape[-1]))
            base = f"{stamp}-b{pt.iteration}-{pt.name}"
            if opts.save_trace and out_dir is not None:
                os.makedirs(out_dir, exist_ok=True)
                trace.save(os.path.join(out_dir, base))
            for i in range(images.shape[0]):
                picture = images[i].permute(1, 2, 0).numpy()
                seed = pt.seeds[i] if i < len(pt.seeds) else i
                for branch, words in (("cond", opts.words), ("uncond", opts.negative_words)):
                    for word in words:
                        try:
                            heat = trace.word_maps([word], image=i, branch=branch)[0]
                        except (WordNotFoundError, ValueError) as e:
                            where = "negative prompt" if branch == "uncond" else "prompt"
                            run.note(f"DAAM: {word!r} ({where}): {e}")  # once per distinct message
                            continue
                        tag = f"{'neg: ' if branch == 'uncond' else ''}{word}"
                        caption = f"DAAM {tag} (image {i + 1}, {_pass_label(pt.name, p)})"
                        self._add(processed, opts, picture, heat, caption, out_dir,
                                  f"{base}-{seed}-{i}-{'neg-' if branch == 'uncond' else ''}{file_stem(word, set())}")

    def _add(self, processed, opts: Options, picture, heat: torch.Tensor, caption: str, out_dir, name: str):
        from PIL import Image

        h = heat.clamp(0, 1).cpu()
        added = []
        if "overlays" in opts.outputs:
            added.append((render.label(render.overlay(picture, h.numpy()), caption), "overlay"))
        if "heat maps" in opts.outputs:
            added.append((render.label(render.colorize(h.numpy()), caption), "heat map"))
        mask = mask_ops.threshold(h, opts.threshold)
        mask_img = Image.fromarray((mask.numpy() * 255).astype(np.uint8), mode="L")
        if out_dir is not None and opts.save_trace:
            os.makedirs(out_dir, exist_ok=True)
            mask_img.save(os.path.join(out_dir, f"{name}-mask.png"))
        for arr, kind in added:
            processed.images.append(Image.fromarray(render.to_uint8(arr)))
            processed.infotexts.append(f"{caption} {kind}")
        if "masks" in opts.outputs:
            processed.images.append(mask_img.convert("RGB"))
            processed.infotexts.append(f"{caption} mask (threshold {opts.threshold:g})")


def _cond_lengths(cond, name: str) -> list[int]:
    """Token count per image of Forge's (multi)conditioning, refusing what DAAM cannot map to one prompt."""
    if cond is None:
        raise ValueError(f"DAAM got no {name} conditioning from Forge")
    batch = getattr(cond, "batch", None)
    if batch is None:
        batch = cond
    out = []
    for entry in batch:
        parts = entry if isinstance(entry, list) else [entry]
        if len(parts) != 1:
            raise ValueError(f"the {name} prompt uses AND ({len(parts)} sub-prompts); DAAM traces one prompt per "
                             f"image, so it is off for this generation")
        schedules = getattr(parts[0], "schedules", None) or [parts[0]]
        if len(schedules) != 1:
            raise ValueError(f"the {name} prompt changes during sampling (prompt editing [a:b:n] or alternation "
                             f"[a|b]); DAAM traces one prompt, so it is off for this generation")
        c = schedules[0].cond
        if isinstance(c, dict):
            c = c["crossattn"]
        out.append(int(c.shape[-2]))
    return out


def _pass_label(name: str, p) -> str:
    if not getattr(p, "enable_hr", False):
        return "sampling"
    return "hires pass" if name == "hires" else "first pass, before hires fix"


def _output_dir(p) -> str | None:
    base = getattr(p, "outpath_samples", None)
    return os.path.join(base, "daam") if base else None


def build_ui(gr, is_img2img: bool) -> list:
    """The always-visible DAAM section; the returned components are the ``args`` in :data:`ARG_NAMES` order."""
    tab = "img2img" if is_img2img else "txt2img"
    with gr.Accordion(TITLE, open=False, elem_id=f"daam_{tab}"):
        enabled = gr.Checkbox(label="Enable DAAM: heat maps and masks of words", value=False,
                              elem_id=f"daam_{tab}_enabled")
        words = gr.Textbox(label="Words or phrases of the prompt", placeholder="dog, red car, cat#2", lines=1,
                           elem_id=f"daam_{tab}_words")
        negative_words = gr.Textbox(label="Words of the negative prompt", placeholder="blurry", lines=1,
                                    elem_id=f"daam_{tab}_negative_words")
        threshold = gr.Slider(0.0, 1.0, value=0.4, step=0.01, label="Mask threshold (fraction of the word's maximum)",
                              elem_id=f"daam_{tab}_threshold")
        resolutions = gr.CheckboxGroup(list(RESOLUTIONS), value=list(RESOLUTIONS),
                                       label="Layer resolutions (of the image size)", elem_id=f"daam_{tab}_res")
        with gr.Row():
            start = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Time window start", elem_id=f"daam_{tab}_start")
            end = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="Time window end", elem_id=f"daam_{tab}_end")
        hires_pass = gr.Radio(list(HIRES_PASSES), value="hires", label="With hires fix, maps of the pass",
                              elem_id=f"daam_{tab}_hires")
        outputs = gr.CheckboxGroup(list(OUTPUTS), value=["overlays", "masks"], label="Add to the gallery",
                                   elem_id=f"daam_{tab}_outputs")
        save_trace = gr.Checkbox(label="Save masks (PNG) and the trace (safetensors + JSON) in the output folder",
                                 value=True, elem_id=f"daam_{tab}_save")
    return [enabled, words, negative_words, threshold, resolutions, start, end, hires_pass, outputs, save_trace]
