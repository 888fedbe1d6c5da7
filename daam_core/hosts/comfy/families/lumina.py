"""Lumina 2 and Z-Image on ComfyUI (``comfy/ldm/lumina/model.py``, ``NextDiT``): one joint attention per main
layer over ``[caption, image]``, real CFG.

A model call runs, in this order: the context refiner (attention over the caption alone), the noise refiner
(attention over the image alone), then the main layers over the caption followed by the image. Calls are told
apart by their keys, never by their order: only a call whose keys are exactly the caption and the image is a main
layer, and only those are recorded (``layer.N``, the n-th such call of a model call; ComfyUI 0.3.75 names no
Lumina block). Keys and values reach the attention with grouped-query heads already repeated to the query heads,
as ``[B, H, L, D]`` (``skip_reshape``).

Z-Image pads the caption and the image each up to a multiple of 32 tokens with learned pad tokens (``cap_pad_token``,
``x_pad_token``): the sequence is ``[caption, caption pads, image, image pads]``, the pads take part in the softmax
and are never mapped. The main layers get no mask (ComfyUI passes ``mask=None`` to them; the text encoder's
attention mask, kept only when it has zeros, reaches the context refiner alone on 0.3.75 and no call on newer
hosts): the recorder applies the mask the call carries, which is none.

Words: Z-Image's Qwen3 tokenizer (ComfyUI's ``qwen25_tokenizer`` files) wraps the prompt in a chat template and
the encoder keeps every token of it; template tokens belong to no word. Lumina 2's Gemma tokenizer (a
SentencePiece model that travels in the text-encoder file) puts BOS first; ``CLIP Text Encode for Lumina2``
encodes ``"<system prompt> <Prompt Start> <prompt>"``. DAAM takes the prompt alone (the node's system prompt whose
text has the conditioning's token count is put back, :meth:`Lumina2.encoded_text`) or that whole text; the system
prompt and the marker belong to no word.
"""

from __future__ import annotations

import dataclasses

from ....text.layout import Segment, TokenLayout
from .base import DiTSpec, JointFamily, flat_length, host_tokenizer, register
from .qwen_image import chat_layout

PROMPT_START = "<Prompt Start>"  # CLIPTextEncodeLumina2: f"{system_prompt} <Prompt Start> {user_prompt}"


@dataclasses.dataclass(frozen=True)
class LuminaSpec(DiTSpec):
    """:class:`DiTSpec` with ``pad``: the caption and the image are each padded up to a multiple of it (1: none)."""

    pad: int = 1


def _padded(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class _NextDiT(JointFamily):
    networks = ("comfy.ldm.lumina.model.NextDiT",)
    z_image = False

    def describe(self, model, net, config):
        if config.get("image_model", "lumina2") != "lumina2" or bool(config.get("z_image_modulation")) != self.z_image:
            return None
        if config.get("clip_text_dim") or config.get("siglip_feat_dim"):
            return None  # newer hosts' NewBie (a pooled CLIP input) and Z-Image Omni (SigLIP tokens, references)
        return LuminaSpec(self, patch=int(net.patch_size), heads=int(net.n_heads), blocks=(("layer", len(net.layers)),),
                          pad=int(getattr(net, "pad_tokens_multiple", None) or 1))

    def spans(self, spec, part, text, image, refs):
        pad = getattr(spec, "pad", 1)
        caption = _padded(text, pad)
        return (0, text), (caption, caption + image), caption + _padded(image, pad) + refs


class ZImage(_NextDiT):
    name = "z_image"
    label = "Z-Image"
    z_image = True
    key = "qwen3_4b"

    def text_segments(self, tokenizer, tokens, encoders=None):
        if self.key not in tokens or not hasattr(tokenizer, "llama_template"):
            return []
        return [[("qwen", self.key, flat_length(tokens[self.key]))]]

    def layout(self, tokenizer, tokens, text, segments):
        hf = host_tokenizer(tokenizer, self.key, "Qwen3")
        n = flat_length(tokens[self.key])
        return chat_layout(tokens[self.key], hf, text, tokenizer.llama_template, keep=(0, n),  # the encoder keeps all
                           what="Z-Image")


class Lumina2(_NextDiT):
    name = "lumina2"
    label = "Lumina 2"
    keys = ("gemma2_2b", "gemma3_4b")

    def text_segments(self, tokenizer, tokens, encoders=None):
        key = next((k for k in self.keys if k in tokens), None)
        return [[("gemma", key, flat_length(tokens[key]))]] if key else []

    def encoded_text(self, tokenizer, text, count):
        """``text``, or the text ``CLIP Text Encode for Lumina2`` encodes for it (one of the host node's system
        prompts, then the marker) when that alone has ``count`` tokens."""
        if PROMPT_START in text or _count(tokenizer, text) == count:
            return text
        fits = [t for t in (f"{s} {PROMPT_START} {text}" for s in _system_prompts()) if _count(tokenizer, t) == count]
        return fits[0] if len(fits) == 1 else text  # none, or not one: the length check names the mismatch

    def layout(self, tokenizer, tokens, text, segments):
        from ..tokens import SentencePieceView, layout_from_comfy_tokens

        ((_, key, _),) = segments
        spiece = getattr(getattr(tokenizer, key, None), "tokenizer", None)
        if not hasattr(getattr(spiece, "tokenizer", None), "id_to_piece"):
            raise ValueError(f"DAAM: this CLIP's tokenizer ({type(tokenizer).__name__}) has no Gemma SentencePiece "
                             f"tokenizer")
        view = SentencePieceView(spiece)
        whole = layout_from_comfy_tokens(tokens[key], view, prompt=text)
        whole = dataclasses.replace(whole, segments=(Segment("gemma", 0, whole.length, "sentencepiece"),))
        head, marker, _ = text.partition(PROMPT_START)
        if not marker:
            return whole
        # the system prompt and the marker are the host node's template: no word
        system = key_tokens(tokenizer.tokenize_with_weights(head + marker, return_word_ids=True)[key])
        if tuple(whole.ids[:len(system)]) != tuple(system):
            return whole  # the template does not tokenize as a prefix: keep every word
        return drop_words_before(whole, len(system))


def _system_prompts() -> list[str]:
    """The system prompts of the host's ``CLIPTextEncodeLumina2`` node (none on a host without it)."""
    try:
        from comfy_extras.nodes_lumina2 import CLIPTextEncodeLumina2
    except ImportError:
        return []
    return [str(s) for s in getattr(CLIPTextEncodeLumina2, "SYSTEM_PROMPT", {}).values()]


def _count(tokenizer, text: str) -> int:
    """Tokens of ``text`` on the conditioning (one encoder)."""
    return sum(flat_length(v) for v in tokenizer.tokenize_with_weights(text).values())


def key_tokens(chunks) -> list[int]:
    """Token ids of a ``tokenize_with_weights`` entry (-1 for an embedding vector)."""
    from ..tokens import _as_id

    return [_as_id(e[0]) for c in chunks for e in c]


def drop_words_before(layout: TokenLayout, stop: int) -> TokenLayout:
    """``layout`` whose words with a position before ``stop`` belong to no word; the rest renumbered in order."""
    kept = [w for w in layout.words if w.positions and min(w.positions) >= stop]
    number = {w.index: i for i, w in enumerate(kept)}
    return dataclasses.replace(layout, word_of=tuple(number.get(k, -1) for k in layout.word_of),
                               words=tuple(dataclasses.replace(w, index=number[w.index]) for w in kept))


register(Lumina2())
register(ZImage())
