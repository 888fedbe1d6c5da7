"""Qwen-Image (and Qwen-Image-Edit's reference latents) on ComfyUI: one joint attention per block over
``[text, image, reference latents]``, real CFG.

ComfyUI names each call's block (``block_type`` ``"double"``, ``block_index``). Its latents are Wan 2.1's 5-D
format with one frame, so the model is traced on the one-frame video grid. Reference latents (Edit) follow the
image: they take part in the softmax and are never mapped.

The text is Qwen2.5-VL's: the host's tokenizer wraps the prompt in a chat template and tokenizes the templated
string in one piece, and the encoder drops the template's head (the system turn and ``<|im_start|>user\\n``); what
stays is the prompt and the template's tail. Words are found by byte offsets of the templated string: a token
belongs to the word whose characters it holds, template tokens to none. A token shared with the template (a
prompt that starts with a newline merges with the template's; the host's cut then keeps ``<|im_start|>user``)
holds only whitespace of the prompt and belongs to no word. A prompt encoded with images (TextEncodeQwenImageEdit's vision
tokens) has a conditioning longer than its text and is refused by the length check.
"""

from __future__ import annotations

import numbers

from ....text.layout import Segment, TokenLayout, Word
from ....text.pieces import WORD_START, _byte_decoder
from .base import DiTSpec, JointFamily, register

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
        hf = getattr(getattr(tokenizer, KEY, None), "tokenizer", None)
        if hf is None:
            raise ValueError(f"DAAM: this CLIP's tokenizer ({type(tokenizer).__name__}) has no Qwen2.5 tokenizer")
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


def _token_bytes(hf, ids: list[int]) -> list[bytes]:
    """The UTF-8 bytes each token stands for: added tokens (``<|im_start|>``) their text, the rest byte-level."""
    added = {int(k): v.content for k, v in getattr(hf, "added_tokens_decoder", {}).items()}
    table = _byte_decoder()  # byte-level BPE's printable stand-ins -> bytes
    out = []
    for i, piece in zip(ids, hf.convert_ids_to_tokens(ids)):
        out.append(added[i].encode() if i in added else bytes(table[c] for c in piece))
    return out


def _char_start(data: bytes, i: int) -> int:
    """The first UTF-8 character start at or after byte ``i``."""
    while i < len(data) and data[i] & 0xC0 == 0x80:
        i += 1
    return i


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
    flat = [e for c in chunks for e in c]
    ids = [e[0] for e in flat]
    if not all(isinstance(i, numbers.Integral) for i in ids):
        raise ValueError(f"DAAM maps {what} prompts of plain text; this prompt's tokens hold an image or an "
                         "embedding (vision tokens, an embedding: file)")
    ids = [int(i) for i in ids]
    raw = _token_bytes(hf, ids)
    whole = b"".join(raw)
    head, _, tail = template.partition("{}")
    head_b, tail_b = head.encode(), tail.encode()
    at = whole.find(head_b)
    if at >= 0 and whole.endswith(tail_b) and len(whole) >= at + len(head_b) + len(tail_b):
        lo, hi = at + len(head_b), len(whole) - len(tail_b)
    else:  # the host kept the text as it was (it starts with a template of its own)
        lo, hi = 0, len(whole)
    prompt = whole[lo:hi]
    # whitespace-separated words of the prompt as tokenized, by byte range
    spans, start = [], None
    for j in range(len(prompt) + 1):
        space = j == len(prompt) or chr(prompt[j]).isspace() and prompt[j] < 128
        if space and start is not None:
            spans.append((lo + start, lo + j))
            start = None
        elif not space and start is None:
            start = j
    word_of, pieces, offset = [], [], 0
    for b in raw:
        a, z = offset, offset + len(b)
        offset = z
        hit = next((w for w, (s, e) in enumerate(spans) if s < z and a < e), -1)
        if hit < 0:
            word_of.append(-1)
            pieces.append(b.decode("utf-8", "replace"))
            continue
        s, e = spans[hit]
        # the prompt's characters that start in this token (a character split across tokens is the first one's)
        part = whole[_char_start(whole, max(a, lo)):_char_start(whole, min(z, hi))].decode("utf-8", "replace")
        starts = a <= s  # the token holds the word's first byte
        pieces.append(WORD_START + part.strip() if starts else part)
        word_of.append(hit)
    cut, stop = keep if keep is not None else (_template_end(ids), len(ids))
    kept = word_of[cut:stop]
    number = {w: i for i, w in enumerate(sorted(set(kept) - {-1}))}  # words the host encoded, in order
    words = tuple(Word(whole[slice(*spans[w])].decode("utf-8", "replace"), i,
                       tuple(p for p, k in enumerate(kept) if k == w), 1.0) for w, i in number.items())
    n = stop - cut
    return TokenLayout(tuple(ids[cut:stop]), tuple(float(e[1]) for e in flat[cut:stop]), tuple(pieces[cut:stop]),
                       tuple(number.get(k, -1) for k in kept), words, n, tokenizer=hf,
                       segments=(Segment(segment, 0, n, "sentencepiece"),))


register(QwenImage())
