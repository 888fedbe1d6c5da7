"""Tracing diffusers pipelines: ``with trace(pipe) as tc: pipe(...)``.

What is installed while the context is open, and removed on exit (also on error or interrupt):
- on every cross-attention module of the UNet, forward hooks that keep the query and key the module's own
  processor computed (outputs of ``to_q``/``to_k``, or ``to_kv`` when projections are fused) and record the
  probabilities after the processor returns. No processor is replaced, so the output and the arguments every
  processor receives are the host's, bit for bit; self-attention is only watched when its sums are asked for
  (``refine``: the same hooks on the ``attn1`` modules, :class:`SelfAttentionObserver`);
- a forward pre-hook on the UNet that tells the recorder the latent size, which batch rows are
  conditional/unconditional for which image, and where the call sits in the sampling: its step in the
  scheduler's timesteps, and the time window read as diffusers' ``control_guidance_start`` / ``_end`` read
  theirs (:mod:`daam_core.hosts.contract`);
- a wrapper around ``pipe.encode_prompt`` that captures the prompts of each call.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from ...engine.geometry import UNET_PARTS, UNetGrid
from ...engine.recorder import AttentionRecorder, RecordFilter
from ...engine.refine import RefineRecording, RefineSums
from ...engine.trace import AttentionTrace
from ...text.layout import TokenLayout
from ...text.tokenize import tokenize
from ..contract import SamplingClock, cfg_rows, cfg_streams, step_window, whole


def _part(name: str) -> str:
    if name.startswith("down_blocks"):
        return "down"
    if name.startswith("mid_block"):
        return "mid"
    if name.startswith("up_blocks"):
        return "up"
    raise ValueError(f"cannot tell the UNet part of attention module {name!r}")


class CrossAttentionObserver:
    """Forward hooks that watch one cross-attention module and hand its query and key to the recorder.

    The module keeps its own processor (any processor: diffusers' own, IP-Adapter's ``nn.Module`` processors,
    a user's processor with extra arguments), so its output and the arguments it receives are untouched. Hooks:

    - a pre-hook on the module forgets the previous call's tensors;
    - forward hooks on ``to_q`` and ``to_k`` keep references to their outputs (no copy); after
      ``fuse_qkv_projections()`` the keys come from ``to_kv``, split in half as the fused processor does;
    - a forward hook on the module records, after the processor has returned.

    Parameters
    ----------
    module : diffusers Attention
        A cross-attention module (``is_cross_attention``).
    recorder : AttentionRecorder
    name : str
        Module path of the attention layer.
    """

    def __init__(self, module, recorder: AttentionRecorder, name: str):
        self.module = module
        self.recorder = recorder
        self.name = name
        self.part = _part(name)
        self.q: torch.Tensor | None = None
        self.k: torch.Tensor | None = None

    def install(self) -> list:
        """Register the hooks; returns their handles."""
        m = self.module
        handles = [m.register_forward_pre_hook(self._reset), m.to_q.register_forward_hook(self._capture_q),
                   m.to_k.register_forward_hook(self._capture_k)]
        if isinstance(getattr(m, "to_kv", None), torch.nn.Module):
            handles.append(m.to_kv.register_forward_hook(self._capture_kv))
        handles.append(m.register_forward_hook(self._record))
        return handles

    def _reset(self, module, args):
        self.q = self.k = None

    def _capture_q(self, module, args, output):
        self.q = output

    def _capture_k(self, module, args, output):
        self.k = output

    def _capture_kv(self, module, args, output):
        self.k = output[..., :output.shape[-1] // 2]  # FusedAttnProcessor2_0: key, value = split(kv, half)

    def _record(self, module, args, output):
        q, k = self.q, self.k
        self.q = self.k = None
        if not self.recorder.wants(self.name, self.part):
            return None
        attn = self.module
        if q is None or k is None:
            missing = " and ".join(n for n, t in (("query (to_q)", q), ("key (to_k / to_kv)", k)) if t is None)
            raise RuntimeError(
                f"DAAM cannot observe {self.name}: its processor {type(attn.processor).__name__} computed the "
                f"{missing} without calling the module's projection layers, so there is nothing to record. Use a "
                "processor that calls attn.to_q and attn.to_k (or attn.to_kv after fuse_qkv_projections())")
        if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
            heads = attn.heads
            q = attn.norm_q(q.unflatten(-1, (heads, -1))).flatten(-2) if attn.norm_q is not None else q
            k = attn.norm_k(k.unflatten(-1, (heads, -1))).flatten(-2) if attn.norm_k is not None else k
        self.recorder.record(self.name, self.part, q, k, attn.heads, scale=attn.scale)
        return None


class SelfAttentionObserver(CrossAttentionObserver):
    """The same hooks on a self-attention module (``attn1``): its q and k go to the recorder's self-attention
    sums (:meth:`daam_core.engine.refine.RefineSums.record_self`)."""

    def _record(self, module, args, output):
        q, k = self.q, self.k
        self.q = self.k = None
        extra = self.recorder.extra
        if q is None or k is None or extra is None or not self.recorder.active:
            return None  # a processor that skips the projections leaves nothing to read: no sums, no error
        attn = self.module
        if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
            heads = attn.heads
            q = attn.norm_q(q.unflatten(-1, (heads, -1))).flatten(-2) if attn.norm_q is not None else q
            k = attn.norm_k(k.unflatten(-1, (heads, -1))).flatten(-2) if attn.norm_k is not None else k
        extra.record_self(self.recorder, self.part, q, k, attn.heads, scale=attn.scale)
        return None


def _as_list(x, n: int | None = None) -> list[str]:
    if x is None:
        return [""] * (n or 1)
    if isinstance(x, str):
        return [x] * (n or 1)
    return list(x)


class DiffusersTrace:
    """Cross-attention tracing of a diffusers Stable Diffusion / SDXL pipeline.

    Use :func:`trace` to create it. After each pipeline call inside the context, :meth:`result`
    returns the :class:`AttentionTrace` of that call; :meth:`word_maps` and :meth:`word_map` read
    the last one directly.

    Parameters
    ----------
    pipe : diffusers pipeline with ``unet``, ``tokenizer`` and ``encode_prompt``
        StableDiffusion(XL)Pipeline and their Img2Img/Inpaint variants.
    filter : RecordFilter
        Layers, heads, time window and branches to record.
    keep_on_device : bool
        Keep the finished sums on the model's device instead of moving them to the CPU.
    refine : RefineRecording, optional
        Also record self-attention sums and/or per-head sums (:mod:`daam_core.engine.refine`).
    """

    required = ("unet", "tokenizer", "encode_prompt")
    parts = UNET_PARTS  # the network parts a filter may name

    def __init__(self, pipe, filter: RecordFilter | None = None, keep_on_device: bool = False,
                 refine: RefineRecording | None = None):
        (filter or RecordFilter()).check_parts(self.parts)
        for attr in self.required:
            if not hasattr(pipe, attr):
                raise TypeError(f"{type(pipe).__name__} is not a supported pipeline: it has no '{attr}' "
                                "(supported: Stable Diffusion 1.x/2.x, SDXL, Stable Diffusion 3 and Flux pipelines, "
                                "txt2img/img2img/inpaint)")
        self.pipe = pipe
        self.recorder = AttentionRecorder(filter)
        if refine is not None and refine.any:
            self.recorder.extra = RefineSums(refine)
        self.keep_on_device = keep_on_device
        self.traces: list[AttentionTrace] = []
        self._handles: list = []
        self._observers: dict[str, CrossAttentionObserver] = {}
        self._pending: dict | None = None  # prompts of the call whose sampling has not begun yet
        self._current: dict | None = None  # facts of the sampling being recorded
        self._staged: list[TokenLayout] | None = None
        self._clock: SamplingClock | None = None
        self._installed = False

    # -- install / uninstall ---------------------------------------------------------------------
    def install(self) -> None:
        if self._installed:
            raise RuntimeError("this trace is already installed")
        network = getattr(self.pipe, self.required[0])
        try:
            for name, module in network.named_modules():
                observer = self._observer(name, module)
                if observer is not None:
                    self._handles.extend(observer.install())
                    self._observers[name] = observer
            if not self._observers:
                raise ValueError(f"{type(network).__name__} has no {self.layer_kind} layers to trace")
            self._handles.append(network.register_forward_pre_hook(self._before_network, with_kwargs=True))
            self.pipe.encode_prompt = self._wrap_encode(self.pipe.encode_prompt)
            self._installed = True
        except BaseException:
            self.uninstall()
            raise

    layer_kind = "cross-attention"

    def _observer(self, name: str, module):
        """The observer of one module of the network, None for modules that are not traced."""
        from diffusers.models.attention_processor import Attention

        if isinstance(module, Attention) and module.is_cross_attention:
            return CrossAttentionObserver(module, self.recorder, name)
        extra = self.recorder.extra
        if isinstance(module, Attention) and extra is not None and extra.options.self_attention:
            return SelfAttentionObserver(module, self.recorder, name)
        return None

    def _wrap_encode(self, original_encode):
        """``pipe.encode_prompt`` that hands its prompts to :meth:`_capture_prompts` first."""
        signature = inspect.signature(original_encode)

        def encode_prompt(*args, **kwargs):
            self._capture_prompts(signature.bind(*args, **kwargs).arguments)
            return original_encode(*args, **kwargs)

        return encode_prompt

    def uninstall(self) -> None:
        """Remove every hook and the prompt wrapper (idempotent); processors were never replaced."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._observers.clear()
        if "encode_prompt" in vars(self.pipe):
            del self.pipe.encode_prompt
        self._finalize()
        self._installed = False

    # -- bookkeeping -----------------------------------------------------------------------------
    def stage_layouts(self, positive: Sequence[TokenLayout], negative: Sequence[TokenLayout],
                      texts: Sequence[str] = ()) -> None:
        """Token layouts for the next call that passes ``prompt_embeds`` instead of text."""
        if len(positive) != len(negative):
            raise ValueError(f"{len(positive)} positive but {len(negative)} negative layouts")
        self._staged = list(positive) + list(negative)
        self._staged_count = len(positive)
        self._staged_texts = list(texts)

    def _layout(self, text: str) -> TokenLayout:
        tok = self.pipe.tokenizer
        return tokenize(text, tok, syntax="plain", chunked=False, max_length=tok.model_max_length,
                        pad_with_end=tok.pad_token_id == tok.eos_token_id)

    def _capture_prompts(self, args: dict) -> None:
        self._finalize()
        n_img = int(args.get("num_images_per_prompt") or 1)
        cfg = bool(args.get("do_classifier_free_guidance", True))
        prompt = args.get("prompt")
        if prompt is None:
            if self._staged is None:
                raise ValueError("DAAM needs the prompt text to name words: pass `prompt=` to the pipeline, or build "
                                 "the embeddings with `tc.encode_prompt(prompt, negative_prompt)` (tc: the object "
                                 "`trace(pipe)` returned), which registers their tokens")
            layouts, n_prompts = self._staged, self._staged_count
            texts = self._staged_texts
            self._staged = None
        else:
            prompts = _as_list(prompt)
            negatives = _as_list(args.get("negative_prompt"), len(prompts))
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
            layouts = [self._layout(p) for p in prompts] + [self._layout(p) for p in negatives]
            n_prompts = len(prompts)
            texts = prompts + negatives
        n_images = n_prompts * n_img
        streams = cfg_streams(n_images, [i // n_img for i in range(n_images)], n_prompts)
        self._pending = dict(
            layouts=layouts, cfg=cfg, n_images=n_images,
            streams=streams if cfg else streams[:n_images],  # no uncond rows, no uncond sums
            rows=tuple(cfg_rows(n_images, cfg)), texts=texts)

    def _before_network(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if self._pending is not None:
            pending, self._pending = self._pending, None
            streams = pending["streams"]
            h, w = sample.shape[-2:]
            self.recorder.begin(UNetGrid((h, w)), streams, [lay.length for lay in pending["layouts"]])
            self._clock = self._sampling_clock()
            self._current = pending
            self._current["latent_hw"] = (int(h), int(w))
            self._current["unet_calls"] = 0
        if self._current is None:  # the UNet was called outside a pipeline call we saw
            self.recorder.skip_call()
            return None
        rows = self._current["rows"]
        self._current["unet_calls"] += 1
        if sample.shape[0] != len(rows):
            self.recorder.warn(f"a UNet call with batch {sample.shape[0]} does not match the expected "
                               f"{len(rows)} rows (images x CFG branches); call skipped")
            self.recorder.skip_call()
            return None
        self.recorder.set_call(rows, self._moment(args[1] if len(args) > 1 else kwargs.get("timestep")))
        return None

    # -- time (the host contract) ----------------------------------------------------------------
    timestep_scale = 1.0  # the network's timestep argument x this = the scheduler's timestep (Flux: 1000)

    def _sampling_clock(self) -> SamplingClock | None:
        """This sampling's steps (the scheduler's timesteps from its begin index) and window, None when the whole
        sampling is one sum."""
        f = self.recorder.filter
        if whole(f):
            return None
        sched = self.pipe.scheduler
        timesteps = getattr(sched, "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            raise ValueError("DAAM's time window and time buckets need the scheduler's timesteps, and this "
                             f"{type(sched).__name__} has none set when the network first runs")
        begin = getattr(sched, "begin_index", None) or 0  # img2img / inpaint start part-way
        return SamplingClock(torch.as_tensor(timesteps[begin:]).detach().to("cpu", torch.float64),
                             step_window(f.start, f.end))

    def _moment(self, timestep):
        """The recorder's time of a network call (a device sync only with a window or time buckets)."""
        if self._clock is None:
            return 0.0
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        return self._clock.moment(t * self.timestep_scale)

    def _finalize(self) -> None:
        if self._current is None:
            return
        cur, self._current = self._current, None
        recorded = self.recorder.finish()
        if not recorded.sums:
            return
        scale = getattr(self.pipe, "vae_scale_factor", 8)
        h, w = cur["latent_hw"]
        n_prompts = len(cur["layouts"]) // 2
        meta = {"pipeline": type(self.pipe).__name__, "cfg": cur["cfg"], "unet_calls": cur["unet_calls"],
                "num_images": cur["n_images"], "prompts": cur["texts"][:n_prompts],
                "negative_prompts": cur["texts"][n_prompts:]}
        self.traces.append(AttentionTrace.from_recorder(
            recorded, cur["layouts"], (h * scale, w * scale), meta,
            device=None if self.keep_on_device else "cpu"))

    # -- results ---------------------------------------------------------------------------------
    def result(self, index: int = -1) -> AttentionTrace:
        """The trace of a finished pipeline call (default: the last one)."""
        self._finalize()
        if not self.traces:
            raise RuntimeError("nothing was traced yet: call the pipeline inside the `with trace(pipe)` block")
        return self.traces[index]

    def encode_prompt(self, prompt, negative_prompt="", syntax: str = "comfy") -> dict:
        """Long / weighted prompt embeddings for the next call, with their tokens registered.

        ``pipe(**tc.encode_prompt("a (red:1.3) car ..."), ...)``; see :func:`daam_core.hosts.diffusers.prompt.encode_prompt`.
        """
        from .prompt import encode_prompt

        return encode_prompt(self.pipe, prompt, negative_prompt, syntax=syntax, trace=self)

    def word_maps(self, words, **kwargs) -> torch.Tensor:
        """``result().word_maps(words, ...)``: ``[images, words, H, W]``."""
        return self.result().word_maps(words, **kwargs)

    def word_map(self, word: str, **kwargs):
        """``result().word_map(word, ...)``: a :class:`WordHeatMap`."""
        return self.result().word_map(word, **kwargs)

    def __enter__(self) -> "DiffusersTrace":
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()

