"""The host contract: what every host adapter tells the recorder about time, one way for every host.

An adapter knows its sampling's steps as a table of noise levels (ComfyUI and Forge: the sigmas; diffusers: the
scheduler's timesteps) and what its host means by "a percent of the sampling". From those a
:class:`SamplingClock` turns each model call's noise level into a :class:`~daam_core.engine.schedule.Moment`:

- the **step** is the index of the step the call belongs to, so time buckets split an ``N``-step run by steps,
  each bucket its share (``step * K // N``), whatever the model family's noise schedule;
- the **window** verdict is the host's own: in ComfyUI (and Forge) ``start`` / ``end`` go through the model
  sampling's ``percent_to_sigma``, exactly as its timestep-range conditioning does, so DAAM's 0-0.5 covers the
  steps the host's own 0-0.5 covers (SD1.x/SDXL discrete schedules, SD3's shifted flow, Flux's sigma timesteps);
  in diffusers, as its pipelines' ``control_guidance_start`` / ``_end``: step ``i`` of ``N`` is inside when
  ``start <= i / N`` and ``(i + 1) / N <= end``.

Warnings go through :meth:`AttentionRecorder.warn` (once each).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import torch

from ..engine.recorder import Stream
from ..engine.schedule import Moment

# inside(level, step, steps) -> bool
WindowRule = Callable[[object, int, int], bool]


def whole(filter) -> bool:
    """Whether the filter records the whole sampling in one sum (then no call needs its time)."""
    return (filter.start, filter.end) == (0.0, 1.0) and filter.time_buckets == 1


def percent_window(start: float, end: float, percent_to_sigma) -> WindowRule:
    """The window of a ComfyUI-like host: a call at noise level ``sigma`` is inside when
    ``percent_to_sigma(end) <= sigma <= percent_to_sigma(start)``, compared as the host compares them
    (``comfy.samplers``: the call's sigma tensor against the float the model sampling returns)."""
    high, low = float(percent_to_sigma(start)), float(percent_to_sigma(end))

    def inside(level, step: int, steps: int) -> bool:
        sigma = level if isinstance(level, torch.Tensor) else torch.tensor(float(level))
        return not bool(sigma > high) and not bool(sigma < low)

    return inside


def step_window(start: float, end: float) -> WindowRule:
    """The window of a diffusers pipeline (``control_guidance_start`` / ``_end``): step ``i`` of ``N`` is inside when
    ``start <= i / N`` and ``(i + 1) / N <= end``."""

    def inside(level, step: int, steps: int) -> bool:
        return start <= step / steps and (step + 1) / steps <= end + 1e-9

    return inside


class SamplingClock:
    """Steps of one sampling and its time window, from the sampling's table of noise levels.

    Parameters
    ----------
    levels : sequence of float or Tensor ``[N]`` (or ``[N + 1]`` with a final 0)
        The noise level of each step, noisiest first: sigmas, or a scheduler's timesteps. Consecutive repeats
        (second-order schedulers) are one step; a trailing 0 (the sigma after the last step) is not a step.
    inside : callable ``(level, step, steps) -> bool``, optional
        The window rule (:func:`percent_window`, :func:`step_window`); None = every call is inside.

    Notes
    -----
    A call's level is placed on the step whose level it is; a level between two steps (the intermediate
    evaluations of multi-stage samplers) belongs to the step it started from. A table whose levels go back up
    (restart schedules) is read forwards from the previous call's step.
    """

    def __init__(self, levels, inside: WindowRule | None = None):
        if levels is None:  # a host that gives no step table (Forge's attention patches): the window alone
            self.levels, self.rule = None, inside
            return
        table = [float(v) for v in (levels.flatten().tolist() if isinstance(levels, torch.Tensor) else levels)]
        steps: list[float] = []
        for v in table:
            if not steps or v != steps[-1]:
                steps.append(v)
        if len(steps) > 1 and steps[-1] == 0.0:
            steps.pop()
        if not steps:
            raise ValueError("a sampling without steps: the noise-level table is empty")
        self.levels = steps
        self.rule = inside
        self.monotonic = all(b < a for a, b in zip(steps, steps[1:]))
        self._last = 0  # the step of the previous call: a level that repeats (restart schedules) is read forwards

    @classmethod
    def window_only(cls, inside: WindowRule) -> "SamplingClock":
        """A clock that knows the window but not the steps (every call is step 0 of 1: no time buckets)."""
        return cls(None, inside)

    @property
    def steps(self) -> int:
        return 1 if self.levels is None else len(self.levels)

    def step_of(self, level: float) -> int:
        """Index of the step a call at ``level`` belongs to."""
        lv = self.levels
        gap = max((abs(a - b) for a, b in zip(lv, lv[1:])), default=abs(lv[0])) or 1.0
        best = min(abs(v - level) for v in lv)
        if best <= 1e-3 * gap:
            hits = [i for i, v in enumerate(lv) if abs(v - level) == best]
            step = next((i for i in hits if i >= self._last), hits[0])
        elif self.monotonic:
            step = max(0, sum(1 for v in lv if v > level) - 1)  # between two steps: the one it started from
        else:  # between two levels of a schedule that goes back up: the step it started from, read forwards
            step = max([i for i in range(self._last, len(lv)) if lv[i] > level][:1] or [self._last])
        self._last = step
        return step

    def moment(self, level) -> Moment:
        """The :class:`Moment` of a model call at noise level ``level`` (float or 0-dim / 1-element tensor)."""
        value = float(level.flatten()[0]) if isinstance(level, torch.Tensor) else float(level)
        step = 0 if self.levels is None else self.step_of(value)
        inside = True if self.rule is None else self.rule(
            level.flatten()[0] if isinstance(level, torch.Tensor) else value, step, self.steps)
        return Moment(step, self.steps, inside)


def parse_blocks(text: str) -> tuple[tuple[str, int, int], ...] | None:
    """A block-range input as typed: ``"double:0-9, single:10-37"`` -> ``(("double", 0, 10), ("single", 10, 38))``.

    Ranges are inclusive as written (``"single:5"`` is one block); an empty string gives None (all blocks). Only
    the syntax is checked here: whether the model has those parts and blocks is the adapter's check (the engine's
    :meth:`~daam_core.engine.recorder.RecordFilter.check_parts` at the latest).
    """
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        part, sep, rng = item.partition(":")
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", rng)
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", part.strip()) or m is None:
            raise ValueError(f"block range {item!r}: write part:start-end, e.g. 'single:0-9'")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise ValueError(f"block range {item!r}: end {b} is before start {a}")
        out.append((part.strip(), a, b + 1))
    return tuple(out) or None


# -- batch rows of the usual classifier-free guidance ------------------------------------------------------------
def cfg_rows(n_images: int, cfg: bool, uncond_first: bool = True) -> list[int]:
    """Row -> stream mapping for the usual classifier-free-guidance batch.

    Streams are numbered ``0..n_images-1`` for the conditional branch and ``n_images..2*n_images-1``
    for the unconditional one (see :func:`cfg_streams`).
    """
    cond = list(range(n_images))
    if not cfg:
        return cond
    uncond = [n_images + i for i in range(n_images)]
    return uncond + cond if uncond_first else cond + uncond


def cfg_streams(n_images: int, prompt_of_image: Iterable[int], negative_offset: int) -> list[Stream]:
    """Streams for ``n_images`` images: cond streams first, then uncond streams.

    ``prompt_of_image[i]`` is the positive prompt index of image ``i``; its negative prompt is
    ``negative_offset + prompt_of_image[i]``.
    """
    prompts = list(prompt_of_image)
    return ([Stream(i, "cond", prompts[i]) for i in range(n_images)] +
            [Stream(i, "uncond", negative_offset + prompts[i]) for i in range(n_images)])


# -- model families -------------------------------------------------------------------------------------------------
def add_family(registry: list, family):
    """Add ``family`` (anything with a ``name``) to a host's registry of model families, once per name."""
    if any(f.name == family.name for f in registry):
        raise ValueError(f"a family named {family.name!r} is registered already")
    registry.append(family)
    return family
