"""The family registry: :class:`JointFamily`, :class:`DiTSpec`, :func:`register`, :func:`dit_spec`."""

from __future__ import annotations

from dataclasses import dataclass

from ...contract import add_family

UNET = "SD1.x, SD2.x, SDXL (UNet)"
_UNET_NETWORKS = ("comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel",)


@dataclass(frozen=True)
class DiTSpec:
    """One loaded joint-attention model, as its family reads it.

    Attributes
    ----------
    family : JointFamily
        The registry entry.
    patch : int
        Patch size: an ``h x w`` latent has ``ceil(h / patch) * ceil(w / patch)`` image tokens.
    heads : int
        Attention heads of every block.
    blocks : tuple of (str, int)
        Blocks per network part, in the order a model call runs them (``(("double", 19), ("single", 38))``).
    registers : int
        Tokens before the text (SD3's register tokens; 0 for the released models).
    image_first : bool
        Blocks of ``family.image_first_parts`` put the image before the text (Flux's ``flipped_img_txt``).
    frame_patch : int
        A video family's latent frames per token frame (Wan: 1).
    """

    family: "JointFamily"
    patch: int
    heads: int
    blocks: tuple[tuple[str, int], ...]
    registers: int = 0
    image_first: bool = False
    frame_patch: int = 1

    @property
    def label(self) -> str:
        return self.family.label

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p, _ in self.blocks)

    def block_count(self, part: str) -> int:
        """Blocks of ``part`` (0 for a part the model does not have)."""
        return dict(self.blocks).get(part, 0)

    def layer(self, index: int, options: dict) -> tuple[str, str]:
        """``(name, part)`` of the ``index``-th joint call of a model call (see :meth:`JointFamily.layer`)."""
        return self.family.layer(self, index, options)


class JointFamily:
    """A joint-attention model family on ComfyUI. Subclass it in a module of this package and :func:`register`.

    Attributes
    ----------
    name : str
        Short id (``"sd3"``, ``"flux"``).
    label : str
        Name in messages.
    variants : str
        Models of the family, for the list of supported families (optional).
    networks : tuple of str
        Qualified names of the host network classes (``model.diffusion_model``, checked along its MRO) the
        family may describe; :meth:`describe` decides.
    image_first_parts : tuple of str
        Parts whose calls put the image before the text when the spec says ``image_first``.
    distilled_guidance : bool
        Guidance distilled into the model: the usual sampling never evaluates a negative prompt.
    reference_latents : bool
        The network appends the conditioning's ``ref_latents`` (Kontext-style) to the sequence after the image.
    attention : {"joint", "cross"}
        ``"joint"``: one attention over text and image tokens (:meth:`spans` says where each is); ``"cross"``: a
        separate cross-attention whose keys are the text conditioning alone and whose queries are the image (or
        video) tokens; any other call (self-attention, an image-prompt attention) is not recorded.
    video : bool
        The model's latents are 5-D ``[B, C, frames, H, W]`` (a video, or Qwen-Image's one frame); each frame gets
        maps of its own.
    pixels_per_cell : int or None
        Image pixels per latent cell when the host's latent format does not say (``spacial_downscale_ratio``);
        None: the host's value, else 8.
    """

    name = ""
    label = ""
    variants = ""
    networks: tuple[str, ...] = ()
    image_first_parts: tuple[str, ...] = ()
    distilled_guidance = False
    reference_latents = False
    attention = "joint"
    video = False
    pixels_per_cell: int | None = None

    def describe(self, model, net, config: dict) -> DiTSpec | None:
        """The spec of a model whose network is one of :attr:`networks`; None when it is another family that
        shares the network code (the next entry is asked, and an unclaimed model is refused)."""
        raise NotImplementedError

    # -- one call --------------------------------------------------------------------------------
    def layer(self, spec: DiTSpec, index: int, options: dict) -> tuple[str, str]:
        """``(name, part)`` of the ``index``-th joint call of a model call: the host's ``block_type`` /
        ``block_index`` transformer options when it sets them, else blocks counted in run order."""
        kind, number = options.get("block_type"), options.get("block_index")
        if kind in spec.parts and isinstance(number, int):
            return f"{kind}.{number}", kind
        for part, count in spec.blocks:
            if index < count:
                return f"{part}.{index}", part
            index -= count
        part, count = spec.blocks[-1]
        return f"{part}.{count + index}", part  # more calls than blocks: name them on, the filter still applies

    def spans(self, spec: DiTSpec, part: str, text: int, image: int, refs: int
              ) -> tuple[tuple[int, int], tuple[int, int], int]:
        """``(text span, image span, key length)`` of a joint call: ``[registers, text, image, references]``, or
        ``[image, text, ...]`` in the image-first parts."""
        if spec.image_first and part in self.image_first_parts:
            return (image, image + text), (0, image), text + image + refs
        r = spec.registers
        return (r, r + text), (r + text, r + text + image), r + text + image + refs

    def trailing_tokens(self, spec: DiTSpec, conds: dict) -> int:
        """Tokens a model call puts at the end of its sequence that are no words (HunyuanImage 2.1's byT5 glyph
        tokens after ``[image, text]``), from the call's extra conditionings ``conds`` (``apply_model``'s
        keywords); :meth:`spans` counts them with the reference tokens (a family that overrides :meth:`spans` may
        place them elsewhere: HunyuanVideo 1.5's before the text)."""
        return 0

    # -- text ------------------------------------------------------------------------------------
    def text_length(self, cond: dict) -> int:
        """Text tokens a model call holds for one conditioning (an entry of the guider's conds: ``cross_attn``
        and the rest): the conditioning's own length unless the family's network pads or extends it
        (:meth:`call_layout` says where the conditioning's tokens are then)."""
        return int(cond["cross_attn"].shape[1])

    def call_layout(self, layout, length: int, tokenizer=None, text: str | None = None, encoders=None):
        """The prompt's layout over a model call's ``length`` text tokens (:meth:`text_length`), from its layout
        over the conditioning's own tokens (``tokenizer``, ``text`` and ``encoders`` as for :meth:`text_segments`,
        for a family whose calls add text of another encoder): that layout, unless the network pads or extends
        the text."""
        return layout

    def text_segments(self, tokenizer, tokens: dict, encoders=None) -> list[list[tuple[str, str, int]]]:
        """Candidate layouts of the conditioning's token axis, most likely first: lists of ``(segment, key,
        length)``, ``key`` the entry of ``tokenizer.tokenize_with_weights(...)`` the segment is read from."""
        raise NotImplementedError

    def layout(self, tokenizer, tokens: dict, text: str, segments: list[tuple[str, str, int]]):
        """The prompt's :class:`~daam_core.text.layout.TokenLayout` over the conditioning when the family builds it
        itself (a templated text the encoder cuts); None: one layout per segment from its encoder's tokens."""
        return None

    def encoded_text(self, tokenizer, text: str, count: int) -> str:
        """The text the host's encoder read for a prompt given as ``text`` whose conditioning has ``count`` tokens,
        when a host text node wraps the prompt in text of its own (a system prompt); default ``text`` itself."""
        return text

    def no_negative_reason(self) -> str | None:
        """Why negative words have no maps at the usual settings, or None."""
        return None


def host_tokenizer(tokenizer, key: str, what: str):
    """The tokenizer object the host's CLIP tokenizer keeps for ``key`` (``tokenizer.<key>.tokenizer``: Hugging
    Face's, or a newer host's own); a ValueError naming ``what`` when the CLIP has none."""
    hf = getattr(getattr(tokenizer, key, None), "tokenizer", None)
    if hf is None:
        raise ValueError(f"DAAM: this CLIP's tokenizer ({type(tokenizer).__name__}) has no {what} tokenizer")
    return hf


def flat_length(chunks) -> int:
    """Tokens of a ``tokenize_with_weights`` entry (a list of chunks)."""
    return sum(len(c) for c in chunks)


def clip_only(tokens: dict) -> list[tuple[str, str, int]]:
    """The layout of a conditioning made by one CLIP encoder (``l``, ``g`` or ``h``)."""
    key = next((k for k in ("l", "g", "h") if k in tokens), None) or next(iter(tokens))
    return [("clip", key, flat_length(tokens[key]))]


FAMILIES: list[JointFamily] = []


def register(family: JointFamily) -> JointFamily:
    """Add a family to the registry (once per name)."""
    return add_family(FAMILIES, family)


def supported() -> str:
    """What DAAM traces on ComfyUI, for messages."""
    names = [UNET] + [f"{f.label} ({f.variants})" if f.variants else f.label for f in FAMILIES]
    return ", ".join(names[:-1]) + " and " + names[-1]


def _qualified(net) -> set[str]:
    return {f"{c.__module__}.{c.__name__}" for c in type(net).__mro__}


def family_name(model) -> str:
    """A readable name of a ComfyUI model (``BaseModel``) for errors: its class, config and network classes."""
    config = getattr(model, "model_config", None)
    names = [type(model).__name__] + ([type(config).__name__] if config is not None else [])
    net = getattr(model, "diffusion_model", None)
    if net is not None:
        names.append(type(net).__name__)
    return " / ".join(dict.fromkeys(names))


def dit_spec(model) -> DiTSpec | None:
    """The joint-attention description of a ComfyUI model, None for a UNet.

    Parameters
    ----------
    model : comfy.model_base.BaseModel
        ``ModelPatcher.model``.

    Raises
    ------
    ValueError
        For a model family DAAM cannot trace, naming it and listing the supported ones.
    """
    net = getattr(model, "diffusion_model", None)
    classes = _qualified(net)
    if classes & set(_UNET_NETWORKS):
        return None
    config = getattr(getattr(model, "model_config", None), "unet_config", None) or {}
    shared = False
    for family in FAMILIES:
        if classes & set(family.networks):
            spec = family.describe(model, net, config)
            if spec is not None:
                return spec
            shared = True
    what = family_name(model)
    if shared and config.get("image_model"):
        what = f"{config['image_model']!r} ({what})"
    raise ValueError(f"DAAM cannot trace this model family: {what}. DAAM traces {supported()}")


