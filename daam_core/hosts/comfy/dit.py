"""DAAM on ComfyUI's joint-attention transformers (the families of :mod:`.families`: SD3 / SD3.5, Flux.1, ...).

These models run one attention over the text and image tokens together. The hook is the same public
``optimized_attention_override`` the UNet path uses; no block ``forward`` is replaced. The session knows what
holds for every family; the family entry knows the rest (:class:`~.families.JointFamily`):

- how long the text is on a call: ComfyUI batches conditionings of different lengths by repeating each to their
  least common multiple, so the call's text length is the ``lcm`` of its rows' text lengths (a row's is its
  conditioning's length, or what the family's network makes of it: :meth:`JointFamily.text_length`);
- which calls are joint: the key length must be exactly what the family's sequence holds (text, image, the
  family's extra tokens); any other attention (SD3.5's image-only ``x_block_self_attn``) is not recorded;
- where text and image sit on the sequence and the layer's name: :meth:`JointFamily.spans`, :meth:`JointFamily.layer`.

A family with ``attention = "cross"`` (Wan) has a separate cross-attention instead: a call is recorded when its
keys are the call's text and its queries the image tokens, as a UNet's cross-attention is.

The spatial grid is the latent cut into patches (:class:`~daam_core.engine.geometry.PatchGrid`); a video family's
is every frame cut into patches (:class:`~daam_core.engine.geometry.VideoGrid`).
"""

from __future__ import annotations

import math

from ...engine.geometry import PatchGrid, VideoGrid
from .families import FAMILIES, DiTSpec, dit_spec
from .session import TraceSession, heads_first, refuse_split

__all__ = ["DiTSpec", "DiTTraceSession", "conditioning_layout", "dit_spec", "image_tokens", "text_segments"]


def image_tokens(hw: tuple[int, int], patch: int) -> int:
    """Tokens of a ``h x w`` latent cut into ``patch x patch`` patches (the host pads it up)."""
    return math.ceil(hw[0] / patch) * math.ceil(hw[1] / patch)


class DiTTraceSession(TraceSession):
    """:class:`TraceSession` for a joint-attention model: every joint call is recorded through the attention
    override alone (no ``attn2`` patch; these models have none)."""

    def __init__(self, filter, spec: DiTSpec):
        super().__init__(filter)
        self.spec = spec
        if spec.family.video:
            self.latent_axes = ("frames", "height", "width")
        self._joint_index = 0
        self._call_layout: tuple[int, int, int] | None = None  # (text tokens, image tokens, reference tokens)
        self._uuid_length: dict = {}  # conditioning uuid -> its token count

    # -- sampling ----------------------------------------------------------------------------
    def _start(self, guider, noise, sigmas=None):
        super()._start(guider, noise, sigmas)
        conds = getattr(guider, "conds", {}) or {}
        self._uuid_length = {e["uuid"]: self._text_length(e) for entries in conds.values()
                             for e in entries or [] if e.get("cross_attn") is not None and "uuid" in e}

    def _text_length(self, cond: dict) -> int:
        return self.spec.family.text_length(cond)

    def _grid(self):
        if self.spec.family.video:
            return VideoGrid(self._latent_size, self.spec.patch, self.spec.frame_patch, self.spec.parts)
        return PatchGrid(self._latent_hw, self.spec.patch, self.spec.parts)

    def no_negative_reason(self) -> str:
        return self.spec.family.no_negative_reason() or super().no_negative_reason()

    # -- one model call ----------------------------------------------------------------------
    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                    **kwargs):
        refuse_split(transformer_options)
        self._joint_index = 0
        self._call_layout = None
        try:
            self._set_call(x, t, transformer_options)
            if self.recorder.active:
                self._call_layout = self._layout_of_call(transformer_options, kwargs)
                if self._call_layout is None:
                    self.recorder.skip_call()
                else:
                    self._marks += 1  # a model call whose joint attention should reach DAAM's override
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            self.recorder.skip_call()
            self._call_layout = None

    def _layout_of_call(self, options, conds) -> tuple[int, int, int] | None:
        counts = [self._uuid_length.get(u) for u in options.get("uuids") or []]
        if not counts or None in counts:
            return None  # a conditioning DAAM does not know: its length is unknown
        text = math.lcm(*counts)
        refs = sum(image_tokens(tuple(r.shape[-2:]), self.spec.patch) for r in (conds.get("ref_latents") or [])) \
            if self.spec.family.reference_latents else 0
        refs += self.spec.family.trailing_tokens(self.spec, conds)
        n_img = self.recorder.grid.n_image
        if self.spec.family.attention == "cross" and text == n_img:
            self.recorder.warn(f"the text has as many tokens ({text}) as the latent has patches, so its "
                               f"cross-attention cannot be told from the self-attention by its keys; model calls "
                               f"of this sampling were not recorded (change the size or the frame count)")
            return None
        return text, n_img, refs

    # -- attention ---------------------------------------------------------------------------
    def attention_override(self, previous):
        """An ``optimized_attention_override`` that records joint calls and defers to ``previous``.

        When the host's own function is PyTorch's (``attention_pytorch``, e.g. ``--use-pytorch-cross-attention``)
        and no other override sits below DAAM, a joint call runs through the engine's ``attend_joint``: a fused
        kernel that also returns each query's log-sum-exp replaces the host's call only where it was proven equal
        to it bit for bit (checked once per input signature), so recording costs only the text-key scores.
        """

        def override(func, *args, **kwargs):
            call = self._joint_call(args, kwargs) if self._call_layout is not None and self.recorder.active else None
            if call is None:
                return previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
            q, k, v = (heads_first(x, call["heads"], call["skip_reshape"], call["dim_head"]) for x in args[:3])
            mask = kwargs.get("mask", args[4] if len(args) > 4 else None)  # by name, or by position (Lumina, LTXV)
            if call["cross"]:
                out = previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
                self.recorder.record(call["name"], call["part"], q, k, call["heads"], scale=kwargs.get("scale"),
                                     mask=mask)
                return out
            if previous is None and getattr(func, "__name__", "") == "attention_pytorch" \
                    and not kwargs.get("skip_output_reshape", False) and not kwargs.get("enable_gqa", False) \
                    and v.shape == k.shape == q.shape:
                b, heads = q.shape[0], call["heads"]

                def finish(o):  # the kernel's [B, H, L, D] as attention_pytorch returns it: [B, L, H * D]
                    return o.transpose(1, 2).reshape(b, -1, heads * o.shape[-1])

                out = self.recorder.attend_joint(call["name"], call["part"], q, k, v, heads, text=call["text"],
                                                 image=call["image"], reference=lambda: func(*args, **kwargs),
                                                 finish=finish, scale=kwargs.get("scale"), mask=mask)
            else:
                out = previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
                self.recorder.record_joint(call["name"], call["part"], q, k, call["heads"], text=call["text"],
                                           image=call["image"], scale=kwargs.get("scale"), mask=mask)
            if self.recorder.extra is not None:  # output-similarity sums (RefineRecording.output_similarity)
                flat = out.transpose(1, 2).flatten(2) if kwargs.get("skip_output_reshape", False) else out
                self.recorder.extra.record_output(self.recorder, call["name"], call["part"], flat, call["text"],
                                                  call["image"], mask=mask)
            return out

        return override

    def _joint_call(self, args, kwargs) -> dict | None:
        """Where the text and image are on this call's sequence, or None when it is not a joint call."""
        if len(args) < 3:
            return None
        q, k = args[0], args[1]
        heads = args[3] if len(args) > 3 else kwargs.get("heads")
        if not (hasattr(q, "shape") and hasattr(k, "shape")) or heads is None:
            return None  # e.g. tensors still wrapped in a container the host did not unwrap
        skip_reshape = bool(kwargs.get("skip_reshape", False))
        length = k.shape[2] if skip_reshape else k.shape[1]
        text, n_img, refs = self._call_layout
        spec = self.spec
        options = kwargs.get("transformer_options") or {}
        name, part = spec.layer(self._joint_index, options)
        cross = spec.family.attention == "cross"
        if cross:  # keys: the text alone; queries: the image tokens
            if length != text:
                return None  # self-attention, or I2V's image-prompt attention
            self._joint_index += 1
            if (q.shape[2] if skip_reshape else q.shape[1]) != n_img:
                self.recorder.warn(f"{name}: a cross-attention with queries besides the {n_img} latent patches "
                                   f"(reference frames?) was not recorded")
                return None
            text_span, image_span = (0, text), (0, n_img)
        else:
            text_span, image_span, expected = spec.family.spans(spec, part, text, n_img, refs)
            if length != expected:
                return None  # not a joint call (SD3.5's image-only attention, or another model's attention)
            self._joint_index += 1
        self._seen += 1
        dim_head = q.shape[-1] if skip_reshape else q.numel() // (q.shape[0] * q.shape[1] * int(heads))
        return {"name": name, "part": part, "heads": int(heads), "text": text_span, "image": image_span,
                "skip_reshape": skip_reshape, "dim_head": dim_head, "cross": cross}


# -- text: where each encoder's tokens lie on the conditioning's token axis ------------------------------------
def text_segments(tokenizer, tokens: dict, encoders=None, family=None) -> list[list[tuple[str, str, int]]]:
    """Candidate layouts of a DiT conditioning's token axis, most likely first.

    Parameters
    ----------
    tokenizer : SD3Tokenizer or FluxTokenizer-like
        The CLIP's tokenizer (``clip.tokenizer``).
    tokens : dict
        ``tokenizer.tokenize_with_weights(text, return_word_ids=True)``.
    encoders : object, optional
        The CLIP's ``cond_stage_model``: which encoders are loaded decides the segments.
    family : JointFamily, optional
        The model's family (:attr:`DiTSpec.family`); without it every registered family's candidates are tried
        and the conditioning's length picks one.

    Returns
    -------
    list of list of (segment, key, length)
        ``segment`` names the encoder (``"clip"``, ``"t5"``), ``key`` the ``tokens`` entry it is read from, in
        sequence order.
    """
    return [c for _, c in _candidates(tokenizer, tokens, encoders, family)]


def _candidates(tokenizer, tokens, encoders, family):
    """``(family, segments)`` of :func:`text_segments`."""
    out, seen = [], []
    for f in [family] if family is not None else FAMILIES:
        for c in f.text_segments(tokenizer, tokens, encoders):
            if c and c not in seen:
                seen.append(c)
                out.append((f, c))
    return out


def _hf_tokenizer(tokenizer, key: str):
    """The Hugging Face tokenizer of a ``tokenize_with_weights`` key: the host keeps it as ``clip_<key>`` (SD1
    tokenizers, PixArt's T5, Wan's umT5) or as ``<key>`` (SD3's and Flux's T5); the host's own SentencePiece
    tokenizer (umT5) is read through :class:`~.tokens.SentencePieceView`."""
    sub = getattr(tokenizer, f"clip_{key}", None) or getattr(tokenizer, key, None)
    hf = getattr(sub, "tokenizer", None)
    if hf is None:
        raise ValueError(f"DAAM: this CLIP's tokenizer ({type(tokenizer).__name__}) has no {key!r} tokenizer")
    if not hasattr(hf, "convert_ids_to_tokens") and hasattr(getattr(hf, "tokenizer", None), "id_to_piece"):
        from .tokens import SentencePieceView

        return SentencePieceView(hf)  # the host's own SentencePiece tokenizer (umT5)
    return hf


def conditioning_layout(tokenizer, text: str, count: int, encoders=None, family=None):
    """The token layout of a DiT prompt over its whole conditioning, one named segment per text encoder.

    Parameters
    ----------
    tokenizer : SD3Tokenizer or FluxTokenizer-like
        ``clip.tokenizer``; it tokenizes ``text`` exactly as the host did.
    text : str
        The prompt.
    count : int
        Token count of the sampler's conditioning (its ``cross_attn.shape[1]``); a family whose network pads the
        text gives the layout over a model call's text with :meth:`~.families.JointFamily.call_layout`.
    encoders : object, optional
        ``clip.cond_stage_model``, see :func:`text_segments`.
    family : JointFamily, optional
        The model's family, see :func:`text_segments`.

    Returns
    -------
    TokenLayout
        ``length == count``; segments ``"clip"`` (SD3's CLIP-L/G) and/or ``"t5"``, so a word query can take
        either (``segments=`` of ``positions`` / ``word_maps``; default both).
    """
    from ...text.layout import concat_layouts
    from .tokens import layout_from_comfy_t5, layout_from_comfy_tokens

    tokens = tokenizer.tokenize_with_weights(text, return_word_ids=True)
    candidates = _candidates(tokenizer, tokens, encoders, family)
    owner, segments = next(((f, c) for f, c in candidates if sum(n for _, _, n in c) == count), (None, None))
    if segments is None:
        found = " or ".join("+".join(f"{s} {n}" for s, _, n in c) for _, c in candidates)
        raise ValueError(f"the text encodes to {found} tokens but the sampler's conditioning has {count}: give DAAM "
                         f"the same text and CLIP that encoded the conditioning")
    own = owner.layout(tokenizer, tokens, text, segments)
    if own is not None:
        return own
    parts = []
    for kind, key, n in segments:
        hf = _hf_tokenizer(tokenizer, key)
        if kind == "t5":
            parts.append(("t5", layout_from_comfy_t5(tokens[key], hf, prompt=text)))
        else:  # CLIP tokens up to the segment's length: a whole number of 77-token chunks
            chunks, total = [], 0
            for c in tokens[key]:
                if total >= n:
                    break
                chunks.append(c)
                total += len(c)
            parts.append(("clip", layout_from_comfy_tokens(chunks, hf, prompt=text)))
    if len(parts) == 1 and parts[0][0] == "t5":  # one T5 encoder: its layout names its segment itself
        return parts[0][1]
    return concat_layouts(parts)  # named segments, also with one CLIP encoder alone
