"""Streaming accumulation of cross-attention probabilities.

A host adapter tells the recorder when a sampling begins (latent size, which image/branch each
batch row belongs to), whether the current model call is inside the time window, and hands it the
query and key of every cross-attention call. The recorder keeps one fp32 running sum per layer of
shape ``[streams, N_layer, T]``; its memory does not depend on the number of steps.

Everything that can be decided once (layer filters, spatial shape, row -> stream index tensors) is
cached, so the per-call work is: one batched ``q @ k^T``, a softmax, a sum over heads and one
``index_add_`` into the running sum. No host synchronisation happens on the hot path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from .geometry import PARTS, LayerInfo, UNetGrid, is_power_of_two

BRANCHES = ("cond", "uncond")


@dataclass(frozen=True)
class Stream:
    """One conditioning branch of one image: what a batch row of the model input stands for.

    Attributes
    ----------
    image : int
        Index of the image in the batch of generated images.
    branch : str
        ``"cond"`` (positive prompt) or ``"uncond"`` (negative prompt / empty prompt of CFG).
    prompt : int
        Index into the trace's list of token layouts: the prompt this row was conditioned on.
    """

    image: int
    branch: str
    prompt: int

    def __post_init__(self):
        if self.branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {self.branch!r}")


@dataclass(frozen=True)
class RecordFilter:
    """What to record, decided before any work is done on a call.

    Attributes
    ----------
    factors : tuple of int or None
        Allowed spatial downsampling factors of a layer relative to the latent, powers of two (1 = latent size;
        for SD1.5 at 512x512 the latent is 64x64, so factor 4 is the 16x16 layers). None = all.
    parts : tuple of str or None
        Allowed parts of the network (UNet ``"down"``, ``"mid"``, ``"up"``; Flux ``"double"``, ``"single"``;
        SD3 ``"joint"``). None = all.
    layers : tuple of str or None
        Allowed layer names (host ids). None = all.
    heads : tuple of int or None
        Attention heads to sum (non-empty). None = all heads. A head past a layer's head count is an error
        at that layer's first call.
    start, end : float
        Time window as a fraction of the sampling, 0 = first (noisiest) step, 1 = the end.
        A model call at progress ``p`` is recorded when ``start <= p <= end``.
    branches : tuple of str
        Which CFG branches to record; drop ``"uncond"`` to skip negative-prompt maps.
    time_buckets : int
        1 = one sum over the sampling; K > 1 = also one sum per K-th of the sampling's progress (for seeing
        when a word takes hold), K times the memory of one sum, still flat in the number of steps.
    """

    factors: tuple[int, ...] | None = None
    parts: tuple[str, ...] | None = None
    layers: tuple[str, ...] | None = None
    heads: tuple[int, ...] | None = None
    start: float = 0.0
    end: float = 1.0
    branches: tuple[str, ...] = BRANCHES
    time_buckets: int = 1

    def __post_init__(self):
        if not isinstance(self.time_buckets, int) or self.time_buckets < 1:
            raise ValueError(f"time_buckets must be an integer >= 1, got {self.time_buckets!r}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"time window must satisfy 0 <= start <= end <= 1, got ({self.start}, {self.end})")
        if self.factors is not None:
            bad = [f for f in self.factors if not is_power_of_two(f)]
            if bad or not self.factors:
                raise ValueError(f"layer factors must be powers of two (1, 2, 4, ...), got {list(self.factors)}")
        if self.parts is not None:
            bad = set(self.parts) - set(PARTS)
            if bad or not self.parts:
                raise ValueError(f"unknown network parts {sorted(bad) or '(none given)'}; use {PARTS}")
        if self.heads is not None:
            if not self.heads:
                raise ValueError("the head list is empty: name at least one head, or None for all heads")
            if any(not isinstance(h, int) or h < 0 for h in self.heads):
                raise ValueError(f"head indices must be integers >= 0, got {list(self.heads)}")
        if not self.branches:
            raise ValueError("no branch to record: use ('cond',) or ('cond', 'uncond')")
        bad = set(self.branches) - set(BRANCHES)
        if bad:
            raise ValueError(f"unknown branches {sorted(bad)}; use {BRANCHES}")

    @property
    def locations(self) -> tuple[str, ...] | None:
        """The former name of :attr:`parts`."""
        return self.parts

    def in_window(self, progress: float) -> bool:
        return self.start <= progress <= self.end


@dataclass
class Recording:
    """What one sampling recorded: the recorder's hand-over to :class:`~daam_core.engine.trace.AttentionTrace`.

    Attributes
    ----------
    sums : dict layer -> Tensor ``[streams, N_layer, T_max]`` float32
        Head-summed probabilities, summed over the layer's recorded calls.
    layers : dict layer -> LayerInfo
    calls : dict layer -> int
        Recorded calls per layer.
    streams : list of Stream
        Stream ``i`` is row ``i`` of every sum.
    token_counts : list of int
        Token count per prompt.
    latent_hw : (int, int)
    branches : tuple of str
        The branches that were recorded (a stream of another branch has no maps).
    warnings : list of str
        What had to be skipped.
    time_sums : dict layer -> Tensor ``[K, streams, N_layer, T_max]``
        With ``RecordFilter.time_buckets`` K > 1: the sums per K-th of the sampling (they add up to ``sums``).
    time_calls : dict layer -> list of K int
        Recorded calls per layer and time bucket.
    """

    sums: dict[str, torch.Tensor]
    layers: dict[str, LayerInfo]
    calls: dict[str, int]
    streams: list[Stream]
    token_counts: list[int]
    latent_hw: tuple[int, int]
    branches: tuple[str, ...] = BRANCHES
    warnings: list[str] = field(default_factory=list)
    time_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    time_calls: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class _Call:
    """Per-model-call state set by the adapter (row layout and time window verdict)."""

    active: bool = False
    rows: tuple[int | None, ...] = ()
    bucket: int = 0  # time bucket of the call (RecordFilter.time_buckets)


class CrossAttentionRecorder:
    """Running fp32 sums of head-summed cross-attention probabilities.

    Parameters
    ----------
    filter : RecordFilter, optional
        What to record.

    Notes
    -----
    Lifecycle: ``begin(grid, streams, token_counts)`` once per sampling, ``set_call(rows, progress)``
    once per model call, ``record(layer, part, q, k, heads)`` per cross-attention call, ``finish()`` after
    sampling. ``finish`` returns a :class:`Recording`; the recorder can then be reused.
    """

    def __init__(self, filter: RecordFilter | None = None):
        self.filter = filter or RecordFilter()
        self.layers: dict[str, LayerInfo] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.streams: list[Stream] = []
        self.token_counts: list[int] = []
        self.grid = UNetGrid((0, 0))
        self.warnings: list[str] = []
        self._call = _Call()
        self._enabled: dict[str, bool] = {}
        self._index_cache: dict[tuple, object] = {}
        self._time_calls: dict[str, list[int]] = {}
        self._started = False

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.grid.latent_hw

    # -- lifecycle ---------------------------------------------------------------------------
    def begin(self, grid, streams: Sequence[Stream], token_counts: Sequence[int]) -> None:
        """Start a sampling: forget previous sums and fix the stream list.

        Parameters
        ----------
        grid : UNetGrid, PatchGrid or (int, int)
            The adapter's grid rule for this sampling's layers (a latent ``(h, w)`` means a UNet).
        streams : sequence of Stream
            Every (image, branch) the adapter may route batch rows to; stream ``i`` is index ``i``.
        token_counts : sequence of int
            Token count of each prompt layout (``Stream.prompt`` indexes it); a call whose key length is a
            multiple of it (ComfyUI repeats shorter conditionings to a common length) is folded back.
        """
        self.grid = UNetGrid(grid) if isinstance(grid, (tuple, list)) else grid
        self.streams = list(streams)
        self.token_counts = [int(t) for t in token_counts]
        for s in self.streams:
            if not 0 <= s.prompt < len(self.token_counts):
                raise ValueError(f"stream {s} refers to prompt {s.prompt}, but only {len(self.token_counts)} given")
        self.layers.clear()
        self.sums.clear()
        self.calls.clear()
        self.warnings.clear()
        self._enabled.clear()
        self._index_cache.clear()
        self._time_calls = {}
        self._call = _Call()
        self._started = True

    def set_call(self, rows: Sequence[int | None], progress: float) -> None:
        """Describe the next model call.

        Parameters
        ----------
        rows : sequence of (int or None)
            For each batch row of the model input, the index of its stream, or None to skip the row.
        progress : float
            Where this call sits in the sampling, 0 (start) .. 1 (end).
        """
        wanted = tuple(r if (r is not None and self.streams[r].branch in self.filter.branches) else None
                       for r in rows)
        active = self._started and self.filter.in_window(progress) and any(r is not None for r in wanted)
        k = self.filter.time_buckets
        self._call = _Call(active=active, rows=wanted, bucket=min(max(int(progress * k), 0), k - 1))

    def skip_call(self) -> None:
        """Record nothing until the next ``set_call`` (e.g. a model call the adapter cannot map)."""
        self._call = _Call()

    @property
    def active(self) -> bool:
        """Whether the current model call is being recorded (cheap check for adapters)."""
        return self._call.active

    def finish(self) -> Recording:
        """End the sampling and hand over the sums (the recorder forgets them)."""
        timed = self.filter.time_buckets > 1  # then each sum is [K, streams, N, T]
        out = Recording(sums={n: v.sum(0) for n, v in self.sums.items()} if timed else dict(self.sums),
                        layers=dict(self.layers), calls=dict(self.calls),
                        streams=list(self.streams), token_counts=list(self.token_counts),
                        latent_hw=self.grid.latent_hw, branches=tuple(self.filter.branches),
                        warnings=list(self.warnings), time_sums=dict(self.sums) if timed else {},
                        time_calls={n: list(c) for n, c in self._time_calls.items()} if timed else {})
        self._time_calls = {}
        self.sums = {}
        self.layers = {}
        self.calls = {}
        self._started = False
        self._call = _Call()
        return out

    # -- hot path ----------------------------------------------------------------------------
    def wants(self, name: str, part: str) -> bool:
        """Whether a layer passes the name/part filters (the factor is checked on first call)."""
        if not self._call.active:
            return False
        enabled = self._enabled.get(name)
        if enabled is None:
            f = self.filter
            enabled = ((f.layers is None or name in f.layers) and
                       (f.parts is None or part in f.parts))
            self._enabled[name] = enabled
        return enabled

    def _layer(self, name: str, part: str, kind: str, n: int, heads: int) -> LayerInfo | None:
        """The layer's info, registered on its first call (None: the layer is skipped)."""
        layer = self.layers.get(name)
        if layer is not None:
            if n != layer.hw[0] * layer.hw[1]:
                self.warnings.append(f"{name}: a call with {n} queries does not match the layer's {layer.hw}; "
                                     f"call skipped")
                return None
            return layer
        try:
            factor, hw = self.grid.locate(n)
        except ValueError as e:  # e.g. an area-restricted conditioning: not the full latent
            self._enabled[name] = False
            self.warnings.append(f"{name}: {e}; layer skipped")
            return None
        f = self.filter
        if f.factors is not None and factor not in f.factors:
            self._enabled[name] = False
            return None
        if f.heads is not None and max(f.heads) >= heads:
            raise ValueError(f"DAAM: attention heads {[h for h in f.heads if h >= heads]} do not exist: layer {name} "
                             f"has {heads} heads (0..{heads - 1})")
        layer = LayerInfo(name=name, part=part, kind=kind, order=len(self.layers), factor=factor, hw=hw, heads=heads)
        self.layers[name] = layer
        return layer

    def record(self, name: str, part: str, q: torch.Tensor, k: torch.Tensor, heads: int,
               scale: float | None = None, skip_reshape: bool = False) -> None:
        """Accumulate one cross-attention call.

        Parameters
        ----------
        name, part : str
            Layer id and network part (``"down"``, ``"mid"``, ``"up"`` for a UNet).
        q : Tensor
            Queries ``[B, N, heads * d]`` (or ``[B, heads, N, d]`` with ``skip_reshape``).
        k : Tensor
            Keys ``[B, T, heads * d]`` (or ``[B, heads, T, d]`` with ``skip_reshape``).
        heads : int
            Number of heads.
        scale : float, optional
            Softmax scale, default ``d ** -0.5``.
        """
        if not self.wants(name, part):
            return
        n = q.shape[2] if skip_reshape else q.shape[1]
        if self._layer(name, part, "cross", n, heads) is None:
            return
        rows, streams = self._rows(q.device)
        if skip_reshape:
            qs, ks = q[rows], k[rows]
        else:
            b = len(streams)
            qs = q[rows].view(b, n, heads, -1).transpose(1, 2)
            ks = k[rows].view(b, k.shape[1], heads, -1).transpose(1, 2)
        if self.filter.heads is not None:
            sel = self._heads(q.device)
            qs, ks = qs.index_select(1, sel), ks.index_select(1, sel)
        d = qs.shape[-1]
        scores = torch.matmul(qs.float(), ks.float().transpose(-1, -2))
        scores.mul_(scale if scale is not None else 1.0 / math.sqrt(d))
        probs = scores.softmax(dim=-1).sum(dim=1)  # [rows, N, T_call]
        self._accumulate(name, probs, streams)
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.filter.time_buckets > 1:
            self._time_calls.setdefault(name, [0] * self.filter.time_buckets)[self._call.bucket] += 1

    def _heads(self, device: torch.device) -> torch.Tensor:
        key = ("heads", device)
        hit = self._index_cache.get(key)
        if hit is None:
            hit = torch.tensor(self.filter.heads, dtype=torch.long, device=device)
            self._index_cache[key] = hit
        return hit

    def _rows(self, device: torch.device) -> tuple[torch.Tensor, tuple[int, ...]]:
        key = (self._call.rows, device)
        hit = self._index_cache.get(key)
        if hit is None:
            pairs = [(i, s) for i, s in enumerate(self._call.rows) if s is not None]
            idx = torch.tensor([i for i, _ in pairs], dtype=torch.long, device=device)
            hit = (idx, tuple(s for _, s in pairs))
            self._index_cache[key] = hit
        return hit

    def _accumulate(self, name: str, probs: torch.Tensor, streams: tuple[int, ...]) -> None:
        t_call = probs.shape[-1]
        acc = self.sums.get(name)
        k = self.filter.time_buckets
        if acc is None:
            acc = torch.zeros(*((k,) if k > 1 else ()), len(self.streams), probs.shape[1], max(self.token_counts),
                              dtype=torch.float32, device=probs.device)
            self.sums[name] = acc
        if k > 1:
            acc = acc[self._call.bucket]  # a view: the call adds into its time bucket
        # Group rows by their prompt's token count; usually there is one group.
        groups: dict[int, list[int]] = {}
        for j, s in enumerate(streams):
            groups.setdefault(self.token_counts[self.streams[s].prompt], []).append(j)
        for t, members in groups.items():
            part = probs if len(members) == len(streams) else probs[members]
            if t_call % t == 0:
                if t_call != t:  # host repeated the context to a common length: fold the copies
                    part = part.view(part.shape[0], part.shape[1], t_call // t, t).sum(dim=2)
            elif t_call > t:
                part = part[..., :t]  # extra keys appended by another extension: keep the prompt's
                msg = f"{name}: key length {t_call} is not a multiple of the prompt's {t}; extra keys ignored"
                if msg not in self.warnings:
                    self.warnings.append(msg)
            else:
                msg = f"{name}: key length {t_call} is shorter than the prompt's {t} tokens; call skipped"
                if msg not in self.warnings:
                    self.warnings.append(msg)
                continue
            index = self._stream_index(streams, members, probs.device)
            acc[:, :, :t].index_add_(0, index, part)

    def _stream_index(self, streams, members, device) -> torch.Tensor:
        key = (streams, tuple(members), device)
        hit = self._index_cache.get(key)
        if hit is None:
            hit = torch.tensor([streams[j] for j in members], dtype=torch.long, device=device)
            self._index_cache[key] = hit
        return hit


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
