"""What the ComfyUI nodes ask of the host adapter: a checked record filter before sampling, the trace after it.

The nodes (``nodes/nodes.py``) only turn ComfyUI types and widget values into these calls. Everything that
depends on the model family (UNet, SD3, Flux), the prompts' token layouts and the proof that the texts are the
ones the sampler was conditioned on lives here. Pure Python over the host's objects: no ComfyUI import.
"""

from __future__ import annotations

import torch

from ...engine.geometry import UNET_PARTS
from ...engine.recorder import RecordFilter
from ...engine.refine import DEFAULT_MAX_QUERIES, RefineRecording, RefineSums
from ...engine.trace import AttentionTrace
from ...text.layout import TokenLayout
from ..contract import parse_blocks
from .dit import DiTTraceSession, conditioning_layout
from .families import dit_spec
from .session import TraceSession, session_of
from .tokens import layout_from_comfy_tokens

__all__ = ["new_session", "refine_recording", "refined_word_maps", "record_filter", "check_heads", "check_blocks",
           "comfy_layout", "check_text", "build_trace", "heatmap_trace", "session_of", "vae_factor"]


# -- before sampling: what to record ----------------------------------------------------------------------------
def new_session(model, filter: RecordFilter, refine: RefineRecording | None = None) -> TraceSession:
    """The tracing session for ``model``'s family: UNet cross-attention, or SD3/Flux joint attention.

    ``refine`` (UNets): also record self-attention sums and/or per-head sums (:mod:`daam_core.engine.refine`).
    Self-attention sums need the session's ``attn1_patch`` installed on the clone beside its ``attn2_patch``
    (``m.set_model_attn1_patch(session.attn1_patch)``); per-head sums need nothing more.

    Raises
    ------
    ValueError
        For a family DAAM cannot trace, naming it; refinements asked of a joint-attention model.
    """
    spec = dit_spec(getattr(model, "model", None))
    if spec is not None:
        if refine is not None and refine.unet_only:
            raise ValueError(f"self-attention propagation and head weighting are for UNet models; {spec.label} uses "
                             "joint attention: turn off record_self_attention and record_head_sums")
        if refine is not None and refine.output_similarity and spec.family.attention != "joint":
            raise ValueError(f"output similarity needs joint attention over text and image; {spec.label} has a "
                             "separate cross-attention (no text outputs): turn off record_output_similarity")
        session = DiTTraceSession(filter, spec)
    else:
        if refine is not None and refine.output_similarity:
            raise ValueError("output similarity is for joint-attention models (SD3, Flux, ...); a UNet's "
                             "cross-attention has no text outputs: turn off record_output_similarity")
        session = TraceSession(filter)
    if refine is not None and refine.any:
        session.recorder.extra = RefineSums(refine)
    return session


def refine_recording(self_attention: bool, head_sums: bool, max_queries: int = DEFAULT_MAX_QUERIES,
                     output_similarity: bool = False) -> RefineRecording | None:
    """What 'DAAM Trace Model' records for the refinements its heat-map nodes may ask: self-attention sums (for
    ``propagate_steps``) at the resolutions of at most ``max_queries`` latent cells, per-head sums (for
    ``head_power``), output-similarity sums (for ``map_source``); None for plain DAAM (nothing extra is
    recorded)."""
    if max_queries < 1:
        raise ValueError(f"self_attention_max must be >= 1, got {max_queries}")
    opts = RefineRecording(self_attention=bool(self_attention), max_queries=int(max_queries),
                           head_sums=bool(head_sums), output_similarity=bool(output_similarity))
    return opts if opts.any else None


MAP_SOURCES = {"attention": "attention", "output similarity": "output"}  # node label -> word_maps(source=...)
PROPAGATE_AT = {"each resolution": "each", "finest resolution": "finest", "both": "both"}  # label -> propagate_at


def refined_word_maps(trace: AttentionTrace, words, *, propagate_steps: int = 0, head_power: float = 0.0,
                      map_source: str = "attention", propagate_at: str = "each resolution", exclusive: bool = False,
                      rivals=(), **kwargs) -> torch.Tensor:
    """``trace.word_maps(words, propagate=..., head_power=..., source=..., propagate_at=..., exclusive=...,
    rivals=..., **kwargs)`` with errors that name the node inputs when the trace lacks the sums a refinement
    needs."""
    source = MAP_SOURCES.get(map_source)
    if source is None:
        raise ValueError(f"unknown map_source {map_source!r}; use one of {list(MAP_SOURCES)}")
    at = PROPAGATE_AT.get(propagate_at)
    if at is None:
        raise ValueError(f"unknown propagate_at {propagate_at!r}; use one of {list(PROPAGATE_AT)}")
    if propagate_steps and not trace.self_sums:
        raise ValueError("propagate_steps needs self-attention sums: turn on record_self_attention in "
                         "'DAAM Trace Model' (UNet models; resolutions up to its self_attention_max are recorded)")
    if head_power and not trace.head_sums:
        raise ValueError("head_power needs per-head sums: turn on record_head_sums in 'DAAM Trace Model' (UNet models)")
    if source == "output" and not trace.output_sums:
        raise ValueError("map_source 'output similarity' needs output-similarity sums: turn on "
                         "record_output_similarity in 'DAAM Trace Model' (joint-attention models: SD3, Flux, ...)")
    return trace.word_maps(words, propagate=propagate_steps, head_power=head_power, source=source, propagate_at=at,
                           exclusive=exclusive, rivals=rivals, **kwargs)


def record_filter(model, *, factors, parts, parts_choices: dict, parts_label: str, resolutions_label: str,
                  heads: tuple[int, ...] | None, start: float, end: float, negative: bool, time_buckets: int,
                  blocks: str) -> RecordFilter:
    """The :class:`RecordFilter` of 'DAAM Trace Model', checked against the model it will trace.

    Parameters
    ----------
    model : ModelPatcher
        The MODEL to trace (its family decides which parts, heads and blocks exist).
    factors, parts : tuple or None
        Resolved widget values (layer factors; network parts).
    parts_choices : dict label -> tuple or None
        The node's ``unet_parts`` choices, to name the valid ones in errors.
    parts_label, resolutions_label : str
        The widget values as the user chose them, for messages.
    heads : tuple of int or None
    start, end : float
        The host's percents of the sampling (read through ``percent_to_sigma`` while sampling).
    negative : bool
        Record the negative prompt's maps.
    time_buckets : int
    blocks : str
        Transformer block ranges (:func:`~daam_core.hosts.contract.parse_blocks`).

    Raises
    ------
    ValueError
        A family DAAM cannot trace, or an option that does not exist in this model.
    """
    if start > end:
        raise ValueError(f"start_percent ({start}) must not exceed end_percent ({end})")
    spec = dit_spec(getattr(model, "model", None))  # a family DAAM cannot trace is an error here
    if spec is not None:
        if factors is not None:
            raise ValueError(f"{spec.label} has one resolution (the latent in {spec.patch}x{spec.patch} patches): "
                             f"set resolutions to 'all' (got {resolutions_label!r})")
        if parts is not None and not set(parts) <= set(spec.parts):
            valid = ", ".join(k for k, v in parts_choices.items() if v is None or set(v) <= set(spec.parts))
            raise ValueError(f"unet_parts {parts_label!r} does not exist in {spec.label}: use {valid}")
    elif parts is not None and not set(parts) <= set(UNET_PARTS):
        raise ValueError(f"unet_parts {parts_label!r} is for a transformer; this UNet has down, mid and up")
    if heads is not None:
        check_heads(model, heads, spec)
    ranges = check_blocks(blocks, spec, parts)
    return RecordFilter(factors=factors, parts=parts, heads=heads, blocks=ranges, start=start, end=end,
                        branches=("cond", "uncond") if negative else ("cond",), time_buckets=int(time_buckets))


def model_heads(model) -> int | None:
    """The smallest head count among a UNet's cross-attention layers, read from its config."""
    config = getattr(getattr(getattr(model, "model", None), "model_config", None), "unet_config", None) or {}
    heads, head_channels = config.get("num_heads", -1), config.get("num_head_channels", -1)
    if heads and heads > 0:
        return int(heads)
    if head_channels and head_channels > 0 and config.get("model_channels"):
        return int(config["model_channels"]) // int(head_channels)  # the first level has the fewest heads
    return None


def check_heads(model, heads: tuple[int, ...], spec=None) -> None:
    """Raise when a head index does not exist in the model (``spec``: its :class:`DiTSpec`, None for a UNet)."""
    n = spec.heads if spec is not None else model_heads(model)
    if n is not None and max(heads) >= n:
        raise ValueError(f"DAAM: heads {[h for h in heads if h >= n]} do not exist: this model's cross-attention "
                         f"layers have {n} heads (0..{n - 1}) at their fewest")


def check_blocks(spec_text: str, spec, parts: tuple[str, ...] | None = None) -> tuple | None:
    """The block ranges of ``spec_text`` checked against the model's blocks and the recorded ``parts``.

    Returns
    -------
    tuple of (part, start, stop) or None
        None = every block.
    """
    ranges = parse_blocks(spec_text or "")
    if ranges is None:
        return None
    if spec is None:
        raise ValueError(f"blocks {spec_text!r} is for SD3/Flux and other transformers; on a UNet choose layers with "
                         f"resolutions and unet_parts, and leave blocks empty")
    for part, start, stop in ranges:
        if part not in spec.parts:
            raise ValueError(f"blocks: {spec.label} has no {part!r} blocks; its parts are {list(spec.parts)}")
        if parts is not None and part not in parts:
            raise ValueError(f"blocks: {part}:{start}-{stop - 1} names {part!r} blocks, but unet_parts records only "
                             f"{'/'.join(parts)} blocks, so the range would select nothing: set unet_parts to 'all' "
                             f"or drop the {part!r} range")
        if stop > spec.block_count(part):
            raise ValueError(f"blocks: {part}:{start}-{stop - 1} is past the last {part} block of this "
                             f"{spec.label} ({part}:0-{spec.block_count(part) - 1})")
    return ranges


# -- after sampling: the trace ----------------------------------------------------------------------------------
def comfy_layout(tokenizer, text: str) -> TokenLayout:
    """Token layout of ``text`` exactly as a UNet model's tokenizer (``clip.tokenizer``) encodes it."""
    tokens = tokenizer.tokenize_with_weights(text, return_word_ids=True)
    key = next((k for k in ("l", "g", "h") if k in tokens), None) or next(iter(tokens))
    sd_tokenizer = getattr(tokenizer, f"clip_{key}", None)
    hf = getattr(sd_tokenizer, "tokenizer", None)
    if hf is None:
        raise ValueError(f"DAAM supports CLIP text encoders (SD1.x, SD2.x, SDXL); this CLIP's tokenizer "
                         f"({type(tokenizer).__name__}) is not one")
    return layout_from_comfy_tokens(tokens[key], hf, prompt=text)


def check_text(clip, text: str, conditioning: torch.Tensor, which: str) -> None:
    """Raise when ``text`` does not encode to the conditioning the sampler used.

    Parameters
    ----------
    clip : comfy.sd.CLIP
    text : str
    conditioning : Tensor ``[1, T, C]``
        The sampler's conditioning (its first ``cross_attn``).
    which : {"positive", "negative"}
    """
    encoded = clip.encode_from_tokens(clip.tokenize(text))
    encoded = (encoded[0] if isinstance(encoded, (tuple, list)) else encoded)[:1].detach().to("cpu", torch.float32)
    if encoded.shape[-1] != conditioning.shape[-1]:
        raise ValueError(f"the {which} text encodes to {encoded.shape[1]} tokens of width {encoded.shape[-1]} but the "
                         f"sampler's {which} conditioning has {conditioning.shape[1]} tokens of width "
                         f"{conditioning.shape[-1]}: this CLIP is not the text encoder that made the conditioning "
                         f"(another model family?); give DAAM the CLIP that encoded it")
    if encoded.shape != conditioning.shape:
        raise ValueError(f"the {which} text encodes to {encoded.shape[1]} tokens but the sampler's {which} conditioning "
                         f"has {conditioning.shape[1]}: give DAAM the same text and CLIP that encoded the conditioning")
    tol = 1e-3 * float(conditioning.abs().max().clamp_min(1e-6))
    if not torch.allclose(encoded, conditioning, rtol=1e-3, atol=tol):
        raise ValueError(f"the {which} text given to DAAM is not the text the sampler's {which} conditioning was "
                         f"encoded from (same token count, different words or weights): connect the same text to "
                         f"CLIP Text Encode and to DAAM Heatmaps (conditionings changed after encoding, e.g. averaged, "
                         f"cannot be mapped to words)")


def vae_factor(model, default: int | None = None) -> int:
    """Pixels per latent cell: the latent format's ``spacial_downscale_ratio`` (8 for SD; 1 for pixel space), else
    ``default`` (a family's :attr:`~.families.JointFamily.pixels_per_cell`), else 8."""
    fmt = model.get_model_object("latent_format") if hasattr(model, "get_model_object") else None
    fallback = default or 8
    return max(1, int(getattr(fmt, "spacial_downscale_ratio", fallback) or fallback))


def decoded_frames(count: int, videos: int, frames: int) -> list[int] | None:
    """The latent frame (trace image) each of ``count`` decoded video frames shows, or None when ``count`` is not a
    decoding of ``videos`` videos of ``frames`` latent frames.

    A causal video VAE (Wan's: ``1 + 4 (frames - 1)`` frames) decodes latent frame 0 to one frame and every later
    latent frame to ``r`` frames: decoded frame ``d`` of a video shows latent frame ``ceil(d / r)``.
    """
    if frames < 2 or count % videos:
        return None
    n = count // videos
    r, rest = divmod(n - 1, frames - 1)
    if rest or r < 2:
        return None
    return [b * frames + -(-d // r) for b in range(videos) for d in range(n)]


def build_trace(model, clip, samples, positive: str, negative: str, images=None) -> AttentionTrace:
    """The trace of the sampling that produced ``samples``, with the prompts' token layouts.

    Parameters
    ----------
    model : ModelPatcher
        The traced MODEL the sampler used.
    clip : comfy.sd.CLIP or its tokenizer
        The CLIP that encoded the prompts: its tokenizer gives the layouts, and re-encoding the texts proves they
        are the ones the sampler was conditioned on. A bare tokenizer (``clip.tokenizer``) gives the layouts
        without that proof, for callers that built the conditioning by hand.
    samples : dict or Tensor
        The sampler's LATENT (picks the sampling).
    positive, negative : str
        The prompt texts.
    images : Tensor ``[B, H, W, 3]``, optional
        The decoded images (their size is the maps' size); default the latent size times the VAE factor. A
        video's trace has one image per latent frame (video ``b``'s frame ``f`` is image ``b * frames + f``), or,
        given the decoded frames (:func:`decoded_frames`), one per decoded frame, each the map of its latent frame.
    """
    tokenizer = getattr(clip, "tokenizer", clip)
    session = session_of(model)
    latent = samples["samples"] if isinstance(samples, dict) else samples
    record = session.find(latent)
    pos_count, neg_count = record.token_counts
    if isinstance(session, DiTTraceSession):  # the family's encoders, in its order on the token axis
        encoders = getattr(clip, "cond_stage_model", None)
        family = session.spec.family

        def layout_of(text, tokens, count):
            own = conditioning_layout(tokenizer, text, tokens, encoders, family)
            return family.call_layout(own, count, tokenizer, text, encoders)
    else:
        def layout_of(text, tokens, count):
            return comfy_layout(tokenizer, text)
    texts = [("positive", positive, pos_count, record.conditionings[0])]
    if neg_count is not None:
        texts.append(("negative", negative, neg_count, record.conditionings[1]))
    layouts = []
    for which, text, count, cond in texts:
        tokens = int(cond.shape[1])  # the conditioning's; count: a model call's text (the network may pad it)
        if isinstance(session, DiTTraceSession):  # a host node may have wrapped the prompt (a system prompt)
            text = session.spec.family.encoded_text(tokenizer, text, tokens)
        layout = layout_of(text, tokens, count)
        if layout.length != count:
            raise ValueError(f"the {which} text has {layout.length} tokens but the sampler's {which} conditioning "
                             f"has {count}: give DAAM the same text and CLIP that encoded the conditioning")
        if hasattr(clip, "encode_from_tokens"):
            check_text(clip, text, cond, which)
        layouts.append(layout)
    h, w = record.recorded.latent_hw
    source = None  # decoded video frames: the latent frame each one shows
    if images is not None:
        videos, frames = record.latent.shape[0], record.recorded.frames
        if images.shape[0] != videos * frames:
            source = decoded_frames(images.shape[0], videos, frames)
            if source is None:
                what = f"{videos} latents" if frames == 1 else \
                    (f"{videos} video(s) of {frames} latent frames (one image per latent frame, or the decoded "
                     f"frames: 1 + r * {frames - 1} per video)")
                raise ValueError(f"{images.shape[0]} images given for a sampling of {what}")
        image_hw = (int(images.shape[1]), int(images.shape[2]))
    else:
        family = session.spec.family if isinstance(session, DiTTraceSession) else None
        factor = vae_factor(model, getattr(family, "pixels_per_cell", None))
        image_hw = (h * factor, w * factor)
    meta = {"positive": positive, "negative": negative, "host": "comfyui"}
    trace = AttentionTrace.from_recorder(record.recorded, layouts, image_hw, meta)
    if source is not None:
        trace = trace.repeat_images(source)
    trace.warnings += record.notes
    if not trace.sums:
        if record.attention_marks and not record.attention_seen:
            raise ValueError("DAAM recorded nothing: another node replaced DAAM's attention override "
                             "(transformer_options['optimized_attention_override']) after 'DAAM Trace Model' without "
                             "calling it. Apply that node before DAAM, or use one that calls the previous override")
        why = "".join(f"; {w}" for w in trace.warnings)
        raise ValueError("no cross-attention was recorded in this sampling (check the resolutions, UNet parts and "
                         f"time window of 'DAAM Trace Model'){why}")
    return trace


def heatmap_trace(model, clip, samples, positive: str, negative: str, negative_words: list[str],
                  images=None) -> AttentionTrace:
    """:func:`build_trace`, refusing negative words when the sampling has no negative maps (cfg 1 never evaluates
    the negative prompt; Flux.1's guidance is distilled), on every family."""
    trace = build_trace(model, clip, samples, positive, negative, images)
    if negative_words and "uncond" not in trace.branches():
        session: TraceSession = session_of(model)
        raise ValueError(f"DAAM: negative words {negative_words} cannot be mapped: {session.no_negative_reason()}")
    return trace
