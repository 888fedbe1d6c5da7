"""DAAM tracing of one Forge sampling through the UNet patcher's public hooks.

Everything lives on a clone of Forge's ``UnetPatcher`` (``unet.clone()``): the torch modules and Forge's own
modules are never touched, and the patcher the host keeps (``forge_objects_after_applying_lora``) runs as before.

- ``attn2`` replace patches, one per transformer block (``set_model_attn2_replace``): Forge projects q, k, v with
  the block's own layers and calls the patch instead of ``CrossAttention.forward``. The patch computes the output
  exactly as that forward would (``backend.nn.unet.attention_function``, or a replace patch another extension set
  before, which it wraps), then hands q and k to the recorder.
- Rows: ``transformer_options["cond_or_uncond"]`` (Forge's bookkeeping: 0 = positive, 1 = negative per batch
  chunk) and ``original_shape`` say which batch row is which image and branch; never call parity.
- The time window: the model call's sigma against the predictor's ``percent_to_sigma``, as Forge's own
  timestep-range conditioning reads a percent (:mod:`daam_core.hosts.contract`; one host sync per model call,
  only when the window is not the whole sampling). Forge's patches see no step table, so no time buckets.

Pure Python on top of torch: importing it needs no Forge; :meth:`ForgeSession.patch` takes the host's patcher.
"""

from __future__ import annotations

import sys
from typing import Sequence


from ...engine.geometry import UNetGrid
from ...engine.recorder import AttentionRecorder, RecordFilter, Stream
from ...engine.trace import AttentionTrace
from ...text.layout import TokenLayout
from ..contract import SamplingClock, percent_window, whole

LOCATION = {"input": "down", "middle": "mid", "output": "up"}
COND, UNCOND = 0, 1  # Forge's cond_or_uncond codes (backend/sampling/sampling_function.py)


class UnsupportedModelError(ValueError):
    """The loaded model has no UNet cross-attention that DAAM can observe on Forge."""


def transformer_blocks(diffusion_model) -> list[tuple[str, int, int]]:
    """The ``(block, number, transformer_index)`` of every cross-attention transformer block of a Forge UNet.

    Raises
    ------
    UnsupportedModelError
        The model is not Forge's ``IntegratedUNet2DConditionModel`` (e.g. Flux or SD3, whose joint attention has
        no patch hook in Forge), or it has no cross-attention.
    """
    parts = (("input", getattr(diffusion_model, "input_blocks", None)),
             ("middle", [getattr(diffusion_model, "middle_block", None)]),
             ("output", getattr(diffusion_model, "output_blocks", None)))
    if parts[0][1] is None or parts[2][1] is None:
        raise UnsupportedModelError(
            f"DAAM on Forge traces UNet models (SD 1.x, SD 2.x, SDXL); this model ({type(diffusion_model).__name__}) "
            f"has joint attention without a patch hook in Forge (Flux, SD3), so DAAM is off for this generation")
    keys = []
    for block, modules in parts:
        for number, module in enumerate(modules):
            if module is None:
                continue
            for layer in module:
                for index, tb in enumerate(getattr(layer, "transformer_blocks", ()) or ()):
                    if getattr(tb, "attn2", None) is not None:
                        keys.append((block, number, index))
    if not keys:
        raise UnsupportedModelError("this UNet has no cross-attention layers; DAAM has nothing to trace")
    return keys


class ForgeSession:
    """The recorder of one Forge sampling (one pass of one batch) and the patches that feed it.

    Parameters
    ----------
    filter : RecordFilter
    layouts : sequence of TokenLayout
        Distinct prompt layouts; ``cond_prompt[i]`` / ``uncond_prompt[i]`` index it.
    cond_prompt : sequence of int, length n_images
        Layout of image ``i``'s positive prompt.
    uncond_prompt : sequence of int, length n_images, or None
        Layout of image ``i``'s negative prompt (None: record no negative branch).
    latent_hw : (int, int)
        Latent height and width of this pass.
    predictor : object, optional
        Forge's ``KModel.predictor`` (its ``percent_to_sigma``), for the time window.
    """

    def __init__(self, filter: RecordFilter, layouts: Sequence[TokenLayout], cond_prompt: Sequence[int],
                 uncond_prompt: Sequence[int] | None, latent_hw: tuple[int, int], predictor=None):
        self.recorder = AttentionRecorder(filter)
        self.layouts = list(layouts)
        self.n_images = len(cond_prompt)
        streams = [Stream(i, "cond", int(p)) for i, p in enumerate(cond_prompt)]
        if uncond_prompt is not None:
            if len(uncond_prompt) != self.n_images:
                raise ValueError("one negative prompt per image is needed")
            streams += [Stream(i, "uncond", int(p)) for i, p in enumerate(uncond_prompt)]
        self.has_uncond = uncond_prompt is not None
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        self.predictor = predictor
        if filter.time_buckets > 1:
            raise ValueError("DAAM on Forge has no time buckets: its attention patches see no step table")
        self._clock = None
        if not whole(filter):  # Forge's own percents, as its timestep-range options read them
            if not hasattr(predictor, "percent_to_sigma"):
                raise ValueError(f"DAAM's time window needs the model's percent_to_sigma, and this model's predictor "
                                 f"({type(predictor).__name__}) has none: record the whole sampling (0-1)")
            self._clock = SamplingClock.window_only(percent_window(filter.start, filter.end,
                                                                   predictor.percent_to_sigma))
        self.errors: list[str] = []
        self.live = True
        self._call_key = None
        self.recorder.begin(UNetGrid(self.latent_hw), streams, [l.length for l in self.layouts])

    def __deepcopy__(self, memo):  # UnetPatcher.clone deep-copies model_options: keep one session
        return self

    def __copy__(self):
        return self

    # -- patching ------------------------------------------------------------------------------------------------
    def patch(self, unet):
        """A clone of Forge's ``UnetPatcher`` with DAAM's attn2 replace patches; ``unet`` itself is not changed."""
        keys = transformer_blocks(unet.model.diffusion_model)
        clone = unet.clone()
        to = clone.model_options.setdefault("transformer_options", {})
        previous = dict(to.get("patches_replace", {}).get("attn2", {}))
        for key in keys:
            prev = previous.get(key, previous.get(key[:2]))
            prev = getattr(prev, "daam_previous", prev)  # re-patching a DAAM clone: wrap what was under it
            clone.set_model_attn2_replace(self._replace(key, prev), *key)
        return clone

    def _replace(self, key: tuple[str, int, int], previous):
        name = f"{key[0]}.{key[1]}.{key[2]}"
        location = LOCATION[key[0]]
        unet_module = sys.modules.get("backend.nn.unet")

        def attn2_replace(q, k, v, extra):
            if previous is not None:
                out = previous(q, k, v, extra)
            else:  # exactly what CrossAttention.forward computes after its projections
                out = unet_module.attention_function(q, k, v, extra["n_heads"], None)
            if self.live:
                try:
                    self._observe(name, location, q, k, extra)
                except Exception as e:  # never lose the generation to the tracer
                    self.live = False
                    self.recorder.skip_call()
                    self.errors.append(f"DAAM stopped recording at layer {name}: {type(e).__name__}: {e}")
            return out

        attn2_replace.daam_previous = previous
        return attn2_replace

    # -- hot path ------------------------------------------------------------------------------------------------
    def _observe(self, name, location, q, k, extra) -> None:
        sigmas = extra.get("sigmas")
        kinds = extra.get("cond_or_uncond")
        shape = extra.get("original_shape")
        key = self._call_key
        if key is None or key[0] is not sigmas or key[1] != kinds or key[2] != shape:
            self._call_key = (sigmas, list(kinds or ()), list(shape or ()))
            self._set_call(kinds, shape, sigmas)
        if self.recorder.active:
            self.recorder.record(name, location, q, k, int(extra["n_heads"]))

    def _set_call(self, kinds, shape, sigmas) -> None:
        if not kinds or not shape or len(shape) != 4 or tuple(shape[-2:]) != self.latent_hw:
            self.recorder.skip_call()  # an area-cropped batch (regional extensions) or a call outside sampling
            return
        chunk, rest = divmod(int(shape[0]), len(kinds))
        if rest or chunk != self.n_images or len(set(kinds)) != len(kinds):
            # several positive (AND) chunks in one call, or a batch this session did not start with
            self.recorder.skip_call()
            return
        rows: list[int | None] = []
        for kind in kinds:
            if kind == COND:
                rows += range(self.n_images)
            elif kind == UNCOND and self.has_uncond:
                rows += range(self.n_images, 2 * self.n_images)
            else:
                rows += [None] * chunk
        progress = 0.0
        if self._clock is not None and sigmas is not None:
            progress = self._clock.moment(sigmas[:1])
        self.recorder.set_call(rows, progress)

    # -- results -------------------------------------------------------------------------------------------------
    def finish(self, image_hw: tuple[int, int], meta: dict | None = None) -> AttentionTrace:
        """Stop recording and return the trace (its maps read at ``image_hw``)."""
        self.live = False
        recorded = self.recorder.finish()
        trace = AttentionTrace.from_recorder(recorded, self.layouts, image_hw, meta=meta)
        trace.warnings.extend(self.errors)
        return trace

    def abort(self) -> None:
        """Stop recording and forget the sums (after an error or an interrupt that leaves no image)."""
        self.live = False
        self.recorder.finish()


def distinct(layouts: Sequence[TokenLayout]) -> tuple[list[TokenLayout], list[int]]:
    """Deduplicate layouts (a batch usually repeats one prompt): the distinct ones and each input's index."""
    out: list[TokenLayout] = []
    index: list[int] = []
    for layout in layouts:
        for j, seen in enumerate(out):
            if seen == layout:
                index.append(j)
                break
        else:
            index.append(len(out))
            out.append(layout)
    return out, index
