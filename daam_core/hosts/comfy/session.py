"""DAAM tracing on a ComfyUI MODEL through the host's public hook points.

Everything lives on a clone of the MODEL (``ModelPatcher.clone()``); the torch modules are never
touched, so the model given to the node and every other clone of it run exactly as before.
- ``OUTER_SAMPLE`` wrapper: one sampling. Reads the guider's conditionings (uuid -> positive/negative,
  token count) and the latent size, starts the recorder, and after sampling stores the sums keyed
  by the output latent. The recorder is reset in ``finally``: an error or a cancel leaves nothing.
- ``APPLY_MODEL`` wrapper: one model call. ``transformer_options["cond_or_uncond"]`` and ``["uuids"]``
  say which batch chunk is which conditioning; that becomes the row -> stream map. The call's sigma against
  the sampling's sigmas gives its step; the window is the model sampling's ``percent_to_sigma``, as the host's
  timestep-range conditioning reads it (:mod:`daam_core.hosts.contract`).
- ``attn2_patch``: marks that the next attention call is the cross-attention of a block.
- ``attn1_patch`` (only with self-attention sums, :mod:`daam_core.engine.refine`): marks that the next attention
  call is the self-attention of a block; the override hands its q and k to ``recorder.extra.record_self``.
- ``optimized_attention_override``: computes the output with the host's function (or the override
  another node installed before, which it wraps), then records q and k.

Pure Python over the host's conventions: ComfyUI itself is imported only by ``nodes/tracing.py``, which
installs these hooks on a clone.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from ...engine.geometry import UNetGrid
from ...engine.recorder import AttentionRecorder, RecordFilter, Recording, Stream
from ..contract import SamplingClock, percent_window, whole

WRAPPER_KEY = "daam"
OPTIONS_KEY = "daam_session"
LOCATION = {"input": "down", "middle": "mid", "output": "up"}
MAX_RECORDS = 8  # finished samplings kept per session (one per sampler node using this model)


def heads_first(x: torch.Tensor, heads: int, skip_reshape: bool, dim_head: int | None = None) -> torch.Tensor:
    """q, k or v as ComfyUI's attention functions read them, as ``[B, H, L, D]``: with ``skip_reshape`` they are
    that already; otherwise ``[B, L, ...]`` holds ``heads`` heads (keys of grouped-query attention: as many heads of
    ``dim_head`` as they have)."""
    if skip_reshape:
        return x
    b, n = x.shape[0], x.shape[1]
    return x.reshape(b, n, -1, dim_head).transpose(1, 2) if dim_head else x.reshape(b, n, heads, -1).transpose(1, 2)


def refuse_split(transformer_options: dict) -> None:
    """A clear error for ComfyUI's multi-GPU CFG split (``_calc_cond_batch_multigpu``): it runs model calls of
    one step on several devices at once, and a session records one model call at a time."""
    if "multigpu_thread_device" in transformer_options:
        raise ValueError("DAAM cannot trace a sampling that ComfyUI splits across GPUs (multi-GPU CFG): its model "
                         "calls run at the same time on several devices. Sample the traced model on one GPU")


@dataclass
class SamplingRecord:
    """The recorder's output for one finished sampling, and how to recognise it."""

    recorded: Recording
    latent: torch.Tensor  # output samples, on the CPU, to match the LATENT a heat-map node receives
    token_counts: tuple[int, int | None]  # text tokens per call, positive, negative (None without a negative branch)
    conditionings: tuple[torch.Tensor, torch.Tensor | None]  # first cross_attn entry per prompt, [1, T, C] on the CPU
    notes: list[str] = field(default_factory=list)
    attention_marks: int = 0  # cross-attention calls DAAM was told about (attn2 patch)
    attention_seen: int = 0   # of those, how many reached DAAM's attention override


class TraceSession:
    """The recorder of one DAAM-patched MODEL and the records of its samplings.

    Shared by every clone of the patched model: ``copy.deepcopy`` (used by ``ModelPatcher.clone``)
    returns the same session, so a LoRA or other patch applied after DAAM keeps recording into it.
    """

    latent_axes = ("height", "width")  # the latent's axes after batch and channels

    def __init__(self, filter: RecordFilter):
        self.recorder = AttentionRecorder(filter)
        self.records: list[SamplingRecord] = []
        self.lock = threading.Lock()
        self._pending: tuple[str, str, int] | None = None  # (layer, location, context length)
        self._pending_self: str | None = None  # location of a marked self-attention call (attn1_patch)
        self._uuid_stream: dict = {}
        self._latent_hw: tuple[int, int] = (0, 0)
        self._latent_size: tuple[int, ...] = (0, 0)  # the latent's shape after batch and channels
        self._n_images = 0
        self._notes: list[str] = []
        self._clock: SamplingClock | None = None
        self._ran: set[str] = set()  # branches the sampler evaluated (also outside the time window)
        self._conds: tuple = (None, None)
        self._marks = 0
        self._seen = 0

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    # -- sampling ----------------------------------------------------------------------------
    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        guider = executor.class_obj
        with self.lock:
            self._start(guider, noise, sigmas)
            try:
                output = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
                recorded, token_counts, conds = self._finish(self.recorder.finish())
                record = SamplingRecord(recorded=recorded, latent=output.detach().to("cpu", torch.float32).clone(),
                                        token_counts=token_counts, conditionings=conds,
                                        notes=list(self._notes), attention_marks=self._marks,
                                        attention_seen=self._seen)
                self.records = [r for r in self.records if not torch.equal(r.latent, record.latent)][-(MAX_RECORDS - 1):]
                self.records.append(record)
                return output
            finally:
                self.recorder.finish()  # forget partial sums after an error or a cancel
                self._uuid_stream = {}
                self._pending = None
                self._pending_self = None

    def _start(self, guider, noise: torch.Tensor, sigmas: torch.Tensor | None = None) -> None:
        conds = getattr(guider, "conds", {}) or {}
        positive, negative = conds.get("positive") or [], conds.get("negative") or []
        self._notes = []
        for name, entries in (("positive", positive), ("negative", negative)):
            if len(entries) > 1:
                self._notes.append(f"the {name} conditioning has {len(entries)} entries (combined, area or timestep-"
                                   f"range conditionings); maps are taken from the first one only")
        if noise.ndim != 2 + len(self.latent_axes):
            raise ValueError(f"DAAM traces this model on latents [batch, channels, {', '.join(self.latent_axes)}]; "
                             f"got shape {tuple(noise.shape)}")
        b, h, w = noise.shape[0], noise.shape[-2], noise.shape[-1]
        self._latent_size = tuple(int(n) for n in noise.shape[2:])
        self._latent_hw = (int(h), int(w))
        self._n_images = int(b)
        streams, counts, conds, self._uuid_stream = [], [], [], {}
        for prompt, (branch, entries) in enumerate((("cond", positive), ("uncond", negative))):
            if not entries or entries[0].get("cross_attn") is None:
                continue
            self._uuid_stream[entries[0]["uuid"]] = (branch, len(streams))
            streams += [Stream(i, branch, len(counts)) for i in range(b)]
            counts.append(self._text_length(entries[0]))
            conds.append(entries[0]["cross_attn"][:1].detach().to("cpu", torch.float32).clone())
        if not streams:
            raise ValueError("DAAM found no text conditioning (cross_attn) in this sampling; connect a CLIP Text Encode "
                             "conditioning to the sampler")
        self._token_counts = (counts[0], counts[1] if len(counts) > 1 else None)
        self._conds = (conds[0], conds[1] if len(conds) > 1 else None)
        self._marks = self._seen = 0
        self._ran = set()
        self._clock = self._sampling_clock(guider, sigmas)
        self.recorder.begin(self._grid(), streams, counts)

    def _text_length(self, cond: dict) -> int:
        """Text tokens a model call holds for one conditioning entry (a UNet's: the conditioning's own)."""
        return int(cond["cross_attn"].shape[1])

    def _sampling_clock(self, guider, sigmas) -> SamplingClock | None:
        """Steps and window of this sampling (None when the whole sampling is one sum)."""
        f = self.recorder.filter
        if whole(f) or sigmas is None or len(sigmas) < 2:
            return None
        ms = guider.model_patcher.get_model_object("model_sampling")
        rule = None if (f.start, f.end) == (0.0, 1.0) else percent_window(f.start, f.end, ms.percent_to_sigma)
        return SamplingClock(sigmas.detach().to("cpu", torch.float64), rule)

    def _grid(self):
        """The grid rule of this model's layers (a UNet's; the DiT session's is a patch grid)."""
        return UNetGrid(self._latent_hw)

    def _finish(self, recorded: Recording):
        """``(recording, token_counts, conditionings)`` to keep for a finished sampling; the negative branch is
        dropped when the sampler never evaluated it (cfg 1), rather than kept as empty maps."""
        if "uncond" in self._ran or self._token_counts[1] is None:
            return recorded, self._token_counts, self._conds
        keep = [i for i, s in enumerate(recorded.streams) if s.branch == "cond"]
        recorded.sums = {k: v[keep] for k, v in recorded.sums.items()}
        recorded.time_sums = {k: v[:, keep] for k, v in recorded.time_sums.items()}
        for kind in ("self_sums", "head_sums", "output_sums"):  # refinement sums: [streams, ...] as the plain ones
            if kind in recorded.extras:
                recorded.extras[kind] = {k: v[keep] for k, v in recorded.extras[kind].items()}
        recorded.streams = [recorded.streams[i] for i in keep]
        recorded.token_counts = recorded.token_counts[:1]
        recorded.branches = tuple(b for b in recorded.branches if b == "cond")
        return recorded, (self._token_counts[0], None), (self._conds[0], None)

    def no_negative_reason(self) -> str:
        """Why a sampling has no negative maps (for the error on negative words)."""
        return "this sampling never evaluated the negative prompt (cfg 1), so negative words have no maps"

    # -- one model call ----------------------------------------------------------------------
    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                    **kwargs):
        refuse_split(transformer_options)
        try:
            self._set_call(x, t, transformer_options)
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            self.recorder.skip_call()

    def _set_call(self, x, t, options) -> None:
        kinds = options.get("cond_or_uncond") or []
        uuids = options.get("uuids") or []
        self._ran.update(self._uuid_stream[u][0] for u in uuids if u in self._uuid_stream)  # also outside the window
        if not self._uuid_stream or not kinds or len(uuids) != len(kinds) or tuple(x.shape[2:]) != self._latent_size:
            self.recorder.skip_call()  # e.g. an area-cropped conditioning batch, or a call outside sampling
            return
        chunk = x.shape[0] // len(kinds)
        if chunk != self._n_images:
            self.recorder.skip_call()
            return
        rows: list[int | None] = []
        for u in uuids:
            hit = self._uuid_stream.get(u)
            rows += [None] * chunk if hit is None else [hit[1] + i for i in range(chunk)]
        # t is the call's sigma (BaseModel.apply_model); read only when the window or buckets need it
        self.recorder.set_call(rows, 0.0 if self._clock is None else self._clock.moment(t[:1]))

    # -- attention ---------------------------------------------------------------------------
    def attn2_patch(self, n, context, value, extra_options):
        if self.recorder.active:
            block = extra_options.get("block") or ("?", 0)
            name = f"{block[0]}.{block[1]}.{extra_options.get('block_index', 0)}"
            self._pending = (name, LOCATION.get(block[0], "down"), int(context.shape[1]))
            self._marks += 1
        return n, context, value

    def attn1_patch(self, n, context, value, extra_options):
        """Marks the block's self-attention call for the self-attention sums (install it only when they are
        recorded: ``recorder.extra`` with ``self_attention``)."""
        if self.recorder.active and self.recorder.extra is not None:
            block = extra_options.get("block") or ("?", 0)
            self._pending_self = LOCATION.get(block[0], "down")
        return n, context, value

    def attention_override(self, previous):
        """An ``optimized_attention_override`` that records cross-attention and defers to ``previous``.

        It has no ``container_function``: ComfyUI's wrapper hands it plain q/k/v tensors, never
        ``AttentionTensorContainer``s. Every keyword (``enable_gqa``, ``skip_output_reshape``, ``attn_precision``,
        ...) goes on to the function that computes the output, so the output is the untraced one.
        """

        def override(func, *args, **kwargs):
            out = previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
            if self._pending_self is not None and self._record_self(args, kwargs):
                return out
            pending = self._pending
            if pending is not None:
                q, k, _, heads = args[:4]
                skip_reshape = kwargs.get("skip_reshape", False)
                t = k.shape[2] if skip_reshape else k.shape[1]
                if t == pending[2]:  # the key is the text context: this is the marked cross-attention
                    self._pending = None
                    self._seen += 1
                    q = heads_first(q, heads, skip_reshape)
                    # grouped-query keys (enable_gqa) are read per query head by the recorder, not repeated
                    self.recorder.record(pending[0], pending[1], q, heads_first(k, heads, skip_reshape, q.shape[-1]),
                                         heads, scale=kwargs.get("scale"))
            return out

        return override

    def _record_self(self, args, kwargs) -> bool:
        """The marked self-attention call's q and k to the self-attention sums; False (mark dropped) when this call
        is not it (keys not as many as queries: another node replaced the block's self-attention)."""
        part, self._pending_self = self._pending_self, None
        q, k, _, heads = args[:4]
        if kwargs.get("skip_reshape", False):  # [B, H, N, d] -> [B, N, H * d]
            q, k = q.transpose(1, 2).flatten(2), k.transpose(1, 2).flatten(2)
        if q.shape[1] != k.shape[1]:
            return False
        self.recorder.extra.record_self(self.recorder, part, q, k, heads, scale=kwargs.get("scale"))
        return True

    # -- results -----------------------------------------------------------------------------
    def find(self, samples: torch.Tensor | None) -> SamplingRecord:
        """The record whose output latent equals ``samples`` (the sampler's LATENT)."""
        if not self.records:
            raise ValueError("this DAAM model has not sampled anything yet: connect the sampler's LATENT output "
                             "(or the image decoded from it) so that the heat maps run after sampling")
        if samples is None:
            return self.records[-1]
        s = samples.detach().to("cpu", torch.float32)
        for r in reversed(self.records):
            if r.latent.shape == s.shape and _same_latent(r.latent, s):
                return r
        raise ValueError("the LATENT given to DAAM was not produced by a sampler using this DAAM model (or it was "
                         "changed after sampling); connect the sampler's LATENT output directly")


def session_of(model) -> TraceSession:
    """The session of a DAAM-patched MODEL, with a clear error for any other model."""
    session = getattr(model, "model_options", {}).get("transformer_options", {}).get(OPTIONS_KEY)
    if session is None:
        raise ValueError("this MODEL is not traced: pass it through 'DAAM Trace Model' and give the traced MODEL to "
                         "both the sampler and this node")
    return session


def _same_latent(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal, NaN matching NaN (a broken model's latent must still find its record, and its error)."""
    return torch.equal(a, b) or bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())
