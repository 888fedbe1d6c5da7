"""Streaming accumulation of image->text attention probabilities (UNet cross-attention, joint attention).

A host adapter tells the recorder when a sampling begins (latent size, which image/branch each
batch row belongs to), whether the current model call is inside the time window, and hands it the
query and key of every cross-attention call. The recorder keeps one fp32 running sum per layer of
shape ``[streams, N_layer, T]``; its memory does not depend on the number of steps.

Both kinds of call go through one plan (:meth:`AttentionRecorder._plan`, cached per row layout and key
count: rows, streams, token groups, context copies) and one accumulation (:meth:`AttentionRecorder._accumulate`):
on CUDA one Triton launch per call (:mod:`daam_core.engine.kernels`), elsewhere the torch path in reused work
buffers. No host synchronisation happens on the hot path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch

from . import joint, kernels
from .geometry import LayerInfo, UNetGrid, is_power_of_two
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
        Allowed parts of the network (UNet ``"down"``, ``"mid"``, ``"up"``; a transformer family's, e.g. Flux
        ``"double"``, ``"single"``). None = all. Checked against the parts the adapter's grid declares at
        :meth:`AttentionRecorder.begin`.
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
        ``[start, stop)``; a part with no range is kept whole. None = all. See
        :func:`daam_core.hosts.contract.parse_blocks`.
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
        if self.parts is not None and (not self.parts or not all(isinstance(p, str) and p for p in self.parts)):
            raise ValueError(f"network parts must be a non-empty list of part names, got {self.parts!r}")
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
                if (len(r) != 3 or not isinstance(r[0], str) or not all(isinstance(x, int) for x in r[1:])
                        or not 0 <= r[1] < r[2]):
                    raise ValueError(f"block range {r!r} must be (part, start, stop) with 0 <= start < stop")

    def check_parts(self, parts: Sequence[str]) -> None:
        """Raise when :attr:`parts` or :attr:`blocks` name a part the model does not have (``parts``: its parts)."""
        asked = set(self.parts or ()) | {r[0] for r in self.blocks or ()}
        bad = sorted(asked - set(parts))
        if bad:
            raise ValueError(f"unknown network parts {bad}: this model's parts are {list(parts)}")

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
    frames : int
        Frames of a video grid (its layers' queries are the frames stacked); 1 for an image.
    extras : dict
        The refinements' sums (:meth:`daam_core.engine.refine.RefineSums.finish`); empty unless asked for.
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
    frames: int = 1
    extras: dict = field(default_factory=dict)


@dataclass
class _Call:
    """Per-model-call state set by the adapter (row layout and time window verdict)."""

    active: bool = False
    rows: tuple[int | None, ...] = ()
    bucket: int = 0  # time bucket of the call (RecordFilter.time_buckets)


@dataclass(frozen=True)
class _Plan:
    """What to do with a call's rows and text keys, cached per (row layout, text key count, device).

    Attributes
    ----------
    rows : Tensor or None
        Batch rows to gather for the torch path (None: all rows, in order: no gather).
    groups : tuple of kernels.Group
        Per prompt token count: which gathered rows, their streams, tokens and context copies (torch path).
    table : kernels.Table
        The same per row for the Triton kernel (batch row, stream, tokens, copies; int32 on the device).
    warnings : tuple of str
        What had to be cut.
    """

    rows: torch.Tensor | None
    groups: tuple
    table: object
    warnings: tuple[str, ...] = ()


class AttentionRecorder:
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
        self.extra = None  # optional refine.RefineSums: self-attention and per-head sums, set by the adapter

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.grid.latent_hw

    # -- lifecycle ---------------------------------------------------------------------------
    def begin(self, grid, streams: Sequence[Stream], token_counts: Sequence[int]) -> None:
        """Start a sampling: forget previous sums and fix the stream list.

        Parameters
        ----------
        grid : UNetGrid, PatchGrid or (int, int)
            The adapter's grid rule for this sampling's layers (a latent ``(h, w)`` means a UNet); the filter's
            parts are checked against the parts it declares.
        streams : sequence of Stream
            Every (image, branch) the adapter may route batch rows to; stream ``i`` is index ``i``.
        token_counts : sequence of int
            Token count of each prompt layout (``Stream.prompt`` indexes it); a call whose key length is a
            multiple of it (ComfyUI repeats shorter conditionings to a common length) is folded back.
        """
        self.grid = UNetGrid(grid) if isinstance(grid, (tuple, list)) else grid
        if getattr(self.grid, "parts", None) is not None:
            self.filter.check_parts(self.grid.parts)
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
        if self.extra is not None:
            self.extra.begin()

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
                        time_calls={n: list(c) for n, c in self._time_calls.items()} if timed else {},
                        frames=int(getattr(self.grid, "frames", 1)),
                        extras=self.extra.finish() if self.extra is not None else {})
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

    # -- one plan, one accumulation for both kinds of call ------------------------------------------------
    kernel: str = "auto"  # "auto": Triton on CUDA when importable, else torch; "torch"; "triton" (CPU: interpreter)
    joint_chunk_elements: int = joint.DEFAULT_CHUNK_ELEMENTS  # fp32 scores per chunk of the torch path
    joint_lse_kernel: bool = True  # torch path, joint call without lse: ask the CPU flash kernel (joint.image_lse)
    scratch_allocations: int = 0  # work buffers made so far (a warmed-up call makes none)

    def record(self, name: str, part: str, q: torch.Tensor, k: torch.Tensor, heads: int,
               scale: float | None = None, mask: torch.Tensor | None = None) -> None:
        """Accumulate one cross-attention call.

        Parameters
        ----------
        name, part : str
            Layer id and network part (``"down"``, ``"mid"``, ``"up"`` for a UNet); a transformer's layer is also
            checked against :attr:`RecordFilter.blocks`.
        q : Tensor
            Queries ``[B, N, heads * d]`` or ``[B, heads, N, d]`` (:func:`~daam_core.engine.joint.heads_first`).
        k : Tensor
            Keys ``[B, T, kv_heads * d]`` or ``[B, kv_heads, T, d]``; grouped-query
            attention has fewer key heads than query heads (query head ``h`` reads key head
            ``h // (heads / kv_heads)``, as ``repeat_interleave`` lays them out).
        heads : int
            Number of query heads.
        scale : float, optional
            Softmax scale, default ``d ** -0.5``.
        mask : Tensor, optional
            The host's additive or boolean (True = attend) mask over the keys (a padded text's): ``[T]``-wide rows
            as ComfyUI takes them, ``[N or 1, T]``, ``[B, N or 1, T]`` or ``[B or 1, H or 1, N or 1, T]``.

        Notes
        -----
        The softmax is over the ``T`` keys; the call goes through :meth:`_accumulate` like a joint one (text =
        all keys, normaliser computed there).
        """
        if not self.wants(name, part) or not self._wants_block(name, part):
            return
        qh = joint.heads_first(q, heads)
        if self._layer(name, part, "cross", qh.shape[2], heads) is None:
            return
        kh = joint.heads_first(k, head_dim=qh.shape[-1])
        if kh.shape[-1] != qh.shape[-1] or qh.shape[1] % kh.shape[1]:
            raise ValueError(f"{name}: keys {tuple(kh.shape)} do not match queries {tuple(qh.shape)}")
        m4 = joint.mask_4d(mask)
        if m4 is not None:  # one row for every query: a broadcast view, never copied here
            if m4.shape[-1] != kh.shape[2] or m4.shape[2] not in (1, qh.shape[2]):
                raise ValueError(f"{name}: attention mask {tuple(mask.shape)} does not fit {qh.shape[2]} queries "
                                 f"over {kh.shape[2]} keys")
            m4 = m4.expand(m4.shape[0], m4.shape[1], qh.shape[2], m4.shape[3])
        self._accumulate(name, qh, kh, (0, kh.shape[2]), scale, mask=m4)
        if self.extra is not None and name in self.calls:
            self.extra.record_heads(self, name, qh, kh, scale, mask=m4)

    def _accumulate(self, name: str, q: torch.Tensor, k: torch.Tensor, text: tuple[int, int],
                    scale: float | None, mask: torch.Tensor | None = None, lse: torch.Tensor | None = None) -> None:
        """Add one call's head-summed probabilities ``[streams, N, T]`` into the layer's running sum.

        Parameters
        ----------
        q : Tensor ``[B, H, N, D]``
            The recorded queries (all batch rows and heads of the call, any strides).
        k : Tensor ``[B, Hk, L, D]``
            All keys; ``H`` a multiple of ``Hk``.
        text : (int, int)
            The text keys ``[start, stop)`` on the key axis (cross-attention: all of them).
        scale : float or None
            Softmax scale (None: ``D ** -0.5``).
        mask : Tensor ``[B or 1, H or 1, N, L]``, optional
            Additive or boolean (True = attend) mask rows of the recorded queries.
        lse : Tensor ``[B, H, N]``, optional
            The queries' log-sum-exp over all ``L`` keys; without it the softmax is taken over all keys here.

        Triton on CUDA (:func:`~daam_core.engine.kernels.record_triton`, one launch), the torch path elsewhere.
        """
        plan = self._plan(name, text[1] - text[0], q.device)
        if plan is None:
            return
        for msg in plan.warnings:
            self.warn(f"{name}: {msg}")
        s = scale if scale is not None else q.shape[-1] ** -0.5
        acc = self._running_sum(name, q.shape[2], q.device)
        if not (kernels.usable(q, k, self.kernel) and self._triton(plan, acc, q, k, text, s, mask, lse)):
            self._accumulate_torch(plan, acc, q, k, text, s, mask, lse)
        self._count_call(name)

    def _triton(self, plan: "_Plan", acc, q, k, text, scale, mask, lse) -> bool:
        """The CUDA path of :meth:`_accumulate`; False (and the torch path from then on, with a warning) when the
        kernel cannot be compiled or launched here: recording must never break the host's sampling."""
        try:
            kernels.record_triton(q, k, acc, plan.table, self._head_table(q.shape[1], q.device), scale, text,
                                  normaliser=None if lse is not None else (0, k.shape[2]), lse=lse, mask=mask,
                                  lse_buffer=lambda shape: self._scratch("lse", shape, q.device))
            return True
        except Exception as e:  # noqa: BLE001 - a compiler or driver error of any kind; raised before any write
            self.kernel = "torch"
            self.warn(f"the Triton recording kernel failed ({type(e).__name__}: {e}); the torch path records "
                            f"instead")
            return False

    def _accumulate_torch(self, plan: "_Plan", acc, q, k, text, scale, mask, lse) -> None:
        """The CPU path of :meth:`_accumulate`: gather the recorded rows and heads into fp32 work buffers, score
        chunks of queries (:func:`~daam_core.engine.kernels.record_torch`), add each into the running sum."""
        heads = self._heads(q.device) if self.filter.heads is not None else None
        rows = plan.rows
        t0, t1 = text
        kv_heads = None if heads is None else self._kv_heads(heads, q.shape[1] // k.shape[1])
        q = self._gather("q", q, rows, heads)
        if lse is not None:
            lse = self._gather("lse", lse, rows, heads)
        full = (t0, t1) == (0, k.shape[2])
        if lse is None and not full and self.joint_lse_kernel:
            k_all = self._gather("k", k, rows, kv_heads)
            m = self._gather_mask(mask, rows, heads)
            lse = joint.image_lse(q, k_all, scale, m)
            k = k_all[:, :, t0:t1] if lse is not None else k_all
        else:
            k = self._gather("k", k if (lse is None or full) else k[:, :, t0:t1], rows, kv_heads)
        if lse is not None and mask is not None:
            mask = mask[..., t0:t1]
        mask = self._gather_mask(mask, rows, heads)
        work = lambda role, shape: self._scratch(role, shape, q.device)  # noqa: E731
        kf = kernels.operand(k.transpose(-1, -2), work, "k32")
        span = (0, t1 - t0) if (lse is not None or full) else text
        chunk = (self.joint_chunk_elements if not full else
                 max(self.joint_chunk_elements, q.shape[0] * q.shape[1] * q.shape[2] * kf.shape[-1]))
        groups = plan.groups

        def emit(n0: int, n1: int, probs: torch.Tensor) -> None:
            for g in groups:
                part = probs if g.select is None else probs.index_select(0, g.select)
                width = g.tokens * g.fold
                if part.shape[-1] != width:
                    part = part[..., :width]  # keys past the prompt's copies: normaliser only
                if g.fold > 1:
                    part = part.reshape(part.shape[0], part.shape[1], g.fold, g.tokens).sum(dim=2)
                dest = acc[:, n0:n1] if (n0, n1) != (0, acc.shape[1]) else acc
                dest = dest if g.tokens == acc.shape[-1] else dest[..., :g.tokens]
                if g.span is not None:  # consecutive streams: a plain add (index_add_ is slow on the CPU)
                    dest[g.span[0]:g.span[1]].add_(part)
                else:
                    dest.index_add_(0, g.target, part)

        kernels.record_torch(q, kf, scale, span, emit, work, lse=lse, mask=mask, chunk_elements=chunk)

    def _scratch(self, role: str, shape: tuple[int, ...], device: torch.device,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A reused work buffer (calls of one shape share it; on the CPU this saves the page faults of a fresh
        allocation per call, on CUDA the allocator's work). Dropped by ``begin`` and ``finish``."""
        key = (role, tuple(shape), device, dtype)
        buf = self._buffers.get(key)
        if buf is None:
            buf = torch.empty(shape, dtype=dtype, device=device)
            self._buffers[key] = buf
            self.scratch_allocations += 1
        return buf

    def _gather(self, role: str, x: torch.Tensor, rows: torch.Tensor | None, heads: torch.Tensor | None):
        """``x [B, H, ...]`` restricted to the recorded batch rows and heads (a work buffer; ``x`` itself when
        both are None)."""
        if rows is not None:
            x = torch.index_select(x, 0, rows, out=self._scratch(role + ".rows", (rows.shape[0],) + x.shape[1:],
                                                                 x.device, x.dtype))
        if heads is not None:
            x = torch.index_select(x, 1, heads, out=self._scratch(
                role + ".heads", (x.shape[0], heads.shape[0]) + x.shape[2:], x.device, x.dtype))
        return x

    def _gather_mask(self, mask, rows, heads):
        if mask is None:
            return None
        if rows is not None and mask.shape[0] > 1:
            mask = self._gather("mask", mask, rows, None)
        if heads is not None and mask.shape[1] > 1:
            mask = self._gather("mask", mask, None, heads)
        return mask

    def _heads(self, device: torch.device) -> torch.Tensor:
        key = ("heads", device)
        hit = self._index_cache.get(key)
        if hit is None:
            hit = torch.tensor(self.filter.heads, dtype=torch.long, device=device)
            self._index_cache[key] = hit
        return hit

    def _head_table(self, heads: int, device: torch.device) -> torch.Tensor:
        """The kernel's head list, int32: the filter's heads or all ``heads``."""
        key = ("head_table", heads, device)
        hit = self._index_cache.get(key)
        if hit is None:
            hit = torch.tensor(self.filter.heads if self.filter.heads is not None else range(heads),
                               dtype=torch.int32, device=device)
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

    def _plan(self, name: str, t_call: int, device: torch.device) -> "_Plan | None":
        """What to do with a call's rows and text keys, worked out once per (row layout, text key count,
        device); None when no row can be recorded (the reason is in ``self.warnings``)."""
        key = ("plan", self._call.rows, t_call, device)
        if key in self._index_cache:
            plan = self._index_cache[key]
            if plan is None:
                self.warn(f"{name}: {self._index_cache[key + ('why',)]}")
            return plan
        idx, streams = self._rows(device)
        all_rows = len(streams) == len(self._call.rows)
        batch_rows = [i for i, s in enumerate(self._call.rows) if s is not None]  # host ints: no device read
        by_tokens: dict[int, list[int]] = {}  # recorded rows grouped by their prompt's token count; usually one
        for j, s in enumerate(streams):
            by_tokens.setdefault(self.token_counts[self.streams[s].prompt], []).append(j)
        groups, warnings, kept = [], [], []
        for t, members in by_tokens.items():
            if t_call % t == 0:
                fold = t_call // t  # > 1: the host repeated the context to a common length; fold the copies
            elif t_call > t:
                fold = 1  # extra keys appended (another extension, a longer joint text): keep the prompt's
                warnings.append(f"key length {t_call} is not a multiple of the prompt's {t} tokens; extra keys "
                                f"ignored")
            else:
                warnings.append(f"key length {t_call} is shorter than the prompt's {t} tokens; call skipped")
                continue
            targets = [streams[j] for j in members]
            span = ((targets[0], targets[-1] + 1) if targets == list(range(targets[0], targets[0] + len(targets)))
                    else None)
            select = None if len(members) == len(streams) else torch.tensor(members, dtype=torch.long, device=device)
            groups.append(kernels.Group(select, torch.tensor(targets, dtype=torch.long, device=device), span, t, fold))
            kept += [(batch_rows[j], streams[j], t, fold) for j in members]
        if not groups:
            self._index_cache[key] = None
            self._index_cache[key + ("why",)] = warnings[-1]
            self.warn(f"{name}: {warnings[-1]}")
            return None
        table = kernels.Table.build(*zip(*kept), device=device)
        plan = _Plan(rows=None if all_rows else idx, groups=tuple(groups), table=table, warnings=tuple(warnings))
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

    # -- joint attention (SD3, Flux): see daam_core.engine.joint ---------------------------------

    def record_joint(self, name: str, part: str, q: torch.Tensor, k: torch.Tensor, heads: int, *,
                     text: tuple[int, int], image: tuple[int, int], scale: float | None = None,
                     mask: torch.Tensor | None = None, lse: torch.Tensor | None = None) -> None:
        """Accumulate one joint-attention call: image queries over text keys, softmax over all ``L`` keys.

        Parameters
        ----------
        name, part : str
            Layer id (its last integer is the block index for :attr:`RecordFilter.blocks`) and network part
            (``"double"``, ``"single"`` for Flux, ``"joint"`` for SD3).
        q, k : Tensor
            The joint sequence's queries and keys as the host's attention receives them (after RoPE):
            ``[B, L, heads * D]`` or ``[B, heads, L, D]``; k may have fewer heads
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
            normaliser is computed here (Triton: a fused pass over the keys without V; torch: chunked).

        Records ``[streams, N_img, T]`` running sums; never builds an ``[L, L]`` tensor (peak extra memory of the
        torch path: :func:`daam_core.engine.joint.workspace_bytes`).
        """
        if not self.wants(name, part) or not self._wants_block(name, part):
            return
        qh = joint.heads_first(q, heads)
        kh = joint.heads_first(k, head_dim=qh.shape[-1])
        length = qh.shape[2]
        t0, t1 = _range(text, length, "text")
        i0, i1 = _range(image, length, "image")
        if kh.shape[2] != length or kh.shape[-1] != qh.shape[-1] or qh.shape[1] % kh.shape[1]:
            raise ValueError(f"{name}: keys {tuple(kh.shape)} do not match queries {tuple(qh.shape)} "
                             f"(joint attention attends over the same sequence)")
        if self._layer(name, part, "joint", i1 - i0, qh.shape[1]) is None:
            return
        m4 = joint.mask_4d(mask)
        if m4 is not None and m4.shape[2] == 1:  # one key mask for every query (HunyuanVideo's): a broadcast view
            m4 = m4.expand(m4.shape[0], m4.shape[1], length, m4.shape[3])
        self._accumulate(name, qh[:, :, i0:i1], kh, (t0, t1), scale,
                         mask=None if m4 is None else m4[:, :, i0:i1],
                         lse=None if lse is None else lse[:, :, i0:i1])

    def attend_joint(self, name: str, part: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *,
                     text: tuple[int, int], image: tuple[int, int], reference, finish=None,
                     scale: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run a joint-attention call whose host attention is PyTorch SDPA, and record it.

        The output is the host's own, bit for bit (:func:`daam_core.engine.joint.attention_with_lse`): of the
        fused kernels that also return the log-sum-exp, the one whose output equals ``reference()`` for this input
        signature replaces it (asked once per signature, never guessed); then recording costs only the text-key
        scores.

        Parameters
        ----------
        q, k, v, heads, text, image, scale, mask
            As in :meth:`record_joint` (v laid out like k).
        reference : callable
            Computes the host's attention output for this call (its own function, its own format).
        finish : callable, optional
            Turns the kernel's ``[B, H, L, D]`` output into the host's format.

        Notes
        -----
        Safe with any ``reference``: one whose output no kernel reproduces is simply always called (and the
        normaliser computed by :meth:`record_joint`). But a matched ``reference`` is *not called* afterwards, so
        use this only where the host's function is plain SDPA (ComfyUI's ``attention_pytorch``), never around
        another extension's attention override that must run.
        """
        if not self.wants(name, part) or not self._wants_block(name, part):
            return reference()
        qh = joint.heads_first(q, heads)
        d = qh.shape[-1]
        kh = joint.heads_first(k, head_dim=d)
        vh = joint.heads_first(v, head_dim=d)
        out, lse = joint.attention_with_lse(qh, kh, vh, reference, finish=finish, scale=scale,
                                            mask=joint.mask_4d(mask))
        self.record_joint(name, part, qh, kh, qh.shape[1], text=text, image=image, scale=scale, mask=mask, lse=lse)
        return out

    def _wants_block(self, name: str, part: str) -> bool:
        key = ("block", name)
        hit = self._index_cache.get(key)
        if hit is None:
            hit = block_allowed(self.filter.blocks, name, part)
            self._index_cache[key] = hit
        return hit

    def _kv_heads(self, sel: torch.Tensor, group: int) -> torch.Tensor:
        key = ("kv_heads", group, sel.device)
        hit = self._index_cache.get(key)
        if hit is None:
            hit = torch.div(sel, group, rounding_mode="floor")
            self._index_cache[key] = hit
        return hit

    def warn(self, msg: str) -> None:
        """Add ``msg`` to this sampling's warnings once (adapters and the recorder share this list)."""
        if msg not in self.warnings:
            self.warnings.append(msg)



CrossAttentionRecorder = AttentionRecorder  # its former name (it records joint attention too)


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
