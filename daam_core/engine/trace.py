"""The result of one traced sampling and the heat maps computed from it.

An :class:`AttentionTrace` holds the recorder's running sums (per layer, per stream, per token), the
token layout of every prompt and the sizes involved. Word maps, masks and overlays are computed from
it after sampling; nothing is recomputed from the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..text.layout import TokenLayout
from ..text.query import WordNotFoundError, parse_query
from . import aggregate, masks as mask_ops, refine, render
from .geometry import LayerInfo
from .io import TraceFormatError, read_trace_file, write_trace_file
from .recorder import BRANCHES, Recording, Stream
from .render import as_float_image


@dataclass
class WordHeatMap:
    """One word's heat map on one image.

    Attributes
    ----------
    word : str
        The query as given (word or phrase).
    value : Tensor ``[H, W]`` float32, normalised as requested.
    positions : tuple of int
        Token positions the map aggregates.
    """

    word: str
    value: torch.Tensor
    positions: tuple[int, ...]

    def mask(self, threshold: float = 0.4, mode: str = "relative") -> torch.Tensor:
        """Binary mask ``[H, W]`` (the paper: relative threshold tau = 0.4)."""
        return mask_ops.threshold(self.value, threshold, mode)

    def heat_image(self, cmap: str = "jet") -> np.ndarray:
        """Colour-mapped map ``[H, W, 3]`` in [0, 1]."""
        return render.colorize(self.value.clamp(0, 1), cmap)

    def overlay(self, image, alpha: float = 0.5, cmap: str = "jet", weighted: bool = False) -> np.ndarray:
        """The map blended over ``image`` (``[H, W, 3]`` in [0, 1], PIL image or uint8 array)."""
        return render.overlay(as_float_image(image), self.value.clamp(0, 1), alpha, cmap, weighted)


class NonFiniteAttentionError(ValueError):
    """The recorded attention holds NaN or infinity: the model itself computed non-finite values."""


def check_finite(sums: dict[str, torch.Tensor]) -> None:
    """Raise :class:`NonFiniteAttentionError` naming every layer whose running sum is not finite.

    One device sync for all layers (after sampling, never on the hot path).
    """
    if not sums:
        return
    names = list(sums)
    ok = torch.stack([torch.isfinite(sums[n]).all().cpu() for n in names]).tolist()
    bad = [n for n, good in zip(names, ok) if not good]
    if bad:
        raise NonFiniteAttentionError(
            f"the attention recorded at layer(s) {', '.join(bad)} holds NaN or infinity: the model's own attention "
            "was not finite during sampling (its image is likely black too; check the model's weights, dtype and "
            "VAE), so DAAM has no maps to give")


@dataclass
class AttentionTrace:
    """Running sums of one traced sampling with everything needed to read them.

    Attributes
    ----------
    sums : dict layer -> Tensor ``[streams, N_layer, T_max]`` float32
    layers : dict layer -> LayerInfo
    calls : dict layer -> int
        Recorded calls per layer (steps x model calls).
    streams : list of Stream
        Stream ``i`` is row ``i`` of every sum.
    layouts : list of TokenLayout
        Token layout per prompt (``Stream.prompt`` indexes it).
    latent_hw, image_hw : (int, int)
    meta : dict
        Free JSON-safe facts: prompts, model family, seed, steps, sampler...
    warnings : list of str
        What the recorder had to skip, for the user to see.
    recorded_branches : tuple of str
        Branches the recorder recorded; asking for another one is an error, never an empty map.
    time_sums : dict layer -> Tensor ``[K, streams, N_layer, T_max]``
        With time buckets (``RecordFilter.time_buckets`` K > 1): the sums per K-th of the sampling's steps (they
        add up to ``sums``); empty without them. See :meth:`at_time`.
    time_calls : dict layer -> list of K int
        Recorded calls per layer and time bucket.
    stream_rows : tuple of int
        The row of the sums each stream reads; empty: stream ``i`` reads row ``i``. Streams share a row when
        several images show one recorded frame (:meth:`repeat_images`).
    self_sums : dict resolution -> Tensor ``[streams, N, N]``
        Head-summed self-attention probabilities per layer resolution (``"16x16"``), for ``propagate`` in
        :meth:`word_maps`; empty unless recorded (:class:`~daam_core.engine.refine.RefineRecording`).
    self_calls : dict resolution -> int
        Self-attention calls summed into each.
    head_sums : dict layer -> Tensor ``[streams, heads, N_layer, T_max]``
        Per-head cross-attention sums, for ``head_power`` in :meth:`word_maps`; empty unless recorded.
    output_sums : dict layer -> Tensor ``[streams, N_layer, T_max]``
        Joint attention's output-similarity sums (:mod:`~daam_core.engine.refine`), for ``source="output"`` in
        :meth:`word_maps`; empty unless recorded.
    output_calls : dict layer -> int
        Calls summed into each.
    """

    sums: dict[str, torch.Tensor]
    layers: dict[str, LayerInfo]
    calls: dict[str, int]
    streams: list[Stream]
    layouts: list[TokenLayout]
    latent_hw: tuple[int, int]
    image_hw: tuple[int, int]
    meta: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    recorded_branches: tuple[str, ...] = BRANCHES
    time_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    time_calls: dict[str, list[int]] = field(default_factory=dict)
    stream_rows: tuple[int, ...] = ()
    self_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    self_calls: dict[str, int] = field(default_factory=dict)
    head_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    output_sums: dict[str, torch.Tensor] = field(default_factory=dict)
    output_calls: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_recorder(cls, recorded: Recording, layouts: Sequence[TokenLayout], image_hw: tuple[int, int],
                      meta: dict | None = None, device: str | torch.device | None = "cpu") -> "AttentionTrace":
        """Build from :meth:`AttentionRecorder.finish` output (sums moved to ``device`` once).

        A video recording (``recorded.frames`` F > 1) becomes a trace of one image per frame: video ``b``'s frame
        ``f`` is image ``b * F + f``, its sums the frame's rows of the video's (``[S, F*h*w, T]`` ->
        ``[S*F, h*w, T]``, a reshape), so every map, mask and picture comes per frame.
        """
        sums, time_sums = recorded.sums, recorded.time_sums
        extras = recorded.extras or {}
        self_sums, head_sums = extras.get("self_sums", {}), extras.get("head_sums", {})
        output_sums = extras.get("output_sums", {})
        check_finite(sums)
        if device is not None:
            sums = {k: v.to(device) for k, v in sums.items()}
            time_sums = {k: v.to(device) for k, v in time_sums.items()}
            self_sums = {k: v.to(device) for k, v in self_sums.items()}
            head_sums = {k: v.to(device) for k, v in head_sums.items()}
            output_sums = {k: v.to(device) for k, v in output_sums.items()}
        layers, streams, frames = dict(recorded.layers), list(recorded.streams), int(recorded.frames)
        if frames > 1:  # self-attention and per-head sums are not recorded on video models (sessions refuse them)
            sums = {k: _frames_apart(v, frames) for k, v in sums.items()}
            output_sums = {k: _frames_apart(v, frames) for k, v in output_sums.items()}
            time_sums = {k: _frames_apart(v, frames) for k, v in time_sums.items()}
            layers = {k: replace(v, hw=(v.hw[0] // frames, v.hw[1])) for k, v in layers.items()}
            streams = [Stream(s.image * frames + f, s.branch, s.prompt) for s in streams for f in range(frames)]
            meta = {**(meta or {}), "frames": frames}
        return cls(sums=sums, layers=layers, calls=dict(recorded.calls), streams=streams,
                   layouts=list(layouts), latent_hw=tuple(recorded.latent_hw), image_hw=tuple(image_hw),
                   meta=dict(meta or {}), warnings=list(recorded.warnings),
                   recorded_branches=tuple(recorded.branches), time_sums=dict(time_sums),
                   time_calls={k: list(v) for k, v in recorded.time_calls.items()}, self_sums=dict(self_sums),
                   self_calls=dict(extras.get("self_calls", {})), head_sums=dict(head_sums),
                   output_sums=dict(output_sums), output_calls=dict(extras.get("output_calls", {})))

    # -- time ----------------------------------------------------------------------------------
    @property
    def time_buckets(self) -> int:
        """K, the parts of the sampling with their own sums (1 without time buckets)."""
        return len(next(iter(self.time_calls.values()))) if self.time_calls else 1

    def at_time(self, bucket: int) -> "AttentionTrace | None":
        """The trace of one time bucket (its sums and calls, the same layouts and sizes), None when nothing was
        recorded in that part of the sampling (e.g. outside the time window)."""
        if not 0 <= bucket < self.time_buckets or not self.time_sums:
            raise ValueError(f"time bucket {bucket} does not exist: this trace has {self.time_buckets} "
                             f"{'buckets' if self.time_sums else 'bucket (traced without time buckets)'}")
        calls = {n: c[bucket] for n, c in self.time_calls.items() if c[bucket] > 0 and n in self.sums}
        if not calls:
            return None
        return AttentionTrace(sums={n: self.time_sums[n][bucket] for n in calls},
                              layers={n: self.layers[n] for n in calls}, calls=calls, streams=self.streams,
                              layouts=self.layouts, latent_hw=self.latent_hw, image_hw=self.image_hw, meta=self.meta,
                              recorded_branches=self.recorded_branches, stream_rows=self.stream_rows)

    def repeat_images(self, source: Sequence[int]) -> "AttentionTrace":
        """A trace whose image ``j`` shows this trace's image ``source[j]`` (e.g. each decoded video frame the
        latent frame it was decoded from); the sums are shared, not copied."""
        bad = [i for i in source if not 0 <= i < self.num_images]
        if bad:
            raise ValueError(f"images {bad} are not in this trace (it has {self.num_images} images)")
        streams, rows = [], []
        for j, image in enumerate(source):
            for i, s in enumerate(self.streams):
                if s.image == image:
                    streams.append(Stream(j, s.branch, s.prompt))
                    rows.append(self._row(i))
        return replace(self, streams=streams, stream_rows=tuple(rows))

    def _row(self, stream: int) -> int:
        return self.stream_rows[stream] if self.stream_rows else stream

    # -- lookup --------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return 1 + max((s.image for s in self.streams), default=-1)

    def branches(self) -> list[str]:
        """Branches that have a stream (``cond`` and, with CFG, ``uncond``)."""
        return sorted({s.branch for s in self.streams})

    def stream_index(self, image: int = 0, branch: str = "cond") -> int:
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
        if branch not in self.recorded_branches:
            raise ValueError("no negative-prompt maps: the negative branch was not recorded (turn on "
                             "record_negative / negative=True when tracing)")
        for i, s in enumerate(self.streams):
            if s.image == image and s.branch == branch:
                return i
        if branch == "uncond" and any(s.image == image for s in self.streams):
            raise ValueError("no negative-prompt maps: the sampling ran without classifier-free guidance "
                             "(or the negative branch was not recorded)")
        raise ValueError(f"image {image} is not in this trace (it has {self.num_images} images)")

    def layout(self, image: int = 0, branch: str = "cond") -> TokenLayout:
        return self.layouts[self.streams[self.stream_index(image, branch)].prompt]

    def select_layers(self, layers: Sequence[str] | None = None, factors: Sequence[int] | None = None,
                      parts: Sequence[str] | None = None, *, locations: Sequence[str] | None = None) -> list[str]:
        """Recorded layers that pass the filters, in call order (``parts``: network parts; ``locations`` is their
        former name)."""
        parts = parts if parts is not None else locations
        names = sorted(self.sums, key=lambda n: self.layers[n].order)
        if layers is not None:
            unknown = set(layers) - set(names)
            if unknown:
                raise ValueError(f"layers {sorted(unknown)} were not recorded; recorded: {names}")
        picked = [n for n in names
                  if (layers is None or n in layers)
                  and (factors is None or self.layers[n].factor in factors)
                  and (parts is None or self.layers[n].part in parts)]
        if not picked:
            available = sorted({(self.layers[n].part, self.layers[n].factor) for n in names})
            raise ValueError(f"no recorded layer matches layers={layers}, factors={factors}, parts={parts}; "
                             f"recorded (part, factor): {available}")
        return picked

    # -- maps ----------------------------------------------------------------------------------
    def token_maps(self, positions: Sequence[int], image: int = 0, branch: str = "cond", *,
                   layers=None, factors=None, parts=None, size: tuple[int, int] | None = None, locations=None,
                   upsample: str = "bicubic", propagate: int = 0, head_power: float = 0.0,
                   source: str = "attention", propagate_at: str = "each") -> torch.Tensor:
        """Maps ``[P, h, w]`` of token positions (mean head-summed probability per layer call); ``propagate``,
        ``propagate_at``, ``head_power`` and ``source`` as in :meth:`word_maps`."""
        stream = self.stream_index(image, branch)
        t = self.layouts[self.streams[stream].prompt].length
        bad = [p for p in positions if not 0 <= p < t]
        if bad:
            raise ValueError(f"token positions {bad} are outside the prompt's {t} positions")
        names = self.select_layers(layers, factors, parts, locations=locations)
        if propagate < 0:
            raise ValueError(f"propagate must be >= 0 self-attention steps, got {propagate}")
        if propagate and not self.self_sums:
            raise ValueError("propagation needs self-attention sums: trace with self-attention recorded "
                             "(refine=RefineRecording(self_attention=True))")
        sums, calls = self.sums, self.calls
        if source == "output":
            if not self.output_sums:
                raise ValueError("output-similarity maps need output-similarity sums: trace a joint-attention model "
                                 "with them recorded (refine=RefineRecording(output_similarity=True))")
            if propagate or head_power:
                raise ValueError("propagate and head_power refine attention maps (UNets); they do not apply to "
                                 "source='output'")
            names = [n for n in names if n in self.output_sums]
            sums, calls = self.output_sums, self.output_calls
        elif source != "attention":
            raise ValueError(f"source must be 'attention' or 'output', got {source!r}")
        if propagate or head_power:
            maps = refine.token_maps({n: self.sums[n] for n in names}, {n: self.layers[n].hw for n in names},
                                     self.calls, self._row(stream), positions, self.latent_hw, upsample,
                                     self_sums=self.self_sums, steps=propagate, head_sums=self.head_sums,
                                     head_power=head_power, at=propagate_at)
        else:
            maps = aggregate.token_maps({n: sums[n] for n in names}, {n: self.layers[n].hw for n in names},
                                        calls, self._row(stream), positions, self.latent_hw, upsample)
        if size is not None:
            maps = aggregate.resize_maps(maps, size, upsample)
        return maps

    def word_maps(self, words: Sequence[str] | str, image: int | None = None, branch: str = "cond", *,
                  combine: str = "mean", normalize: str = "minmax", size: tuple[int, int] | None = None,
                  layers=None, factors=None, parts=None, upsample: str = "bicubic", locations=None,
                  missing: str = "error", segments: str | None = None, propagate: int = 0,
                  head_power: float = 0.0, source: str = "attention", propagate_at: str = "each",
                  exclusive: bool = False, rivals: Sequence[str] = ()) -> torch.Tensor:
        """Heat maps of words or phrases.

        Parameters
        ----------
        words : str or sequence of str
            Words or phrases of the prompt; ``"dog#2"`` picks the second occurrence.
        image : int, optional
            One image; by default every image of the trace.
        branch : {"cond", "uncond"}
            Positive or negative prompt.
        combine : {"mean", "max", "sum"}
            How the tokens of a word are combined.
        normalize : {"minmax", "max", "shared", "none"}
        size : (int, int), optional
            Output size; default the image size.
        missing : {"error", "zeros"}
            What to do with a word absent from an image's prompt.
        layers, factors, parts : optional
            Only these recorded layers, layer factors, network parts (:meth:`select_layers`; ``locations`` is
            the former name of ``parts``).
        segments : {"both", "clip", "t5", "llama"}, optional
            Which text encoders' positions a word uses where the conditioning joins several (SD3: CLIP then
            T5; HiDream: T5 then Llama twice); default both (all of the word's keys).
        propagate : int
            Self-attention propagation steps ``k`` (``map <- A^k map`` per layer resolution, ``A`` the row-normalised
            self-attention sum); 0 = plain DAAM. Needs self-attention sums (:attr:`self_sums`).
        propagate_at : {"each", "finest", "both"}
            ``"each"``: every layer resolution is propagated with its own self-attention; ``"finest"``: all layers
            are summed at the finest resolution whose self-attention was recorded and propagated there;
            ``"both"``: the first, then the second (:func:`~daam_core.engine.refine.token_maps`).
        head_power : float
            Weight each head of each layer by its map's concentration to this power
            (:func:`~daam_core.engine.refine.head_weights`); 0 = plain DAAM. Needs :attr:`head_sums`.
        source : {"attention", "output"}
            ``"attention"``: DAAM's attention probabilities; ``"output"``: joint attention's output-similarity
            maps (ConceptAttention-style, :mod:`~daam_core.engine.refine`). Needs :attr:`output_sums`.
        exclusive : bool
            The words compete for pixels: each keeps only the pixels it owns by
            :func:`~daam_core.engine.refine.exclusive_owners` (judged on the plain maps of the same layers and
            source), the rest is set to 0 and the map normalised again. Masks of two words then never overlap.
        rivals : sequence of str
            More words that compete with each word (and are not returned): ``word_maps("dog", rivals=["cat"])`` is
            the dog's map without the pixels the cat owns. Without ``exclusive`` the words do not compete with each
            other, only with the rivals.

        Returns
        -------
        Tensor ``[images, words, H, W]`` float32 (``[words, H, W]`` when ``image`` is given).
        """
        if isinstance(words, str):
            words = [words]
        if isinstance(rivals, str):
            rivals = [rivals]
        if not words:
            raise ValueError("no words given: name at least one word or phrase of the prompt")
        if exclusive or rivals:
            plain = self.word_maps([*words, *rivals], image, branch, combine=combine, normalize="none", size=size,
                                   layers=layers, factors=factors, parts=parts, upsample=upsample,
                                   locations=locations, missing=missing, segments=segments, source=source)
            if propagate or head_power:
                refined = self.word_maps(words, image, branch, combine=combine, normalize=normalize, size=size,
                                         layers=layers, factors=factors, parts=parts, upsample=upsample,
                                         locations=locations, missing=missing, segments=segments,
                                         propagate=propagate, head_power=head_power, source=source,
                                         propagate_at=propagate_at)
            else:  # the words' own maps are their plain ones, normalised as finish_maps does
                refined = plain[..., :len(words), :, :]
                if normalize != "none":
                    refined = aggregate.normalize_maps(refined.clamp(min=0), normalize)
            return compete(refined, plain, len(rivals), exclusive, normalize)
        if missing not in ("error", "zeros"):
            raise ValueError("missing must be 'error' or 'zeros'")
        size = tuple(size or self.image_hw)
        images = range(self.num_images) if image is None else [image]
        out = []
        for i in images:
            layout = self.layout(i, branch)
            groups, found = [], []
            for w in words:
                text, occurrence = parse_query(w)
                try:
                    groups.append(layout.positions(text, occurrence, segments))
                    found.append(True)
                except WordNotFoundError:
                    if missing == "error":
                        raise
                    groups.append(())
                    found.append(False)
            flat = sorted({p for g in groups for p in g})
            if flat:
                maps = self.token_maps(flat, i, branch, layers=layers, factors=factors, parts=parts,
                                       locations=locations, upsample=upsample, propagate=propagate,
                                       head_power=head_power, source=source, propagate_at=propagate_at)
                index = {p: j for j, p in enumerate(flat)}
                per_word = aggregate.combine_tokens(maps, [[index[p] for p in g] or [0] for g in groups], combine)
                per_word = aggregate.finish_maps(per_word, size, normalize, upsample)
                per_word[[j for j, ok in enumerate(found) if not ok]] = 0
            else:
                per_word = torch.zeros(len(words), *size)
            out.append(per_word)
        result = torch.stack(out)
        return result[0] if image is not None else result

    def word_map(self, word: str, image: int = 0, branch: str = "cond", **kwargs) -> WordHeatMap:
        """One word's :class:`WordHeatMap` (keyword arguments as in :meth:`word_maps`)."""
        text, occurrence = parse_query(word)
        positions = self.layout(image, branch).positions(text, occurrence, kwargs.get("segments"))
        value = self.word_maps([word], image=image, branch=branch, **kwargs)[0]
        return WordHeatMap(word=word, value=value, positions=tuple(positions))

    def words(self, image: int = 0, branch: str = "cond") -> list[str]:
        """The words of an image's prompt, in order."""
        return [w.text for w in self.layout(image, branch).words]

    # -- persistence ---------------------------------------------------------------------------
    def to(self, device) -> "AttentionTrace":
        self.sums = {k: v.to(device) for k, v in self.sums.items()}
        self.time_sums = {k: v.to(device) for k, v in self.time_sums.items()}
        return self

    def nbytes(self) -> int:
        """Memory held by the running sums (time buckets included)."""
        return sum(v.numel() * v.element_size() for v in (*self.sums.values(), *self.time_sums.values()))

    def save(self, path):
        """Write ``path`` (``.safetensors`` + ``.json``); see :func:`save_trace`."""
        return save_trace(self, path)

    @classmethod
    def load(cls, path) -> "AttentionTrace":
        """Read a trace written by :meth:`save`; see :func:`load_trace`."""
        return load_trace(path)


def compete(maps: torch.Tensor, plain: torch.Tensor, rivals: int, exclusive: bool, normalize: str) -> torch.Tensor:
    """Word maps ``[..., W, H, W]`` kept where each word owns the pixel (:func:`refine.exclusive_owners` of the plain
    maps ``[..., W + rivals, H, W]``: among all words and the rivals when ``exclusive``, else each word against the
    rivals alone), normalised again the way they were."""
    w = maps.shape[-3]
    flat_maps, flat_plain = maps.reshape(-1, *maps.shape[-3:]), plain.reshape(-1, *plain.shape[-3:])
    out = []
    for m, p in zip(flat_maps, flat_plain):
        if exclusive:
            owns = refine.exclusive_owners(p, rivals)
        else:
            owns = torch.stack([refine.exclusive_owners(torch.cat([p[j:j + 1], p[w:]]), rivals)[0] for j in range(w)])
        out.append(m * owns.to(m.dtype))
    out = torch.stack(out).reshape(maps.shape)
    if normalize == "none":
        return out
    return aggregate.normalize_maps(out, "shared" if normalize == "shared" else "max")


def _frames_apart(x: torch.Tensor, frames: int) -> torch.Tensor:
    """``[..., S, F*n, T]`` (a video's frames one after the other) -> ``[..., S*F, n, T]`` (one row per frame)."""
    *lead, s, n, t = x.shape
    return x.reshape(*lead, s * frames, n // frames, t)


def save_trace(trace: AttentionTrace, path):
    """Write a trace; returns the ``.safetensors`` path. Parent folders must exist."""
    names = sorted(trace.sums, key=lambda n: trace.layers[n].order)
    meta = {
        "layers": [asdict(trace.layers[n]) for n in names],
        "calls": {n: trace.calls.get(n, 0) for n in names},
        "streams": [asdict(s) for s in trace.streams],
        "layouts": [layout.to_dict() for layout in trace.layouts],
        "latent_hw": list(trace.latent_hw),
        "image_hw": list(trace.image_hw),
        "recorded_branches": list(trace.recorded_branches),
        "meta": trace.meta,
        "warnings": trace.warnings,
    }
    if trace.stream_rows:
        meta["stream_rows"] = list(trace.stream_rows)
    tensors = {f"sums/{i}": trace.sums[n] for i, n in enumerate(names)}
    timed = [n for n in names if n in trace.time_sums]
    if timed:  # optional: files without them (older ones, or traced without time buckets) load the same
        meta["time_calls"] = {n: list(trace.time_calls[n]) for n in timed}
        tensors.update({f"time_sums/{names.index(n)}": trace.time_sums[n] for n in timed})
    if trace.self_sums:  # optional, as the time sums
        meta["self_calls"] = {k: int(trace.self_calls.get(k, 0)) for k in trace.self_sums}
        tensors.update({f"self_sums/{k}": v for k, v in trace.self_sums.items()})
    tensors.update({f"head_sums/{names.index(n)}": trace.head_sums[n] for n in names if n in trace.head_sums})
    if trace.output_sums:
        meta["output_calls"] = {n: int(trace.output_calls.get(n, 0)) for n in names if n in trace.output_sums}
        tensors.update({f"output_sums/{names.index(n)}": trace.output_sums[n] for n in meta["output_calls"]})
    return write_trace_file(path, tensors, meta)


def load_trace(path) -> AttentionTrace:
    """Read a trace written by :func:`save_trace` (safetensors only; see :func:`~daam_core.engine.io.read_trace_file`)."""
    tensors, meta = read_trace_file(path)
    missing = [k for k in ("layers", "calls", "streams", "layouts", "latent_hw", "image_hw") if k not in meta]
    if missing:
        raise TraceFormatError(f"{Path(path).name}: the trace's metadata lacks {', '.join(map(repr, missing))} "
                               f"(not written by DAAM's save_trace, or damaged)")
    layers = {}
    for d in meta["layers"]:
        d = dict(d)
        if "location" in d:  # version 1
            d["part"] = d.pop("location")
        layers[d["name"]] = LayerInfo(**{**d, "hw": tuple(d["hw"])})
    names = [d["name"] for d in meta["layers"]]
    absent = [f"sums/{i}" for i in range(len(names)) if f"sums/{i}" not in tensors]
    if absent:
        raise TraceFormatError(f"{Path(path).name}: the trace lacks the tensors {absent} its metadata names")
    sums = {n: tensors[f"sums/{i}"] for i, n in enumerate(names)}
    time_calls = {n: [int(c) for c in v] for n, v in meta.get("time_calls", {}).items()}
    time_sums = {n: tensors[f"time_sums/{names.index(n)}"] for n in time_calls}
    self_calls = {k: int(v) for k, v in meta.get("self_calls", {}).items()}
    self_sums = {k: tensors[f"self_sums/{k}"] for k in self_calls}
    head_sums = {n: tensors[f"head_sums/{i}"] for i, n in enumerate(names) if f"head_sums/{i}" in tensors}
    output_calls = {n: int(c) for n, c in meta.get("output_calls", {}).items()}
    output_sums = {n: tensors[f"output_sums/{names.index(n)}"] for n in output_calls}
    return AttentionTrace(
        sums=sums, layers=layers, calls={k: int(v) for k, v in meta["calls"].items()},
        streams=[Stream(**s) for s in meta["streams"]],
        layouts=[TokenLayout.from_dict(d) for d in meta["layouts"]],
        latent_hw=tuple(meta["latent_hw"]), image_hw=tuple(meta["image_hw"]),
        meta=meta.get("meta", {}), warnings=list(meta.get("warnings", [])),
        recorded_branches=tuple(meta.get("recorded_branches", BRANCHES)), time_sums=time_sums, time_calls=time_calls,
        stream_rows=tuple(int(r) for r in meta.get("stream_rows", ())),
        self_sums=self_sums, self_calls=self_calls, head_sums=head_sums, output_sums=output_sums,
        output_calls=output_calls)
