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

BRANCHES = ("cond", "uncond")
LOCATIONS = ("down", "mid", "up")


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
        Allowed spatial downsampling factors of a layer relative to the latent (1 = latent size;
        for SD1.5 at 512x512 the latent is 64x64, so factor 4 is the 16x16 layers). None = all.
    locations : tuple of str or None
        Allowed UNet parts among ``"down"``, ``"mid"``, ``"up"``. None = all.
    layers : tuple of str or None
        Allowed layer names (host ids). None = all.
    heads : tuple of int or None
        Attention heads to sum. None = all heads.
    start, end : float
        Time window as a fraction of the sampling, 0 = first (noisiest) step, 1 = the end.
        A model call at progress ``p`` is recorded when ``start <= p <= end``.
    branches : tuple of str
        Which CFG branches to record; drop ``"uncond"`` to skip negative-prompt maps.
    """

    factors: tuple[int, ...] | None = None
    locations: tuple[str, ...] | None = None
    layers: tuple[str, ...] | None = None
    heads: tuple[int, ...] | None = None
    start: float = 0.0
    end: float = 1.0
    branches: tuple[str, ...] = BRANCHES

    def __post_init__(self):
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"time window must satisfy 0 <= start <= end <= 1, got ({self.start}, {self.end})")
        if self.locations is not None:
            bad = set(self.locations) - set(LOCATIONS)
            if bad:
                raise ValueError(f"unknown UNet locations {sorted(bad)}; use {LOCATIONS}")
        bad = set(self.branches) - set(BRANCHES)
        if bad:
            raise ValueError(f"unknown branches {sorted(bad)}; use {BRANCHES}")
        if self.heads is not None and any(h < 0 for h in self.heads):
            raise ValueError("head indices must be >= 0")

    def in_window(self, progress: float) -> bool:
        return self.start <= progress <= self.end


@dataclass
class LayerInfo:
    """A cross-attention layer as seen during one sampling.

    Attributes
    ----------
    name : str
        Host id of the layer (diffusers module path, or ComfyUI ``block.index.transformer``).
    location : str
        ``"down"``, ``"mid"`` or ``"up"``.
    order : int
        Order of first call within a model forward pass.
    factor : int
        Spatial downsampling relative to the latent, found from the query length.
    hw : tuple of int
        Spatial shape ``(h, w)`` of the layer's queries.
    heads : int
        Number of attention heads of the layer.
    """

    name: str
    location: str
    order: int = 0
    factor: int = 1
    hw: tuple[int, int] = (0, 0)
    heads: int = 0


def downsampled(size: int, factor: int) -> int:
    """Size after ``log2(factor)`` stride-2 convolutions with padding 1 (a UNet downsample)."""
    while factor > 1:
        size = (size + 1) // 2
        factor //= 2
    return size


def spatial_shape(latent_hw: tuple[int, int], n_queries: int, max_factor: int = 64) -> tuple[int, tuple[int, int]]:
    """Find a layer's downsampling factor and spatial shape from its query count.

    The shape comes from the latent's real height and width, never from ``sqrt(N)``, so
    non-square and odd sizes work.

    Returns
    -------
    factor : int
    hw : (int, int)
    """
    h, w = latent_hw
    factor = 1
    while factor <= max_factor:
        hh, ww = downsampled(h, factor), downsampled(w, factor)
        if hh * ww == n_queries:
            return factor, (hh, ww)
        factor *= 2
    raise ValueError(f"a cross-attention call with {n_queries} queries does not fit a {h}x{w} latent "
                     f"at any power-of-two downsampling")


@dataclass
class _Call:
    """Per-model-call state set by the adapter (row layout and time window verdict)."""

    active: bool = False
    rows: tuple[int | None, ...] = ()


class CrossAttentionRecorder:
    """Running fp32 sums of head-summed cross-attention probabilities.

    Parameters
    ----------
    filter : RecordFilter, optional
        What to record.

    Notes
    -----
    Lifecycle: ``begin(latent_hw, streams, token_counts)`` once per sampling, ``set_call(rows, progress)``
    once per model call, ``record(layer, q, k, heads)`` per cross-attention call, ``finish()`` after
    sampling. ``finish`` returns the sums; the recorder can then be reused.
    """

    def __init__(self, filter: RecordFilter | None = None):
        self.filter = filter or RecordFilter()
        self.layers: dict[str, LayerInfo] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.streams: list[Stream] = []
        self.token_counts: list[int] = []
        self.latent_hw: tuple[int, int] = (0, 0)
        self.warnings: list[str] = []
        self._call = _Call()
        self._enabled: dict[str, bool] = {}
        self._row_index: dict[tuple, tuple] = {}
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------
    def begin(self, latent_hw: tuple[int, int], streams: Sequence[Stream], token_counts: Sequence[int]) -> None:
        """Start a sampling: forget previous sums and fix the stream list.

        Parameters
        ----------
        latent_hw : (int, int)
            Height and width of the latent the model denoises.
        streams : sequence of Stream
            Every (image, branch) the adapter may route batch rows to; stream ``i`` is index ``i``.
        token_counts : sequence of int
            Token count of each prompt layout (``Stream.prompt`` indexes it); a call whose key length is a
            multiple of it (ComfyUI repeats shorter conditionings to a common length) is folded back.
        """
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
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
        self._row_index.clear()
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
        self._call = _Call(active=active, rows=wanted)

    def skip_call(self) -> None:
        """Record nothing until the next ``set_call`` (e.g. a model call the adapter cannot map)."""
        self._call = _Call()

    @property
    def active(self) -> bool:
        """Whether the current model call is being recorded (cheap check for adapters)."""
        return self._call.active

    def finish(self) -> dict:
        """End the sampling and hand over the sums (the recorder forgets them)."""
        out = dict(layers=dict(self.layers), sums=dict(self.sums), calls=dict(self.calls),
                   streams=list(self.streams), token_counts=list(self.token_counts),
                   latent_hw=self.latent_hw, warnings=list(self.warnings))
        self.sums = {}
        self.layers = {}
        self.calls = {}
        self._started = False
        self._call = _Call()
        return out

    # -- hot path ----------------------------------------------------------------------------
    def wants(self, name: str, location: str) -> bool:
        """Whether a layer passes the name/location filters (the factor is checked on first call)."""
        if not self._call.active:
            return False
        enabled = self._enabled.get(name)
        if enabled is None:
            f = self.filter
            enabled = ((f.layers is None or name in f.layers) and
                       (f.locations is None or location in f.locations))
            self._enabled[name] = enabled
        return enabled

    def record(self, name: str, location: str, q: torch.Tensor, k: torch.Tensor, heads: int,
               scale: float | None = None, skip_reshape: bool = False) -> None:
        """Accumulate one cross-attention call.

        Parameters
        ----------
        name, location : str
            Layer id and UNet part (``"down"``, ``"mid"``, ``"up"``).
        q : Tensor
            Queries ``[B, N, heads * d]`` (or ``[B, heads, N, d]`` with ``skip_reshape``).
        k : Tensor
            Keys ``[B, T, heads * d]`` (or ``[B, heads, T, d]`` with ``skip_reshape``).
        heads : int
            Number of heads.
        scale : float, optional
            Softmax scale, default ``d ** -0.5``.
        """
        if not self.wants(name, location):
            return
        layer = self.layers.get(name)
        n = q.shape[2] if skip_reshape else q.shape[1]
        if layer is None:
            try:
                factor, hw = spatial_shape(self.latent_hw, n)
            except ValueError as e:  # e.g. an area-restricted conditioning: not the full latent
                self._enabled[name] = False
                self.warnings.append(f"{name}: {e}; layer skipped")
                return
            f = self.filter.factors
            if f is not None and factor not in f:
                self._enabled[name] = False
                return
            layer = LayerInfo(name=name, location=location, order=len(self.layers), factor=factor, hw=hw, heads=heads)
            self.layers[name] = layer
        elif n != layer.hw[0] * layer.hw[1]:
            self.warnings.append(f"{name}: a call with {n} queries does not match the layer's {layer.hw}; call skipped")
            return

        rows, streams = self._rows(q.device)
        if skip_reshape:
            qs, ks = q[rows], k[rows]
        else:
            b = len(streams)
            qs = q[rows].view(b, n, heads, -1).transpose(1, 2)
            ks = k[rows].view(b, k.shape[1], heads, -1).transpose(1, 2)
        if self.filter.heads is not None:
            sel = [h for h in self.filter.heads if h < heads]
            qs, ks = qs[:, sel], ks[:, sel]
        d = qs.shape[-1]
        scores = torch.matmul(qs.float(), ks.float().transpose(-1, -2))
        scores.mul_(scale if scale is not None else 1.0 / math.sqrt(d))
        probs = scores.softmax(dim=-1).sum(dim=1)  # [rows, N, T_call]
        self._accumulate(name, probs, streams)
        self.calls[name] = self.calls.get(name, 0) + 1

    def _rows(self, device: torch.device) -> tuple[torch.Tensor, tuple[int, ...]]:
        key = (self._call.rows, device)
        hit = self._row_index.get(key)
        if hit is None:
            pairs = [(i, s) for i, s in enumerate(self._call.rows) if s is not None]
            idx = torch.tensor([i for i, _ in pairs], dtype=torch.long, device=device)
            hit = (idx, tuple(s for _, s in pairs))
            self._row_index[key] = hit
        return hit

    def _accumulate(self, name: str, probs: torch.Tensor, streams: tuple[int, ...]) -> None:
        t_call = probs.shape[-1]
        acc = self.sums.get(name)
        if acc is None:
            acc = torch.zeros(len(self.streams), probs.shape[1], max(self.token_counts),
                              dtype=torch.float32, device=probs.device)
            self.sums[name] = acc
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
        hit = self._row_index.get(key)
        if hit is None:
            hit = torch.tensor([streams[j] for j in members], dtype=torch.long, device=device)
            self._row_index[key] = hit
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
