"""Where a model call sits in the sampling: its step, and whether the time window holds it.

The recorder takes a :class:`Moment` per model call. Host adapters make it with
:class:`~daam_core.hosts.contract.SamplingClock`, which knows the sampling's steps and the host's own meaning of
a percent of the sampling; nothing here knows a host.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Moment:
    """One model call's place in the sampling.

    Attributes
    ----------
    step : int
        Index of the sampling step the call belongs to, ``0 .. steps - 1``.
    steps : int
        Steps of the sampling (``>= 1``).
    inside : bool
        Whether the call is inside the time window (decided by the host adapter, in the host's own terms).
    """

    step: int
    steps: int
    inside: bool = True

    def __post_init__(self):
        if self.steps < 1 or not 0 <= self.step < self.steps:
            raise ValueError(f"step {self.step} is not one of the sampling's {self.steps} steps")

    @property
    def fraction(self) -> float:
        """Share of the steps done before this one: 0 at the first step."""
        return self.step / self.steps

    def bucket(self, buckets: int) -> int:
        """The time bucket of the step when the sampling's steps are split into ``buckets`` equal shares."""
        return min(self.step * buckets // self.steps, buckets - 1)
