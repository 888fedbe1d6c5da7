"""T5's SentencePiece tokens: word boundaries, matching keys and the layout ComfyUI's T5 tokenizer produces.

SentencePiece marks the *start* of a whitespace word with ``"▁"`` (``"a photo"`` -> ``▁ a ▁photo``), where CLIP's
BPE marks the *end* with ``"</w>"``. T5 adds no BOS, ends with EOS ``</s>`` and pads with ``<pad>`` (id 0). Its
vocabulary is case-sensitive; queries match case-insensitively on the decoded text, split into runs of letters
and digits and runs of punctuation (``"sheepdog's"`` -> ``sheepdog ' s``), so ``"dog"`` does not match inside
``"sheepdog"`` and ``"Dog,"`` matches ``"dog"`` as it does with CLIP.
"""

from __future__ import annotations

from typing import Mapping

from .embeddings import lookup_embedding
from .layout import Segment, TokenLayout
from .pieces import WORD_START, is_sentencepiece, piece_units, word_keys
from .syntax import parse_prompt
from .tokenize import LITERAL, _Builder, segment_groups

__all__ = ["WORD_START", "is_sentencepiece", "piece_units", "word_keys", "tokenize_t5"]


def tokenize_t5(prompt: str, tokenizer, *, min_length: int = 256, max_length: int | None = None,
                syntax: str = "comfy", embeddings: Mapping[str, int] | None = None) -> TokenLayout:
    """Token layout of a prompt as ComfyUI's T5-XXL tokenizer encodes it (Flux: ``min_length`` 256, SD3: 77).

    One chunk, no BOS: the content tokens of every weighted segment (each tokenized on its own, as ComfyUI
    does), EOS, then ``<pad>`` up to ``min_length``; a longer prompt is not truncated (``L`` grows).

    Parameters
    ----------
    prompt : str
    tokenizer : T5TokenizerFast-like
        The host's T5 tokenizer (ComfyUI ships its files under ``comfy/text_encoders/t5_tokenizer``).
    min_length : int
        Padded length (``L >= min_length``).
    max_length : int, optional
        Truncate to this many positions including EOS (diffusers' ``max_sequence_length``, padded to it); the
        cut tokens are kept as overflow to explain a missing word. None: no truncation (ComfyUI).
    syntax : {"comfy", "plain"}
        ``(word:1.2)`` weights and escapes as ComfyUI parses them, or one segment of weight 1.
    embeddings : mapping of str to int, optional
        T5 textual-inversion embeddings, name -> vectors (rare); None: ``embedding:`` is ordinary text.

    Returns
    -------
    TokenLayout
        With one segment ``("t5", 0, L, "sentencepiece")``.
    """
    if syntax not in ("comfy", "plain"):
        raise ValueError(f"T5 prompts use the 'comfy' or 'plain' syntax, got {syntax!r}")
    eos = int(tokenizer.eos_token_id)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    b = _Builder(tokenizer, -1, eos, pad)
    resolve = (lambda name: LITERAL) if embeddings is None else lookup_embedding(embeddings)  # noqa: E731
    for seg in parse_prompt(prompt, syntax):
        for g in segment_groups(seg, tokenizer, resolve, syntax == "comfy"):
            k = 0
            for text, n in g.words:
                w = b.new_word(text, g.weight)
                for tid in g.ids[k:k + n]:
                    b.token(tid, g.weight, w, g.embedding)
                k += n
    overflow: list[int] = []
    if max_length is not None:
        if max_length < 2:
            raise ValueError("max_length must leave room for EOS and a token")
        overflow = b.ids[max_length - 1:]
        del b.ids[max_length - 1:], b.weights[max_length - 1:], b.word_of[max_length - 1:], b.names[max_length - 1:]
        min_length = max_length
    b.special(eos)
    b.special(pad, max(0, min_length - len(b.ids)))
    layout = b.finish(len(b.ids), overflow)
    return layout.with_segments((Segment("t5", 0, layout.length, "sentencepiece"),))

