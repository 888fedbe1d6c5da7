"""Streaming accumulation of cross-attention probabilities.

A host adapter tells the recorder when a sampling begins (latent size, which image/branch each
batch row belongs to), whether the current model call is inside the time window, and hands it the
query and key of every cross-attention call. The recorder keeps one fp32 running sum per layer of
shape ``[streams, N_layer, T]``; its memory does not depend on the number of steps.

Everything that can be decided once (layer filters, spatial shape, row -> stream index tensors) is
cached, so the per-call work is: one batched ``q @ k^T`` scaled in the same kernel, the softmax in place, a sum
over heads and one ``index_add_`` into the running sum, in work buffers reused from call to call. No host
synchronisation happens on the hot path.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from . import joint
from .geometry import PARTS, LayerInfo, UNetGrid, is_power_of_two
from .schedule import Moment

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
        Time window as a fraction of the sampling, 0 = first (noisiest) step, 1 = the end. Host adapters decide
        it in the host's own terms (:class:`~daam_core.hosts.contract.SamplingClock`) and pass a
        :class:`~daam_core.engine.schedule.Moment`; a bare float progress ``p`` is inside when ``start <= p <= end``.
    branches : tuple of str
        Which CFG branches to record; drop ``"uncond"`` to skip negative-prompt maps.
    blocks : tuple of (str, int, int) or None
        Block ranges of transformer (joint-attention) layers: ``(part, start, stop)`` keeps the layers of that
        part whose block index (the last integer in the layer name, ``"single.12"`` -> 12) is in
        ``[start, stop)``; a part with no range is kept whole. None = all. See :func:`parse_blocks`.
    time_buckets : int
        1 = one sum over the sampling; K > 1 = also one sum per K-th of the sampling's steps (for seeing
        when a word takes hold), K times the memory of one sum, still flat in the number of steps.
    """

    factors: tuple[int, ...] | None = None
    parts: tuple[str, ...] | None = None
    layers: tuple[str, ...] | None = None
    heads: tuple[int, ...] | None = None
    start: float = 0.0
    end: float = 1.0
    branches: tuple[str, ...] = BRANCHES
    blocks: tuple[tuple[str, int, int], ...] | None = None
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
        if self.blocks is not None:
            for r in self.blocks:
                if (len(r) != 3 or r[0] not in PARTS or not all(isinstance(x, int) for x in r[1:])
                        or not 0 <= r[1] < r[2]):
                    raise ValueError(f"block range {r!r} must be (part, start, stop) with a part of {PARTS} and "
                                     f"0 <= start < stop")

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


@dataclass(frozen=True)
class _Plan:
    """Cached per (row layout, key length, device): the rows to gather (None: all of them, no gather) and, per
    group of rows with one token count, ``(rows of the group or None, their stream indices, tokens, fold)``;
    ``fold`` is the number of repeated context copies to sum (1: none), 0 to cut extra keys; ``warnings`` says
    what had to be cut or skipped."""

    rows: torch.Tensor | None
    steps: tuple
    warnings: tuple[str, ...] = ()


class CrossAttentionRecorder:
    """Running fp32 sums of head-summed cross-attention probabilities.

    Parameters
    ----------
    filter : RecordFilter, optional
        What to record.

    Notes
    -----
    Lifecycle: ``begin(grid, streams, token_counts)`` once per sampling, ``set_call(rows, moment)``
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
        self._buffers: dict[tuple, torch.Tensor] = {}
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
        self._buffers.clear()
        self._time_calls = {}
        self._call = _Call()
        self._started = True

    def set_call(self, rows: Sequence[int | None], progress: "Moment | float") -> None:
        """Describe the next model call.

        Parameters
        ----------
        rows : sequence of (int or None)
            For each batch row of the model input, the index of its stream, or None to skip the row.
        progress : Moment or float
            Where this call sits in the sampling: a :class:`Moment` (its step, and the adapter's window verdict),
            or a fraction 0 (start) .. 1 (end) read against ``filter.start`` / ``filter.end``.
        """
        wanted = tuple(r if (r is not None and self.streams[r].branch in self.filter.branches) else None
                       for r in rows)
        k = self.filter.time_buckets
        if isinstance(progress, Moment):
            inside, bucket = progress.inside, progress.bucket(k)
        else:
            inside, bucket = self.filter.in_window(progress), min(max(int(progress * k), 0), k - 1)
        active = self._started and inside and any(r is not None for r in wanted)
        self._call = _Call(active=active, rows=wanted, bucket=bucket)

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
        self._buffers = {}
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

        Notes
        -----
        Per call: one ``baddbmm`` with the scale as its ``alpha`` into a reused scratch buffer, the softmax in
        place, the sum over heads into a second reused buffer, one ``index_add_`` into the running sum. Rows are
        gathered only when some batch rows are not recorded; fp32 inputs are never copied to fp32.
        """
        if not self.wants(name, part):
            return
        n = q.shape[2] if skip_reshape else q.shape[1]
        if self._layer(name, part, "cross", n, heads) is None:
            return
        t_call = k.shape[2] if skip_reshape else k.shape[1]
        plan = self._plan(t_call, q.device)
        for msg in plan.warnings:
            self.warn(f"{name}: {msg}")
        if plan.rows is not None:
            q, k = q.index_select(0, plan.rows), k.index_select(0, plan.rows)
        b = q.shape[0]
        if skip_reshape:  # [B, H, N, D], [B, H, T, D]
            qh, kh = q, k.transpose(-1, -2)
        else:
            qh = q.view(b, n, heads, -1).transpose(1, 2)
            kh = k.view(b, t_call, heads, -1).permute(0, 2, 3, 1)  # [B, H, D, T]
        if self.filter.heads is not None:
            sel = self._heads(q.device)
            qh, kh = qh.index_select(1, sel), kh.index_select(1, sel)
        h, d = qh.shape[1], qh.shape[-1]
        qh = qh.reshape(b * h, n, d).float()  # copies only what is not already [B*H, N, D] fp32
        kh = kh.reshape(b * h, d, t_call).float()
        scores = self._scratch("scores", (b * h, n, t_call), q.device)
        torch.baddbmm(scores, qh, kh, beta=0.0, alpha=scale if scale is not None else d ** -0.5, out=scores)
        torch.softmax(scores, dim=-1, out=scores)
        if h == 1:
            probs = scores.view(b, n, t_call)
        else:
            probs = torch.sum(scores.view(b, h, n, t_call), dim=1, out=self._scratch("probs", (b, n, t_call), q.device))
        self._accumulate(name, probs, plan)
        self._count_call(name)

    def _scratch(self, role: str, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """A reused fp32 work buffer (calls of one shape share it; on the CPU this saves the page faults of a
        fresh allocation per call). Dropped by ``begin`` and ``finish``."""
        key = (role, shape, device)
        buf = self._buffers.get(key)
        if buf is None:
            buf = torch.empty(shape, dtype=torch.float32, device=device)
            self._buffers[key] = buf
        return buf

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

    def _plan(self, t_call: int, device: torch.device) -> "_Plan":
        """What to do with a call's rows and keys, worked out once per (row layout, key length, device)."""
        key = ("plan", self._call.rows, t_call, device)
        plan = self._index_cache.get(key)
        if plan is not None:
            return plan
        idx, streams = self._rows(device)
        all_rows = len(streams) == len(self._call.rows)
        groups: dict[int, list[int]] = {}  # rows grouped by their prompt's token count; usually one group
        for j, s in enumerate(streams):
            groups.setdefault(self.token_counts[self.streams[s].prompt], []).append(j)
        steps, warnings = [], []
        for t, members in groups.items():
            if t_call % t == 0:
                fold = t_call // t  # > 1: the host repeated the context to a common length; fold the copies
            elif t_call > t:
                fold = 0  # extra keys appended by another extension: keep the prompt's
                warnings.append(f"key length {t_call} is not a multiple of the prompt's {t}; extra keys ignored")
            else:
                warnings.append(f"key length {t_call} is shorter than the prompt's {t} tokens; call skipped")
                continue
            select = None if len(members) == len(streams) else torch.tensor(members, dtype=torch.long, device=device)
            target = torch.tensor([streams[j] for j in members], dtype=torch.long, device=device)
            steps.append((select, target, t, fold))
        plan = _Plan(rows=None if all_rows else idx, steps=tuple(steps), warnings=tuple(warnings))
        self._index_cache[key] = plan
        return plan

    def _running_sum(self, name: str, n_queries: int, device: torch.device) -> torch.Tensor:
        """The layer's sum ``[streams, N, T_max]`` this call adds into (its time bucket's with ``time_buckets``)."""
        acc = self.sums.get(name)
        k = self.filter.time_buckets
        if acc is None:
            acc = torch.zeros(*((k,) if k > 1 else ()), len(self.streams), n_queries, max(self.token_counts),
                              dtype=torch.float32, device=device)
            self.sums[name] = acc
        return acc[self._call.bucket] if k > 1 else acc

    def _count_call(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.filter.time_buckets > 1:
            self._time_calls.setdefault(name, [0] * self.filter.time_buckets)[self._call.bucket] += 1

    def _accumulate(self, name: str, probs: torch.Tensor, plan: "_Plan") -> None:
        acc = self._running_sum(name, probs.shape[1], probs.device)
        for select, target, t, fold in plan.steps:
            part = probs if select is None else probs.index_select(0, select)
            if fold > 1:
                part = part.view(part.shape[0], part.shape[1], fold, t).sum(dim=2)
            elif fold == 0:
                part = part[..., :t]
            (acc if t == acc.shape[-1] else acc[:, :, :t]).index_add_(0, target, part)

    def _stream_index(self, streams, members, device) -> torch.Tensor:
        key = (streams, tuple(members), device)
        hit = self._index_cache.get(key)
        if hit is None:
            hit = torch.tensor([streams[j] for j in members], dtype=torch.long, device=device)
            self._index_cache[key] = hit
        return hit

    # -- joint attention (SD3, Flux): see daam_core.engine.joint ---------------------------------
    joint_chunk_elements: int = joint.DEFAULT_CHUNK_ELEMENTS
    joint_lse_kernel: bool = True  # without a given lse, ask the CPU flash kernel for it (joint.image_lse)

    def record_joint(self, name: str, part: str, q: torch.Tensor, k: torch.Tensor, heads: int, *,
                     text: tuple[int, int], image: tuple[int, int], scale: float | None = None,
                     mask: torch.Tensor | None = None, skip_reshape: bool = False,
                     lse: torch.Tensor | None = None) -> None:
        """Accumulate one joint-attention call: image queries over text keys, softmax over all ``L`` keys.

        Parameters
        ----------
        name, part : str
            Layer id (its last integer is the block index for :attr:`RecordFilter.blocks`) and network part
            (``"double"``, ``"single"`` for Flux, ``"joint"`` for SD3).
        q, k : Tensor
            The joint sequence's queries and keys as the host's attention receives them (after RoPE):
            ``[B, L, heads * D]``, or ``[B, heads, L, D]`` with ``skip_reshape``; k may have fewer heads
            (grouped-query attention, ``repeat_interleave`` semantics).
        heads : int
            Query heads.
        text, image : (int, int)
            ``[start, stop)`` of the text tokens and of the generated image's tokens on the sequence axis.
        scale : float, optional
            Softmax scale, default ``D ** -0.5``.
        mask : Tensor, optional
            The host's additive or boolean (True = attend) mask: ``[L, L]``, ``[B, L, L]`` or
            ``[B or 1, H or 1, L, L]``.
        lse : Tensor ``[B, heads, L]``, optional
            Each query's log-sum-exp over all keys from a fused kernel (:meth:`attend_joint`); without it the
            normaliser is computed here, chunked.

        Records ``[streams, N_img, T]`` running sums; never builds an ``[L, L]`` tensor (peak extra memory:
        :func:`daam_core.engine.joint.workspace_bytes`).
        """
        if not self.wants(name, part) or not self._wants_block(name, part):
            return
        qh = joint.split_heads(q, heads, skip_reshape)
        kh = k if skip_reshape else joint.split_heads(k, k.shape[-1] // qh.shape[-1], False)
        length = qh.shape[2]
        t0, t1 = _range(text, length, "text")
        i0, i1 = _range(image, length, "image")
        if kh.shape[2] != length or kh.shape[-1] != qh.shape[-1] or qh.shape[1] % kh.shape[1]:
            raise ValueError(f"{name}: keys {tuple(kh.shape)} do not match queries {tuple(qh.shape)} "
                             f"(joint attention attends over the same sequence)")
        if self._layer(name, part, "joint", i1 - i0, qh.shape[1]) is None:
            return
        rows, streams = self._rows(q.device)
        all_rows = len(streams) == qh.shape[0] and self._identity_rows(rows, qh.shape[0])
        m4 = joint.mask_4d(mask)
        q_img = qh[:, :, i0:i1]
        if not all_rows:
            q_img, kh = q_img[rows], kh[rows]
            if m4 is not None and m4.shape[0] > 1:
                m4 = m4[rows]
            if lse is not None:
                lse = lse[rows]
        if self.filter.heads is not None:
            sel = self._heads(q.device)
            group = qh.shape[1] // kh.shape[1]
            q_img = q_img.index_select(1, sel)
            kh = kh.index_select(1, self._kv_heads(sel, group))
            if m4 is not None and m4.shape[1] > 1:
                m4 = m4.index_select(1, sel)
            if lse is not None:
                lse = lse.index_select(1, sel)
        if m4 is not None:
            m4 = m4[:, :, i0:i1]
        if lse is not None:
            lse = lse[:, :, i0:i1]
        plan = self._joint_plan(name, streams, t1 - t0, q.device)
        if plan is None:
            return
        acc = self._running_sum(name, i1 - i0, q.device)

        def emit(n0: int, n1: int, probs: torch.Tensor) -> None:
            for members, index, span, t, fold in plan:
                part_ = probs if members is None else probs.index_select(0, members)
                if fold > 1:
                    part_ = part_.view(part_.shape[0], part_.shape[1], fold, t).sum(dim=2)
                elif part_.shape[-1] != t:
                    part_ = part_[..., :t]
                if span is not None:  # consecutive streams: a plain add (index_add_ is slow on the CPU)
                    acc[span[0]:span[1], n0:n1, :t].add_(part_)
                else:
                    acc[:, n0:n1, :t].index_add_(0, index, part_)

        s = scale if scale is not None else 1.0 / math.sqrt(qh.shape[-1])
        if lse is None and self.joint_lse_kernel:
            lse = joint.image_lse(q_img, kh, s, m4)
        joint.joint_text_probs(q_img, kh, (t0, t1), s, emit, mask=m4, lse=lse,
                               chunk_elements=self.joint_chunk_elements)
        self._count_call(name)

    def attend_joint(self, name: str, part: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *,
                     text: tuple[int, int], image: tuple[int, int], reference, finish=None,
                     scale: float | None = None, mask: torch.Tensor | None = None,
                     skip_reshape: bool = False) -> torch.Tensor:
        """Run a joint-attention call whose host attention is PyTorch SDPA, and record it.

        The output is the host's own, bit for bit (:func:`daam_core.engine.joint.attention_with_lse`): a fused
        kernel that also returns the log-sum-exp replaces ``reference()`` only for input signatures where it was
        proven equal; then recording costs only the text-key scores.

        Parameters
        ----------
        q, k, v, heads, text, image, scale, mask, skip_reshape
            As in :meth:`record_joint` (v shaped like k).
        reference : callable
            Computes the host's attention output for this call (its own function, its own format).
        finish : callable, optional
            Turns the kernel's ``[B, H, L, D]`` output into the host's format.

        Notes
        -----
        Safe with any ``reference``: one whose output differs from the kernel's is simply always called (and the
        normaliser computed by :meth:`record_joint`). But a matched ``reference`` is *not called* afterwards, so
        use this only where the host's function is plain SDPA (ComfyUI's ``attention_pytorch``), never around
        another extension's attention override that must run.
        """
        if not self.wants(name, part) or not self._wants_block(name, part):
            return reference()
        qh = joint.split_heads(q, heads, skip_reshape)
        d = qh.shape[-1]
        kh = k if skip_reshape else joint.split_heads(k, k.shape[-1] // d, False)
        vh = v if skip_reshape else joint.split_heads(v, v.shape[-1] // d, False)
        out, lse = joint.attention_with_lse(qh, kh, vh, reference, finish=finish, scale=scale,
                                            mask=joint.mask_4d(mask))
        self.record_joint(name, part, qh, kh, qh.shape[1], text=text, image=image, scale=scale, mask=mask,
                          skip_reshape=True, lse=lse)
        return out

    def _wants_block(self, name: str, part: str) -> bool:
        key = ("block", name)
        hit = self._index_cache.get(key)
        if hit is None:
            hit = block_allowed(self.filter.blocks, name, part)
            self._index_cache[key] = hit
        return hit

    def _identity_rows(self, rows: torch.Tensor, batch: int) -> bool:
        key = ("identity", self._call.rows, batch)
        hit = self._index_cache.get(key)
        if hit is None:
            hit = tuple(i for i, s in enumerate(self._call.rows) if s is not None) == tuple(range(batch))
            self._index_cache[key] = hit
        return hit

    def _kv_heads(self, sel: torch.Tensor, group: int) -> torch.Tensor:
        key = ("kv_heads", group, sel.device)
        hit = self._index_cache.get(key)
        if hit is None:
            hit = torch.div(sel, group, rounding_mode="floor")
            self._index_cache[key] = hit
        return hit

    def _joint_plan(self, name: str, streams: tuple[int, ...], t_call: int, device):
        """Per token-count group of rows: (row index or None, stream index, consecutive stream span or None, T,
        copies to fold); None = skip."""
        key = ("joint_plan", streams, t_call, device)
        if key in self._index_cache:
            return self._index_cache[key]
        groups: dict[int, list[int]] = {}
        for j, s in enumerate(streams):
            groups.setdefault(self.token_counts[self.streams[s].prompt], []).append(j)
        plan = []
        for t, members in groups.items():
            if t_call % t == 0:
                fold = t_call // t
            elif t_call > t:
                fold = 1
                self._warn_once(f"{name}: {t_call} text tokens in the joint sequence, not a multiple of the "
                                f"prompt's {t}; extra tokens ignored")
            else:
                self._warn_once(f"{name}: {t_call} text tokens in the joint sequence, fewer than the prompt's {t}; "
                                f"call skipped")
                continue
            rows = None if len(members) == len(streams) else torch.tensor(members, dtype=torch.long, device=device)
            targets = [streams[j] for j in members]
            span = ((targets[0], targets[-1] + 1) if targets == list(range(targets[0], targets[0] + len(targets)))
                    else None)
            plan.append((rows, self._stream_index(streams, members, device), span, t, fold))
        plan = plan or None
        self._index_cache[key] = plan
        return plan

    def warn(self, msg: str) -> None:
        """Add ``msg`` to this sampling's warnings once (adapters and the recorder share this list)."""
        if msg not in self.warnings:
            self.warnings.append(msg)

    _warn_once = warn


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


def _range(r: tuple[int, int], length: int, what: str) -> tuple[int, int]:
    start, stop = int(r[0]), int(r[1])
    if not 0 <= start < stop <= length:
        raise ValueError(f"the {what} range [{start}, {stop}) is not inside the joint sequence of {length} tokens")
    return start, stop


def block_index(name: str) -> int | None:
    """The block index of a layer name: its last integer (``"single.12"`` -> 12), None without one."""
    found = re.findall(r"\d+", name)
    return int(found[-1]) if found else None


def block_allowed(blocks, name: str, part: str) -> bool:
    """Whether :attr:`RecordFilter.blocks` keeps layer ``name`` of ``part``."""
    if blocks is None:
        return True
    ranges = [(a, b) for p, a, b in blocks if p == part]
    if not ranges:
        return True
    i = block_index(name)
    return i is not None and any(a <= i < b for a, b in ranges)


def parse_blocks(spec: str) -> tuple[tuple[str, int, int], ...] | None:
    """``"double:0-9, single:10-37"`` -> ``(("double", 0, 10), ("single", 10, 38))`` (inclusive ranges as
    written; ``"single:5"`` is one block). An empty string gives None (all blocks)."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        part, sep, rng = item.partition(":")
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", rng)
        if not sep or part.strip() not in PARTS or m is None:
            raise ValueError(f"block range {item!r}: write part:start-end, e.g. 'single:0-9' (parts {PARTS})")
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) is not None else a
        if b < a:
            raise ValueError(f"block range {item!r}: end {b} is before start {a}")
        out.append((part.strip(), a, b + 1))
    return tuple(out) or None
