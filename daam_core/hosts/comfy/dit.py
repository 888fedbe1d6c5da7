"""DAAM on ComfyUI's joint-attention transformers: SD3 / SD3.5 (MMDiT) and Flux.1.

These models run one attention over the text and image tokens together. The hook is the same public
``optimized_attention_override`` the UNet path uses; no block ``forward`` is replaced. What this adapter knows
and the engine does not:

- which model family it is (:func:`dit_spec`), and an error naming any family DAAM cannot trace;
- where the text and the generated image sit on each call's sequence axis: SD3 ``[registers, text, image]``,
  Flux ``[text, image, reference latents]`` (Kontext-style references come after the generated image and are
  never mapped), Flux double blocks with ``flipped_img_txt`` ``[image, text]``;
- how long the text is on a call: ComfyUI batches conditionings of different lengths by repeating each to their
  least common multiple, so the call's text length is the ``lcm`` of its rows' conditioning lengths;
- which calls are joint: the key length must be exactly registers + text + image + references. SD3.5's
  image-only ``x_block_self_attn`` call (keys = image tokens) and any other attention are not;
- the layer name: Flux on ComfyUI >= 0.3.7x sets ``transformer_options["block_type"]`` and ``["block_index"]``;
  without them (0.3.64, SD3) the n-th joint call of a model call is the n-th block (the blocks run in order).

The spatial grid is the latent cut into patches (:class:`~daam_core.engine.geometry.PatchGrid`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...engine.geometry import FLUX_PARTS, MMDIT_PARTS, PatchGrid
from .session import TraceSession, refuse_split

SUPPORTED = "SD1.x, SD2.x, SDXL (UNet), SD3 / SD3.5 (MMDiT) and Flux.1 (dev, schnell, Kontext)"


@dataclass(frozen=True)
class DiTSpec:
    """What the adapter needs to know about one joint-attention model.

    Attributes
    ----------
    family : str
        ``"sd3"`` or ``"flux"``.
    label : str
        Name for messages (``"SD3 / SD3.5 (MMDiT)"``, ``"Flux.1"``).
    patch : int
        Patch size: a ``h x w`` latent has ``ceil(h / patch) * ceil(w / patch)`` image tokens.
    parts : tuple of str
        Network parts of its layers (``("joint",)`` or ``("double", "single")``).
    heads : int
        Attention heads of every block.
    double_blocks : int
        Flux: double-stream blocks, which run before the single-stream ones (0 for SD3).
    single_blocks : int
        Flux: single-stream blocks; SD3: joint blocks.
    registers : int
        SD3 register tokens put before the text (0 for the released SD3 / SD3.5 models).
    image_first : bool
        Flux double blocks with ``flipped_img_txt``: the image comes before the text.
    distilled_guidance : bool
        Flux.1: guidance is distilled into the model (dev: a guidance embedding; schnell: none), so the usual
        sampling at cfg 1 never evaluates a negative prompt.
    """

    family: str
    label: str
    patch: int
    parts: tuple[str, ...]
    heads: int
    double_blocks: int = 0
    single_blocks: int = 0
    registers: int = 0
    image_first: bool = False
    distilled_guidance: bool = False

    def layer(self, index: int, options: dict) -> tuple[str, str]:
        """``(name, part)`` of the ``index``-th joint call of a model call (``options``: the call's
        ``transformer_options``; its ``block_type`` / ``block_index`` win when the host sets them)."""
        if self.family == "sd3":
            return f"joint.{index}", "joint"
        kind, number = options.get("block_type"), options.get("block_index")
        if kind in FLUX_PARTS and isinstance(number, int):
            return f"{kind}.{number}", kind
        if index < self.double_blocks:
            return f"double.{index}", "double"
        return f"single.{index - self.double_blocks}", "single"


def _family_name(model) -> str:
    """A readable name of a ComfyUI model (``BaseModel``) for errors: its config and network classes."""
    config = getattr(model, "model_config", None)
    names = [type(model).__name__]
    if config is not None:
        names.append(type(config).__name__)
    net = getattr(model, "diffusion_model", None)
    if net is not None:
        names.append(type(net).__name__)
    seen = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return " / ".join(seen)


def dit_spec(model) -> DiTSpec | None:
    """The joint-attention description of a ComfyUI model, None for a UNet.

    Parameters
    ----------
    model : comfy.model_base.BaseModel
        ``ModelPatcher.model``.

    Raises
    ------
    ValueError
        For a model family DAAM cannot trace, naming it.
    """
    net = getattr(model, "diffusion_model", None)
    modules = {f"{c.__module__}.{c.__name__}" for c in type(net).__mro__}
    config = getattr(getattr(model, "model_config", None), "unet_config", None) or {}
    if "comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel" in modules:
        return None
    if "comfy.ldm.modules.diffusionmodules.mmdit.MMDiT" in modules:
        first = net.joint_blocks[0]
        return DiTSpec("sd3", "SD3 / SD3.5 (MMDiT)", patch=int(net.patch_size), parts=MMDIT_PARTS,
                       heads=int(first.x_block.attn.num_heads), single_blocks=len(net.joint_blocks),
                       registers=int(getattr(net, "register_length", 0) or 0))
    if "comfy.ldm.flux.model.Flux" in modules:
        params = getattr(net, "params", None)
        image_model = config.get("image_model", "flux")
        if image_model == "flux" and not getattr(params, "global_modulation", False):
            blocks = list(net.double_blocks)
            return DiTSpec("flux", "Flux.1", patch=int(net.patch_size), parts=FLUX_PARTS,
                           heads=int(net.num_heads), double_blocks=len(blocks), single_blocks=len(net.single_blocks),
                           image_first=bool(blocks and getattr(blocks[0], "flipped_img_txt", False)),
                           distilled_guidance=True)
        raise ValueError(f"DAAM cannot trace this model family: {image_model!r} ({_family_name(model)}) runs on "
                         f"ComfyUI's Flux code but is not Flux.1. DAAM traces {SUPPORTED}")
    raise ValueError(f"DAAM cannot trace this model family: {_family_name(model)}. DAAM traces {SUPPORTED}")


def image_tokens(hw: tuple[int, int], patch: int) -> int:
    """Tokens of a ``h x w`` latent cut into ``patch x patch`` patches (the host pads it up)."""
    return math.ceil(hw[0] / patch) * math.ceil(hw[1] / patch)


class DiTTraceSession(TraceSession):
    """:class:`TraceSession` for a joint-attention model: every joint call is recorded through the attention
    override alone (no ``attn2`` patch; these models have none)."""

    def __init__(self, filter, spec: DiTSpec):
        super().__init__(filter)
        self.spec = spec
        self._joint_index = 0
        self._call_layout: tuple[int, int, int] | None = None  # (text tokens, image tokens, reference tokens)
        self._uuid_length: dict = {}  # conditioning uuid -> its token count

    # -- sampling ----------------------------------------------------------------------------
    def _start(self, guider, noise, sigmas=None):
        super()._start(guider, noise, sigmas)
        conds = getattr(guider, "conds", {}) or {}
        self._uuid_length = {e["uuid"]: int(e["cross_attn"].shape[1]) for entries in conds.values()
                             for e in entries or [] if e.get("cross_attn") is not None and "uuid" in e}

    def _grid(self):
        return PatchGrid(self._latent_hw, self.spec.patch)

    def no_negative_reason(self) -> str:
        if self.spec.distilled_guidance:
            return ("Flux.1's guidance is distilled into the model: there is no negative branch (at cfg 1 the "
                    "negative prompt is never evaluated), so negative words have no maps. Clear negative_words")
        return super().no_negative_reason()

    # -- one model call ----------------------------------------------------------------------
    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                    **kwargs):
        refuse_split(transformer_options)
        self._joint_index = 0
        self._call_layout = None
        try:
            self._set_call(x, t, transformer_options)
            if self.recorder.active:
                self._call_layout = self._layout_of_call(transformer_options, kwargs.get("ref_latents"))
                if self._call_layout is None:
                    self.recorder.skip_call()
                else:
                    self._marks += 1  # a model call whose joint attention should reach DAAM's override
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            self.recorder.skip_call()
            self._call_layout = None

    def _layout_of_call(self, options, ref_latents) -> tuple[int, int, int] | None:
        counts = [self._uuid_length.get(u) for u in options.get("uuids") or []]
        if not counts or None in counts:
            return None  # a conditioning DAAM does not know: its length is unknown
        text = math.lcm(*counts)
        refs = sum(image_tokens(tuple(r.shape[-2:]), self.spec.patch) for r in (ref_latents or []))
        return text, image_tokens(self._latent_hw, self.spec.patch), refs

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
            if previous is None and getattr(func, "__name__", "") == "attention_pytorch" \
                    and not kwargs.get("skip_output_reshape", False) and not kwargs.get("enable_gqa", False) \
                    and args[2].numel() == args[1].numel():
                q, k, v = args[:3]
                if not call["skip_reshape"]:
                    v = v.reshape(k.shape)  # SD3 hands v as [B, L, H, D]; attention_pytorch views it the same way
                b, heads = q.shape[0], call["heads"]

                def finish(o):  # the kernel's [B, H, L, D] as attention_pytorch returns it: [B, L, H * D]
                    return o.transpose(1, 2).reshape(b, -1, heads * o.shape[-1])

                return self.recorder.attend_joint(call["name"], call["part"], q, k, v, heads, text=call["text"],
                                                  image=call["image"], reference=lambda: func(*args, **kwargs),
                                                  finish=finish, scale=kwargs.get("scale"), mask=kwargs.get("mask"),
                                                  skip_reshape=call["skip_reshape"])
            out = previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
            self.recorder.record_joint(call["name"], call["part"], args[0], args[1], call["heads"], text=call["text"],
                                       image=call["image"], scale=kwargs.get("scale"), mask=kwargs.get("mask"),
                                       skip_reshape=call["skip_reshape"])
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
        if length != spec.registers + text + n_img + refs:
            return None  # not a joint call (SD3.5's image-only attention, or another model's attention)
        name, part = spec.layer(self._joint_index, kwargs.get("transformer_options") or {})
        self._joint_index += 1
        self._seen += 1
        if spec.image_first and part == "double":
            text_span, image_span = (n_img, n_img + text), (0, n_img)
        else:
            start = spec.registers
            text_span, image_span = (start, start + text), (start + text, start + text + n_img)
        return {"name": name, "part": part, "heads": int(heads), "text": text_span, "image": image_span,
                "skip_reshape": skip_reshape}


# -- text: where each encoder's tokens lie on the conditioning's token axis ------------------------------------
def _flat_len(chunks) -> int:
    return sum(len(c) for c in chunks)


def text_segments(tokenizer, tokens: dict, encoders=None) -> list[list[tuple[str, str, int]]]:
    """Candidate layouts of a DiT conditioning's token axis, most likely first.

    Parameters
    ----------
    tokenizer : SD3Tokenizer or FluxTokenizer-like
        The CLIP's tokenizer (``clip.tokenizer``).
    tokens : dict
        ``tokenizer.tokenize_with_weights(text, return_word_ids=True)``.
    encoders : object, optional
        The CLIP's ``cond_stage_model``: which encoders are loaded decides the segments. Without it every
        combination the host can make is a candidate and the conditioning's length picks one.

    Returns
    -------
    list of list of (segment, key, length)
        ``segment`` is ``"clip"`` or ``"t5"``, ``key`` the ``tokens`` entry it is read from, in sequence order.
        SD3: ``[CLIP-L/G (77 per chunk), T5]``; Flux.1: ``[T5]`` (its CLIP-L gives only the pooled vector).
    """
    has_t5 = "t5xxl" in tokens
    if hasattr(tokenizer, "clip_g") or "g" in tokens:  # SD3's concatenation
        if encoders is not None and hasattr(encoders, "t5xxl"):
            loaded = {k: getattr(encoders, f"clip_{k}", None) is not None for k in ("l", "g")}
            clip = []
            if loaded["l"] or loaded["g"]:
                lengths = [_flat_len(tokens[k]) for k in ("l", "g") if loaded[k] and k in tokens]
                clip = [("clip", "l" if loaded["l"] else "g", min(lengths))]
            t5 = [("t5", "t5xxl", _flat_len(tokens["t5xxl"]))] if getattr(encoders, "t5xxl", None) is not None else []
            return [clip + t5]
        clip = [("clip", "l" if "l" in tokens else "g", min(_flat_len(tokens[k]) for k in ("l", "g") if k in tokens))]
        t5 = [("t5", "t5xxl", _flat_len(tokens["t5xxl"]))] if has_t5 else []
        return [clip + t5, clip] + ([t5] if t5 else [])
    if has_t5:  # Flux.1: the context is T5 alone
        return [[("t5", "t5xxl", _flat_len(tokens["t5xxl"]))]]
    key = next((k for k in ("l", "g", "h") if k in tokens), None) or next(iter(tokens))
    return [[("clip", key, _flat_len(tokens[key]))]]


def _hf_tokenizer(tokenizer, key: str):
    sub = getattr(tokenizer, "t5xxl" if key == "t5xxl" else f"clip_{key}", None)
    hf = getattr(sub, "tokenizer", None)
    if hf is None:
        raise ValueError(f"DAAM: this CLIP's tokenizer ({type(tokenizer).__name__}) has no {key!r} tokenizer")
    return hf


def conditioning_layout(tokenizer, text: str, count: int, encoders=None):
    """The token layout of a DiT prompt over its whole conditioning, one named segment per text encoder.

    Parameters
    ----------
    tokenizer : SD3Tokenizer or FluxTokenizer-like
        ``clip.tokenizer``; it tokenizes ``text`` exactly as the host did.
    text : str
        The prompt.
    count : int
        Token count of the sampler's conditioning (its ``cross_attn.shape[1]``).
    encoders : object, optional
        ``clip.cond_stage_model``, see :func:`text_segments`.

    Returns
    -------
    TokenLayout
        ``length == count``; segments ``"clip"`` (SD3's CLIP-L/G) and/or ``"t5"``, so a word query can take
        either (``segments=`` of ``positions`` / ``word_maps``; default both).
    """
    from ...text.layout import concat_layouts
    from .tokens import layout_from_comfy_t5, layout_from_comfy_tokens

    tokens = tokenizer.tokenize_with_weights(text, return_word_ids=True)
    candidates = text_segments(tokenizer, tokens, encoders)
    segments = next((c for c in candidates if sum(n for _, _, n in c) == count), None)
    if segments is None:
        found = " or ".join("+".join(f"{s} {n}" for s, _, n in c) for c in candidates)
        raise ValueError(f"the text encodes to {found} tokens but the sampler's conditioning has {count}: give DAAM "
                         f"the same text and CLIP that encoded the conditioning")
    parts = []
    for kind, key, n in segments:
        hf = _hf_tokenizer(tokenizer, key)
        if kind == "t5":
            parts.append(("t5", layout_from_comfy_t5(tokens[key], hf, prompt=text)))
        else:  # SD3 cuts CLIP-L/G to the shorter one: a whole number of 77-token chunks
            chunks, total = [], 0
            for c in tokens[key]:
                if total >= n:
                    break
                chunks.append(c)
                total += len(c)
            parts.append(("clip", layout_from_comfy_tokens(chunks, hf, prompt=text)))
    if len(parts) == 1 and parts[0][0] == "t5":  # Flux.1: the T5 layout names its segment itself
        return parts[0][1]
    return concat_layouts(parts)  # SD3: named segments, also with its CLIP encoders alone
