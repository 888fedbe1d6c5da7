"""Training-free refinements of DAAM word maps, recorded beside the cross-attention sums.

Optional running sums, all flat in the number of steps and all recorded by the adapter's hooks:

- **self-attention sums** ``[streams, N, N]`` per layer *resolution* (the layers of one resolution share one sum):
  head-summed image self-attention probabilities, recorded only where ``N <= max_queries``. Word maps are then
  propagated ``map <- A^k map`` with ``A`` the row-normalised sum (a pixel takes the mean of the map over the pixels
  it attends to). Memory: ``4 * streams * N^2`` bytes per resolution (:func:`self_attention_bytes`).
- **per-head sums** ``[streams, heads, N, T]`` per cross-attention layer, so that each head can be weighted by how
  concentrated its own map is (:func:`head_weights`). Memory: ``heads`` times the plain sums
  (:func:`head_sum_bytes`).
- **output-similarity sums** ``[streams, N, T]`` per joint-attention layer (SD3, Flux and the other families that
  attend over text and image together): the softmax over the prompt's text tokens of ``o_i . o_t / sqrt(C)``, the
  scaled dot products of the attention's *outputs* (``C`` channels: heads concatenated, before the output
  projection) of image token ``i`` and text token ``t``; ConceptAttention's output-space maps (Helbling et al., ICML 2025) with the prompt's own
  tokens as the concepts, so no token is added and the image is untouched. Text keys the host masks out for the
  image queries are left out. Memory: as the plain sums.

All are exact: the self-attention sum is the softmax of the module's own ``q k^T * scale`` (fp32, every head,
every recorded call), and the per-head sums add up over heads to the plain sums. Nothing here changes what the
host computes; the hooks only read q and k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from . import aggregate

DEFAULT_MAX_QUERIES = 1024  # 32x32 = 4 MiB per stream per resolution; SD1.5 at 512 (64x64 latent): 32x32 and below
CHUNK_SCORES = 1 << 22  # fp32 scores per chunk of queries (16 MiB of work memory)


@dataclass(frozen=True)
class RefineRecording:
    """What to record for the refinements (off by default).

    Attributes
    ----------
    self_attention : bool
        Keep self-attention sums at the resolutions with at most ``max_queries`` image tokens.
    max_queries : int
        The largest resolution (``h * w``) whose self-attention is kept.
    head_sums : bool
        Keep per-head cross-attention sums (UNet cross-attention; not joint attention), of every head whatever
        ``RecordFilter.heads`` says.
    output_similarity : bool
        Keep output-similarity sums (joint attention only; see the module's notes).
    """

    self_attention: bool = False
    max_queries: int = DEFAULT_MAX_QUERIES
    head_sums: bool = False
    output_similarity: bool = False

    def __post_init__(self):
        if self.max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {self.max_queries}")

    @property
    def any(self) -> bool:
        return self.self_attention or self.head_sums or self.output_similarity

    @property
    def unet_only(self) -> bool:
        """Asks for sums only UNet cross-attention has (self-attention, per-head)."""
        return self.self_attention or self.head_sums


def self_attention_bytes(streams: int, resolutions: Sequence[tuple[int, int]], max_queries: int = DEFAULT_MAX_QUERIES
                         ) -> int:
    """Bytes of the self-attention sums: ``4 * streams * N^2`` for each resolution with ``N <= max_queries``."""
    return sum(4 * streams * (h * w) ** 2 for h, w in set(map(tuple, resolutions)) if h * w <= max_queries)


def head_sum_bytes(streams: int, layers: Sequence[tuple[int, int, int]], tokens: int) -> int:
    """Bytes of the per-head sums: ``4 * streams * heads * N * T`` over ``layers`` given as ``(h, w, heads)``."""
    return sum(4 * streams * heads * h * w * tokens for h, w, heads in layers)


def resolution_key(hw: tuple[int, int]) -> str:
    return f"{hw[0]}x{hw[1]}"


@dataclass
class RefineSums:
    """The recorder's extra running sums for one sampling (``AttentionRecorder.extra``).

    The adapter calls :meth:`record_self` from its self-attention hooks; the recorder calls :meth:`record_heads`
    after each cross-attention call it records. Both read the recorder's current call (active, rows -> streams).
    """

    options: RefineRecording
    self_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    self_calls: dict[str, int] = field(default_factory=dict)
    head_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    output_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    output_calls: dict[str, int] = field(default_factory=dict)
    _where: dict[int, tuple | None] = field(default_factory=dict)
    _targets: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def begin(self) -> None:
        self.self_sums, self.self_calls, self.head_sums = {}, {}, {}
        self.output_sums, self.output_calls = {}, {}
        self._where.clear()
        self._targets.clear()

    def finish(self) -> dict:
        out = {"self_sums": self.self_sums, "self_calls": self.self_calls, "head_sums": self.head_sums,
               "output_sums": self.output_sums, "output_calls": self.output_calls}
        self.begin()
        return out

    def _streams(self, rec, device) -> tuple[torch.Tensor | None, torch.Tensor, tuple[int, ...]]:
        """(batch rows to gather or None for all, their streams as an index, the same on the host) of the
        recorder's call; cached per row layout (no device read)."""
        key = (rec._call.rows, device)
        hit = self._targets.get(key)
        if hit is None:
            idx, streams = rec._rows(device)
            rows = None if len(streams) == len(rec._call.rows) else idx
            hit = (rows, torch.tensor(streams, dtype=torch.long, device=device), tuple(streams))
            self._targets[key] = hit
        return hit

    def _recorded(self, rec, q: torch.Tensor, k: torch.Tensor):
        """``(q, k, streams as an index, the same on the host)`` of the call's recorded batch rows, None when no row
        is recorded."""
        rows, targets, streams = self._streams(rec, q.device)
        if not streams:
            return None
        if rows is not None:
            q, k = q.index_select(0, rows), k.index_select(0, rows)
        return q, k, targets, streams

    # -- self-attention --------------------------------------------------------------------------
    def record_self(self, rec, part: str, q: torch.Tensor, k: torch.Tensor, heads: int,
                    scale: float | None = None) -> None:
        """Add one self-attention call's head-summed probabilities ``softmax(q k^T * scale)``.

        ``q``, ``k``: ``[B, N, heads * d]`` (k may have fewer heads: grouped-query attention). Skipped unless the
        recorder's call is active, the part passes its filter and ``N`` is a recorded resolution.
        """
        if not (self.options.self_attention and rec._call.active):
            return
        f = rec.filter
        if f.parts is not None and part not in f.parts:
            return
        n = q.shape[1]
        where = self._where.get(n, False)
        if where is False:
            where = None
            if n <= self.options.max_queries:
                try:
                    factor, hw = rec.grid.locate(n)
                    if f.factors is None or factor in f.factors:
                        where = resolution_key(hw)
                except ValueError:
                    pass
            self._where[n] = where
        if where is None:
            return
        got = self._recorded(rec, q, k)
        if got is None:
            return
        q, k, targets, _ = got
        qh = q.unflatten(-1, (heads, -1)).transpose(1, 2).float()  # [B, H, N, d]
        kh = k.unflatten(-1, (-1, qh.shape[-1])).transpose(1, 2).float()
        if kh.shape[1] != heads:
            kh = kh.repeat_interleave(heads // kh.shape[1], dim=1)
        s = scale if scale is not None else qh.shape[-1] ** -0.5
        acc = self.self_sums.get(where)
        if acc is None:
            acc = self.self_sums[where] = torch.zeros(len(rec.streams), n, kh.shape[2], dtype=torch.float32,
                                                      device=q.device)
        kt = kh.transpose(-1, -2)
        step = max(1, CHUNK_SCORES // max(1, qh.shape[0] * heads * kh.shape[2]))
        for a in range(0, n, step):
            b = min(n, a + step)
            p = torch.softmax(torch.matmul(qh[:, :, a:b], kt).mul_(s), dim=-1).sum(1)  # [B, b-a, N]
            acc[:, a:b].index_add_(0, targets, p)
        self.self_calls[where] = self.self_calls.get(where, 0) + 1

    # -- output similarity (joint attention) ------------------------------------------------------
    def record_output(self, rec, name: str, part: str, out: torch.Tensor, text: tuple[int, int],
                      image: tuple[int, int], mask: torch.Tensor | None = None) -> None:
        """Add one joint-attention call's output-similarity probabilities ``softmax_t(o_i . o_t / sqrt(C))``.

        Parameters
        ----------
        out : Tensor ``[B, L, C]``
            The call's attention output (heads concatenated, ``C = heads * d``), as the host returned it.
        text, image : (int, int)
            ``[start, stop)`` of the text and of the generated image on the sequence axis.
        mask : Tensor, optional
            The call's mask (:func:`~daam_core.engine.joint.mask_4d` forms): text keys that the first image query
            may not attend (False or -inf) are left out of the softmax.

        Skipped unless the recorder records this layer in this call (its time window, parts and blocks; its
        ``heads`` do not apply: an output holds every head). Work memory: the ``[B, N, Tc]`` logits. Copies
        of a prompt's tokens (conditionings of different lengths batched together) are folded back as the
        recorder folds them.
        """
        if not (self.options.output_similarity and rec.wants(name, part) and rec._wants_block(name, part)):
            return
        rows, targets, streams = self._streams(rec, out.device)
        if not streams:
            return
        if rows is not None:
            out = out.index_select(0, rows)
        (t0, t1), (i0, i1) = text, image
        o = out.float()
        logits = torch.matmul(o[:, i0:i1], o[:, t0:t1].transpose(1, 2)).mul_(o.shape[-1] ** -0.5)  # [B, N, Tc]
        if mask is not None:
            from .joint import mask_4d

            m4 = mask_4d(mask)
            m = m4[:, 0, i0 if m4.shape[2] > 1 else 0, t0:t1]  # [B or 1, Tc]: what the first image query may attend
            if m.shape[0] > 1 and rows is not None:
                m = m.index_select(0, rows)
            blocked = ~m if m.dtype == torch.bool else torch.isneginf(m)
            logits = logits.masked_fill(blocked.unsqueeze(1), float("-inf"))
        p = torch.softmax(logits, dim=-1)
        acc = self.output_sums.get(name)
        if acc is None:
            acc = self.output_sums[name] = torch.zeros(len(rec.streams), p.shape[1], max(rec.token_counts),
                                                       dtype=torch.float32, device=out.device)
        _add_folded(acc, p, rec, streams)
        self.output_calls[name] = self.output_calls.get(name, 0) + 1

    # -- per-head cross-attention ----------------------------------------------------------------
    def record_heads(self, rec, name: str, q: torch.Tensor, k: torch.Tensor, scale: float | None,
                     mask: torch.Tensor | None = None) -> None:
        """Add one cross-attention call's per-head probabilities (``q [B, H, N, d]``, ``k [B, Hk, T, d]``, all
        keys, ``mask [B or 1, H or 1, N, T]`` additive or boolean; the recorder has already checked the call). Keys
        past a prompt's tokens that are whole copies of it are folded back, as the recorder folds them; other extra
        keys only normalise."""
        if not self.options.head_sums:
            return
        got = self._recorded(rec, q, k)
        if got is None:
            return
        q, k, _, streams = got
        heads = q.shape[1]
        kf = k.float()
        if kf.shape[1] != heads:
            kf = kf.repeat_interleave(heads // kf.shape[1], dim=1)
        s = scale if scale is not None else q.shape[-1] ** -0.5
        scores = torch.matmul(q.float(), kf.transpose(-1, -2)).mul_(s)
        if mask is not None:
            rows = self._streams(rec, q.device)[0]
            m = mask.index_select(0, rows) if rows is not None and mask.shape[0] > 1 else mask
            scores = scores.masked_fill(~m, -math.inf) if m.dtype == torch.bool else scores + m
        p = torch.softmax(scores, dim=-1)  # [B, H, N, Tc]
        acc = self.head_sums.get(name)
        if acc is None:
            acc = self.head_sums[name] = torch.zeros(len(rec.streams), heads, p.shape[2], max(rec.token_counts),
                                                     dtype=torch.float32, device=q.device)
        _add_folded(acc, p, rec, streams)


def _add_folded(acc: torch.Tensor, p: torch.Tensor, rec, streams: tuple[int, ...]) -> None:
    """Add probabilities ``p [rows, ..., Tc]`` (row ``j`` of stream ``streams[j]``) into ``acc [streams, ..., T]``:
    keys past a prompt's tokens that are whole copies of it (conditionings of different lengths batched together)
    are folded back onto it, as the recorder folds them; other extra keys only normalise."""
    t_call = p.shape[-1]
    for j, stream in enumerate(streams):
        t = rec.token_counts[rec.streams[stream].prompt]
        if t_call < t:
            continue
        fold = t_call // t if t_call % t == 0 else 1
        part = p[j, ..., :t * fold]
        if fold > 1:
            part = part.unflatten(-1, (fold, t)).sum(-2)
        acc[stream, ..., :t] += part


# -- after sampling ---------------------------------------------------------------------------------
def head_weights(head_maps: torch.Tensor, power: float) -> torch.Tensor:
    """Weights ``[..., H]`` of head maps ``[..., H, N]``: each head's concentration to the power ``power``.

    Concentration is the inverse participation ratio ``N * sum(m^2) / sum(m)^2`` of the head's map (1 for a
    uniform map, ``N`` for a single pixel). ``power = 0`` gives every head weight 1 (plain DAAM). The weights are
    scaled to sum to ``H``, so a weighted sum over heads is on the plain sum's scale.
    """
    h, n = head_maps.shape[-2:]
    m = head_maps.double()
    total = m.sum(-1)
    ipr = n * m.square().sum(-1) / total.square().clamp_min(1e-300)
    w = torch.where(total > 0, ipr, torch.zeros_like(ipr)).clamp_min(0) ** power
    return (h * w / w.sum(-1, keepdim=True).clamp_min(1e-300)).float()


def propagation_matrix(self_sum: torch.Tensor) -> torch.Tensor:
    """Row-normalised self-attention ``A [N, N]`` of one stream's sum (rows sum to 1)."""
    a = self_sum.double()
    return (a / a.sum(-1, keepdim=True).clamp_min(1e-300)).float()


def propagate(maps: torch.Tensor, a: torch.Tensor, steps: int) -> torch.Tensor:
    """``maps [P, N] <- (A^steps maps^T)^T``: each pixel's value becomes the mean over the pixels it attends to.

    One matrix-vector product per map, so a map's values do not depend on which other maps are propagated with it
    (a ``[P, N] @ [N, N]`` product rounds differently for different ``P``, and a mask cut from the map would then
    depend on the other words asked)."""
    if steps == 0 or maps.shape[0] == 0:
        return maps
    rows = []
    for m in maps:
        for _ in range(steps):
            m = a @ m
        rows.append(m)
    return torch.stack(rows)


PROPAGATE_AT = ("each", "finest", "both")


def finest_resolution(self_sums: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """The largest layer resolution ``(h, w)`` among the recorded self-attention sums."""
    if not self_sums:
        raise ValueError("propagation needs self-attention sums: trace with self-attention recorded "
                         "(refine=RefineRecording(self_attention=True))")
    return max((tuple(int(x) for x in key.split("x")) for key in self_sums), key=lambda hw: hw[0] * hw[1])


def token_maps(sums: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]], calls: Mapping[str, int],
               stream: int, positions: Sequence[int], size: tuple[int, int], mode: str = "bicubic", *,
               self_sums: Mapping[str, torch.Tensor] | None = None, steps: int = 0,
               head_sums: Mapping[str, torch.Tensor] | None = None, head_power: float = 0.0,
               at: str = "each") -> torch.Tensor:
    """:func:`daam_core.engine.aggregate.token_maps` with the refinements.

    Each layer's map is the weighted head sum (``head_power != 0``, from ``head_sums``). Propagation (``steps``
    times, ``self_sums``):

    - ``at="each"``: each resolution's sum is propagated with that resolution's own self-attention (a resolution
      without one is left as it is), then upsampled and summed as in plain DAAM;
    - ``at="finest"``: every layer's map is summed at the finest resolution whose self-attention was recorded
      (coarser layers upsampled to it, finer ones downsampled), propagated there with that resolution's
      self-attention, then upsampled to ``size``;
    - ``at="both"``: each resolution propagated as with ``"each"``, then summed at the finest one and propagated
      there as with ``"finest"``.

    Returns ``[P, *size]`` float32.
    """
    if at not in PROPAGATE_AT:
        raise ValueError(f"propagate_at must be one of {PROPAGATE_AT}, got {at!r}")

    def layer_maps(name: str, acc: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if head_power == 0.0:
            return acc[stream].index_select(1, pos).t()
        if head_sums is None or name not in head_sums:
            raise ValueError(f"head weighting needs per-head sums, and layer {name} has none: trace with "
                             "head sums recorded (refine=RefineRecording(head_sums=True))")
        hm = head_sums[name][stream].index_select(-1, pos).permute(2, 0, 1)  # [P, H, N]
        return (head_weights(hm, head_power).unsqueeze(-1) * hm).sum(1)  # [P, N]

    def resolution_maps(hw: tuple[int, int], part: torch.Tensor) -> torch.Tensor:
        key = resolution_key(hw)
        if steps > 0 and self_sums and key in self_sums:
            return propagate(part, propagation_matrix(self_sums[key][stream]), steps)
        return part

    if steps > 0 and at in ("finest", "both"):
        hw = finest_resolution(self_sums or {})
        maps = aggregate.token_maps(sums, shapes, calls, stream, positions, hw, mode, layer_maps=layer_maps,
                                    resolution_maps=resolution_maps if at == "both" else None)
        maps = propagate(maps.flatten(1), propagation_matrix(self_sums[resolution_key(hw)][stream]), steps)
        return aggregate.resize_maps(maps.reshape(len(positions), *hw), size, mode)
    return aggregate.token_maps(sums, shapes, calls, stream, positions, size, mode, layer_maps=layer_maps,
                                resolution_maps=resolution_maps)


def exclusive_owners(plain: torch.Tensor, rivals: int = 0) -> torch.Tensor:
    """Which pixels each word owns when words compete: ``[W, H, W]`` booleans of the first ``W - rivals`` maps.

    ``plain`` holds the competing words' unnormalised plain DAAM maps ``[W, H, W]`` (the last ``rivals`` of them
    compete without being returned). A word owns a pixel where its map, divided by its own mean over the image,
    is at least every other word's: each word is judged by how much more than usual it attends there, so a word
    that draws little attention overall (a second noun) still owns the pixels where it is strongest. A word with
    no attention at all owns nothing.
    """
    m = plain.double().clamp_min(0)
    mean = m.flatten(1).mean(1)
    rel = torch.where(mean[:, None, None] > 0, m / mean.clamp_min(1e-300)[:, None, None], torch.zeros_like(m))
    owns = (rel >= rel.amax(0, keepdim=True)) & (mean[:, None, None] > 0)
    return owns[:plain.shape[0] - rivals]
