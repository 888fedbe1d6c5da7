"""``trace(pipe)``: the diffusers adapter for a pipeline, UNet (:class:`DiffusersTrace`) or joint attention
(:class:`JointTrace`)."""

from __future__ import annotations

from typing import Sequence

from ...engine.recorder import RecordFilter
from ..contract import parse_blocks
from ...engine.refine import RefineRecording
from .adapter import DiffusersTrace
from .joint import JointTrace


def trace(pipe, *, factors: Sequence[int] | None = None, parts: Sequence[str] | None = None,
          layers: Sequence[str] | None = None, heads: Sequence[int] | None = None,
          time_window: tuple[float, float] = (0.0, 1.0), negative: bool = True,
          keep_on_device: bool = False, blocks: str | None = None, time_buckets: int = 1,
          locations: Sequence[str] | None = None, refine: RefineRecording | None = None) -> DiffusersTrace:
    """Trace the cross-attention (UNets) or joint attention (SD3, Flux) of a diffusers pipeline.

    Parameters
    ----------
    pipe : StableDiffusion(XL)Pipeline, StableDiffusion3Pipeline, FluxPipeline or their img2img / inpaint variants
    factors : sequence of int, optional
        Layer resolutions to record, as downsampling relative to the latent (SD1.5 at 512: 4 = 16x16).
    parts : sequence of str, optional
        Parts of the network: UNet ``"down"``, ``"mid"``, ``"up"``; Flux ``"double"``, ``"single"``; SD3 ``"joint"``
        (``locations`` is their former name).
    layers : sequence of str, optional
        Exact module paths (``down_blocks.1.attentions.0.transformer_blocks.0.attn2``).
    heads : sequence of int, optional
        Heads to sum (default all).
    time_window : (float, float)
        Fraction of the denoising steps to record, 0 = start (noise) .. 1 = end: step ``i`` of ``N`` is recorded
        when ``start <= i / N`` and ``(i + 1) / N <= end`` (as diffusers' ``control_guidance_start`` / ``_end``).
    negative : bool
        Also record the negative prompt's (unconditional) maps.
    keep_on_device : bool
        Leave finished sums on the model's device.
    blocks : str, optional
        Transformer block ranges, e.g. ``"double:0-9, single:10-37"`` (a part without a range is kept whole).
    time_buckets : int
        K > 1 also keeps one sum per K-th of the steps (``AttentionTrace.time_sums``).
    refine : RefineRecording, optional
        UNets: also keep self-attention sums (for ``word_maps(propagate=k)``) and/or per-head sums (for
        ``word_maps(head_power=g)``); joint-attention pipelines (SD3, Flux): output-similarity sums (for
        ``word_maps(source="output")``); see :mod:`daam_core.engine.refine`.

    Returns
    -------
    DiffusersTrace
        A context manager; ``with trace(pipe) as tc: pipe(...); maps = tc.word_maps("dog")``.
    """
    parts = parts if parts is not None else locations
    f = RecordFilter(factors=tuple(factors) if factors else None, parts=tuple(parts) if parts else None,
                     layers=tuple(layers) if layers else None, heads=tuple(heads) if heads is not None else None,
                     start=float(time_window[0]), end=float(time_window[1]),
                     branches=("cond", "uncond") if negative else ("cond",),
                     blocks=parse_blocks(blocks) if blocks else None, time_buckets=int(time_buckets))
    if getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None:
        return JointTrace(pipe, f, keep_on_device=keep_on_device, refine=refine)
    if refine is not None and refine.output_similarity:
        raise ValueError("output-similarity sums are for joint-attention pipelines (SD3, Flux); a UNet's "
                         "cross-attention has no text outputs: leave RefineRecording.output_similarity off")
    return DiffusersTrace(pipe, f, keep_on_device=keep_on_device, refine=refine)
