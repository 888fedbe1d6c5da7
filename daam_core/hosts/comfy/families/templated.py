"""Words of a prompt that the host's tokenizer wraps in a template and tokenizes in one piece with a byte-level BPE
(Qwen-Image's Qwen2.5-VL, Flux.2's Mistral Tekken).

The host formats its template with the prompt (``template.format(text)``) and tokenizes the whole string at once,
so a token may hold characters of the template and of the prompt together. Words are found by byte offsets: every
token stands for the UTF-8 bytes it encodes (an added token such as ``<|im_start|>`` or ``[INST]`` for its text),
the template's head and tail are matched on the concatenated bytes, and a token belongs to the whitespace-separated
word of the prompt whose bytes it holds; template tokens belong to none. Tokens the tokenizer adds around the text
(its start token, its padding: word id 0 in ``tokenize_with_weights``) stand for no bytes. A weighted part of the
prompt (``(red:1.2)``; HiDream's Llama keeps weights) is tokenized on its own, so a word also ends where it does.
"""

from __future__ import annotations

import numbers

from ....text.layout import Segment, TokenLayout, Word
from ....text.pieces import WORD_START, _byte_decoder


def token_pieces(hf, ids: list[int]) -> list[str]:
    """The tokenizer's own strings of ``ids``: Hugging Face's ``convert_ids_to_tokens``, or for ComfyUI's own
    byte-level BPE (newer hosts build Flux.2's and HunyuanVideo's tokenizers with it) its public vocabulary."""
    if hasattr(hf, "convert_ids_to_tokens"):
        return hf.convert_ids_to_tokens(ids)
    inverse = {v: k for k, v in hf.get_vocab().items()}
    return [inverse.get(int(i), "") for i in ids]


def token_bytes(hf, ids: list[int]) -> list[bytes]:
    """The UTF-8 bytes each token stands for: added tokens (``<|im_start|>``) their text, the rest byte-level (a
    special token whose characters are not byte-level stand-ins: its text)."""
    added = {int(k): v.content for k, v in getattr(hf, "added_tokens_decoder", {}).items()}
    table = _byte_decoder()  # byte-level BPE's printable stand-ins -> bytes
    out = []
    for i, piece in zip(ids, token_pieces(hf, ids)):
        if i in added:
            out.append(added[i].encode())
        elif all(c in table for c in piece):
            out.append(bytes(table[c] for c in piece))
        else:
            out.append(piece.encode())
    return out


def _char_start(data: bytes, i: int) -> int:
    """The first UTF-8 character start at or after byte ``i``."""
    while i < len(data) and data[i] & 0xC0 == 0x80:
        i += 1
    return i


def flat_ids(chunks, what: str) -> list[int]:
    """Token ids of a ``tokenize_with_weights`` entry; a ValueError naming ``what`` when one is an embedding or an
    image (not a token id)."""
    ids = [e[0] for c in chunks for e in c]
    if not all(isinstance(i, numbers.Integral) for i in ids):
        raise ValueError(f"DAAM maps {what} prompts encoded from text alone; this prompt's tokens hold an embedding "
                         f"or an image")
    return [int(i) for i in ids]


def templated_layout(chunks, hf, template: str, cut: int = 0, segment: str = "text", label: str = "these",
                     stop: int | None = None) -> TokenLayout:
    """The layout of the conditioning the host keeps of a templated prompt.

    Parameters
    ----------
    chunks : list of list of (token, weight, word_id)
        The host tokenizer's ``tokenize_with_weights(text, return_word_ids=True)[key]`` of the prompt.
    hf : tokenizer
        The host's Hugging Face tokenizer of that key (byte-level BPE).
    template : str
        The host's template (``llama_template``); its ``{}`` is the prompt.
    cut, stop : int
        The positions ``[cut, stop)`` the host's encoder keeps (Qwen-Image drops the template's head, HunyuanVideo
        its head and what follows the prompt); default all: ``cut`` 0, ``stop`` the token count.
    segment : str
        Name of the layout's one segment.
    label : str
        The model family, for the error on a prompt encoded with an embedding or an image.

    Returns
    -------
    TokenLayout
        Positions ``[cut, stop)``; one ``segment`` segment (matched on decoded text), words in prompt order.
    """
    flat = [e for c in chunks for e in c]
    ids = flat_ids(chunks, label)
    groups = [e[2] if len(e) > 2 else 1 for e in flat]  # the host's word ids: 0 its start token and padding
    raw = [b"" if g == 0 else b for b, g in zip(token_bytes(hf, ids), groups)]
    whole = b"".join(raw)
    head, _, tail = template.partition("{}")
    head_b, tail_b = head.encode(), tail.encode()
    at = whole.find(head_b)  # 0, or past a start token that stands for bytes of its own
    if at >= 0 and whole.endswith(tail_b) and len(whole) >= at + len(head_b) + len(tail_b):
        lo, hi = at + len(head_b), len(whole) - len(tail_b)
    else:  # the host kept the text as it was (it starts with a template of its own)
        lo, hi = 0, len(whole)
    prompt = whole[lo:hi]
    # a weighted part of the prompt ("(red:1.2)") is tokenized on its own (a word id of its own): a word ends there
    cuts, offset, previous = set(), 0, None
    for b, g in zip(raw, groups):
        if b and g != previous:
            cuts.add(offset - lo)
            previous = g
        offset += len(b)
    # whitespace-separated words of the prompt as tokenized, by byte range
    spans, start = [], None
    for j in range(len(prompt) + 1):
        space = j == len(prompt) or chr(prompt[j]).isspace() and prompt[j] < 128
        if start is not None and (space or j in cuts):
            spans.append((lo + start, lo + j))
            start = None
        if not space and start is None:
            start = j
    specials = token_pieces(hf, ids)
    word_of, pieces, offset = [], [], 0
    for b, special in zip(raw, specials):
        a, z = offset, offset + len(b)
        offset = z
        hit = next((w for w, (s, e) in enumerate(spans) if s < z and a < e), -1)
        if hit < 0:
            word_of.append(-1)
            pieces.append(b.decode("utf-8", "replace") if b else special)
            continue
        s, e = spans[hit]
        # the prompt's characters that start in this token (a character split across tokens is the first one's)
        part = whole[_char_start(whole, max(a, lo)):_char_start(whole, min(z, hi))].decode("utf-8", "replace")
        starts = a <= s  # the token holds the word's first byte
        pieces.append(WORD_START + part.strip() if starts else part)
        word_of.append(hit)
    stop = len(ids) if stop is None else stop
    kept = word_of[cut:stop]
    number = {w: i for i, w in enumerate(sorted(set(kept) - {-1}))}  # words the host encoded, in order
    words = []
    for w, i in number.items():
        positions = tuple(p for p, k in enumerate(kept) if k == w)
        words.append(Word(whole[slice(*spans[w])].decode("utf-8", "replace"), i, positions,
                          float(flat[cut + positions[0]][1])))
    n = stop - cut
    return TokenLayout(tuple(ids[cut:stop]), tuple(float(e[1]) for e in flat[cut:stop]), tuple(pieces[cut:stop]),
                       tuple(number.get(k, -1) for k in kept), tuple(words), n, tokenizer=hf,
                       segments=(Segment(segment, 0, n, "sentencepiece"),))


def pad_left(layout: TokenLayout, count: int, pad_id: int, piece: str = "<pad>") -> TokenLayout:
    """``layout`` after ``count`` padding positions that belong to no word (a network that pads the text on the
    left, as Flux.2's does): every position moves by ``count``, the segments cover the padding too."""
    if count <= 0:
        return layout
    words = tuple(Word(w.text, w.index, tuple(p + count for p in w.positions), w.weight) for w in layout.words)
    segments = tuple(Segment(g.name, 0 if i == 0 else g.start + count, g.stop + count, g.scheme)
                     for i, g in enumerate(layout.segment_list))
    return TokenLayout((pad_id,) * count + layout.ids, (1.0,) * count + layout.weights,
                       (piece,) * count + layout.pieces, (-1,) * count + layout.word_of, words,
                       layout.chunk_length + count, layout.overflow_ids, layout.overflow_pieces, layout.tokenizer,
                       segments)
