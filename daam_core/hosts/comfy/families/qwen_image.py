"""Qwen-Image (and Qwen-Image-Edit's reference latents) on ComfyUI: one joint attention per block over
``[text, image, reference latents]``, real CFG.

ComfyUI names each call's block (``block_type`` ``"double"``, ``block_index``). Its latents are Wan 2.1's 5-D
format with one frame, so the model is traced on the one-frame video grid. Reference latents (Edit) follow the
image: they take part in the softmax and are never mapped.

The text is Qwen2.5-VL's: the host's tokenizer wraps the prompt in a chat template and tokenizes the templated
string in one piece, and the encoder drops the template's head (the system turn and ``<|im_start|>user\\n``); what
stays is the prompt and the template's tail. Words are found by byte offsets of the templated string
(:mod:`.templated`): a token belongs to the word whose characters it holds, template tokens to none. A token shared
with the template (a prompt that starts with a newline merges with the template's; the host's cut then keeps
``<|im_start|>user``) holds only whitespace of the prompt and belongs to no word. A prompt encoded with images
(TextEncodeQwenImageEdit's vision tokens) has a conditioning longer than its text and is refused by the length
check.
"""

from __future__ import annotations

import numbers

from ....text.layout import TokenLayout
from .base import DiTSpec, JointFamily, host_tokenizer, register
from .templated import flat_ids, templated_layout

KEY = "qwen25_7b"
IM_START, USER, NEWLINE = 151644, 872, 198  # Qwen2.5 ids the host's template cut reads


class QwenImage(JointFamily):
    name = "qwen_image"
    label = "Qwen-Image"
    variants = "text-to-image, Edit reference latents"
    networks = ("comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",)
    reference_latents = True
    video = True  # a one-frame 5-D latent

    def describe(self, model, net, config):
        if config.get("image_model", "qwen_image") != "qwen_image":
            return None
        blocks = list(net.transformer_blocks)
        heads = int(blocks[0].attn.heads) if blocks else 0
        return DiTSpec(self, patch=int(net.patch_size), heads=heads, blocks=(("double", len(blocks)),))

    def text_segments(self, tokenizer, tokens, encoders=None):
        if KEY not in tokens or not hasattr(tokenizer, "llama_template"):
            return []
        ids = _ids(tokens[KEY])
        return [[("qwen", KEY, len(ids) - _template_end(ids))]]

    def layout(self, tokenizer, tokens, text, segments):
        hf = host_tokenizer(tokenizer, KEY, "Qwen2.5")
        return chat_layout(tokens[KEY], hf, text, tokenizer.llama_template)


def _ids(chunks) -> list:
    """Token ids of a ``tokenize_with_weights`` entry; an image embedding (a dict) stays as it is."""
    return [e[0] for c in chunks for e in c]


def _template_end(ids) -> int:
    """Where the host's conditioning starts (``QwenImageTEModel.encode_token_weights``): at the second
    ``<|im_start|>``, past ``user\\n`` when those tokens follow it; -1 (the last token) without one."""
    end, seen = -1, 0
    for i, t in enumerate(ids):
        if isinstance(t, numbers.Integral) and t == IM_START and seen < 2:
            end, seen = i, seen + 1
    if len(ids) > end + 3 and ids[end + 1] == USER and ids[end + 2] == NEWLINE:
        end += 3
    return end % len(ids) if ids else 0


def chat_layout(chunks, hf, text: str, template: str, keep=None, segment: str = "qwen",
                what: str = "Qwen-Image") -> TokenLayout:
    """The layout of the conditioning the host keeps of a chat-templated prompt.

    Parameters
    ----------
    chunks : list of list of (token, weight, word_id)
        ``QwenImageTokenizer.tokenize_with_weights(text, return_word_ids=True)["qwen25_7b"]`` (or another
        byte-level BPE tokenizer's entry, e.g. HunyuanVideo's ``"llama"``).
    hf : PreTrainedTokenizer
        The host's Hugging Face tokenizer (byte-level BPE: Qwen2, Llama 3).
    text : str
        The prompt.
    template : str
        The host's template (``llama_template``); its ``{}`` is the prompt. Tokens before it (a BOS) are allowed.
    keep : (int, int), optional
        The tokens ``[start, stop)`` the host's encoder keeps; default Qwen-Image's cut to the end.
    segment, what : str
        The segment's name; the model family, for the error.

    Returns
    -------
    TokenLayout
        Positions ``[start, stop)``; one segment, words matched on their decoded text.
    """
    ids = flat_ids(chunks, what)
    cut, stop = keep if keep is not None else (_template_end(ids), len(ids))
    return templated_layout(chunks, hf, template, cut=cut, stop=stop, segment=segment, label=what)


register(QwenImage())
