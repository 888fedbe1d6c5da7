"""HiDream for the host's tests: the host's HiDream-I1 network at a small width and the host's own HiDream tokenizer.

The network
    ``comfy.model_detection`` knows HiDream by ``caption_projection.0.linear.weight`` and fixes every size (20 heads
    of 128, 16 double + 32 single blocks, 48 Llama layers listed, 4096-wide text inputs, 2048-wide pooled input,
    4 routed experts), so those are set after detection: 2 heads of 128 (its RoPE axes 64 + 32 + 32 need 128 per
    head), 2 double + 1 single blocks, ``llama_layers`` [0, 1, 2] (the last listed layer is the one every call
    carries with T5, so it is also the single block's), 64-wide T5 and Llama inputs, a 32-wide pooled input, 2
    routed experts with 1 active. ``model_base.HiDream`` gives the host's conditioning handling.

The tokenizer
    ``HiDreamTokenizer`` ships its files with the host (CLIP-L/G, T5 padded or cut to 128 tokens, Llama 3.1 padded to
    128 with ``<|eot_id|>``). ComfyUI 0.3.75 loads the Llama 3.1 one with transformers 4's ``LlamaTokenizerFast``,
    which reads ``tokenizer.json`` as it is (its byte-level pre-tokenizer, ``<|begin_of_text|>`` first); transformers
    5's class of that name rebuilds a SentencePiece-style tokenizer from the vocabulary and drops every space ("a cat"
    becomes ``a`` ``c`` ``at``), and no HiDream text encoder could have been trained on that. On transformers 5,
    ``hidream_tokenizer`` lets the host load it as transformers 4 does (the file's own tokenizer, through
    ``PreTrainedTokenizerFast``) while its constructor runs; the rest is the host's code.

Conditionings are hand-made: ``cross_attn`` ``[B, 128, 64]`` (T5), ``conditioning_llama3`` ``[B, 3, llama tokens,
64]`` (one hidden state per listed layer), ``pooled_output`` ``[B, 32]``, as long as the host's tokenizer makes them.
"""

from __future__ import annotations

import contextlib

import torch

LLAMA_LAYERS = [0, 1, 2]


def build_tiny_hidream(seed: int = 0, context_dim: int = 64):
    """A HiDream-I1-shaped ``ModelPatcher`` (``model_base.HiDream``, see the module docstring)."""
    from helpers.dit_checkpoints import _patcher, detected_config

    config = detected_config({"caption_projection.0.linear.weight": (256, context_dim)}, num_layers=2,
                             num_single_layers=1, num_attention_heads=2, attention_head_dim=128,
                             caption_channels=[context_dim, context_dim], text_emb_dim=32,
                             llama_layers=list(LLAMA_LAYERS), num_routed_experts=2, num_activated_experts=1)
    return _patcher(config, seed)


class _LlamaFast4:
    """transformers 4's ``LlamaTokenizerFast.from_pretrained`` of a folder with a ``tokenizer.json``: that file's
    tokenizer as it is (its post-processor puts ``<|begin_of_text|>`` first, as ``add_bos_token`` does)."""

    @staticmethod
    def from_pretrained(path, **kwargs):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path, **kwargs)


@contextlib.contextmanager
def host_llama_tokenizer():
    """While it is open, the host's Llama 3 tokenizer is loaded as on transformers 4 (a no-op there)."""
    import comfy.text_encoders.hunyuan_video as hv
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        yield
        return
    saved = hv.LlamaTokenizerFast
    hv.LlamaTokenizerFast = _LlamaFast4
    try:
        yield
    finally:
        hv.LlamaTokenizerFast = saved


def hidream_tokenizer():
    """The host's ``HiDreamTokenizer``."""
    from comfy.text_encoders.hidream import HiDreamTokenizer

    with host_llama_tokenizer():
        return HiDreamTokenizer()


def token_counts(tokenizer, text: str) -> tuple[int, int]:
    """``(T5 tokens, Llama tokens)`` the host's tokenizer makes of ``text`` (T5: 128)."""
    tokens = tokenizer.tokenize_with_weights(text)
    return tuple(sum(len(c) for c in tokens[k]) for k in ("t5xxl", "llama"))


def hidream_conditioning(tokenizer, text: str, seed: int = 0, batch: int = 1, context_dim: int = 64, **extra):
    """A hand-made HiDream CONDITIONING as long as the host's encoders make ``text``'s."""
    t5, llama = token_counts(tokenizer, text)
    g = torch.Generator().manual_seed(seed)
    cross = torch.randn((batch, t5, context_dim), generator=g)
    hidden = torch.randn((batch, len(LLAMA_LAYERS), llama, context_dim), generator=g)
    pooled = torch.randn((batch, 32), generator=g)
    return [[cross, {"pooled_output": pooled, "conditioning_llama3": hidden, **extra}]]
