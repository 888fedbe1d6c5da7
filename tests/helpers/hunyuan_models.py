"""Tiny random-weight HunyuanVideo 1.0 / 1.5 and HunyuanImage 2.1 models, and the token positions their text
encoders keep.

``build_hunyuan_video`` / ``build_hunyuan_image`` go through the host's model detection like the builders of
``helpers/dit_checkpoints.py``: the keys ``detect_unet_config`` reads (``txt_in.individual_token_refiner...``,
``img_in.proj.weight`` whose shape gives the patch, channels and width, ``vector_in.*``, ``guidance_in.*``,
``byt5_in.*``, the block keys it counts) pick ``supported_models.HunyuanVideo`` / ``HunyuanImage21`` (with
``cond_type_embedding`` and ``vision_in.*``: ``HunyuanVideo15``) and every field of the config. Width 256 gives 2
heads of 128 (the host's RoPE axes 16 + 56 + 56, or 64 + 64, need 128 per head).

The text encoders are llava-llama-3 (8B) and Qwen2.5-VL (7B); no small config of either is given by the host, so
``hunyuan_video_kept_positions`` runs the host's own cut (``HunyuanVideoClipModel.encode_token_weights``) on the
host tokenizer's tokens with an encoder whose hidden state at each position is that position's index, as
``qwen_kept_positions`` does for Qwen-Image (HunyuanImage 2.1's text encoder cuts with Qwen-Image's code).
"""

from __future__ import annotations

import torch

from helpers.dit_checkpoints import IndexEncoder, _patcher, detected_config, kept_positions

WIDTH = 256
VIDEO_TEXT_DIM = 64  # the tiny models' text input (the real ones: 4096 llama, 3584 Qwen2.5-VL)
POOLED_DIM = 768  # CLIP-L's pooled vector, fixed by the host's detection (vector_in)
BYT5_DIM = 1472  # byT5-small glyph encoder width, fixed by the host's ByT5Mapper


def _shapes(in_channels: int, patch: tuple[int, ...], context_dim: int, double: int, single: int, vector: bool,
            guidance: bool, byt5: bool, out_channels: int | None = None) -> dict:
    """The keys of a ``hunyuan_video``-network checkpoint that ``detect_unet_config`` reads."""
    n = 1
    for p in patch:
        n *= p
    shapes = {"txt_in.individual_token_refiner.blocks.0.norm1.weight": (WIDTH,),
              "img_in.proj.weight": (WIDTH, in_channels, *patch),
              "final_layer.linear.weight": ((out_channels or in_channels) * n, WIDTH),
              "txt_in.input_embedder.weight": (WIDTH, context_dim)}
    shapes.update({f"double_blocks.{i}.img_attn.qkv.weight": (3 * WIDTH, WIDTH) for i in range(double)})
    shapes.update({f"single_blocks.{i}.linear1.weight": (WIDTH, WIDTH) for i in range(single)})
    if vector:
        shapes["vector_in.in_layer.weight"] = (WIDTH, POOLED_DIM)
    if guidance:
        shapes["guidance_in.in_layer.weight"] = (WIDTH, 256)
    if byt5:
        shapes["byt5_in.fc1.weight"] = (2048, BYT5_DIM)
    return shapes


def build_hunyuan_video(seed: int = 0, double: int = 1, single: int = 2, in_channels: int | None = None,
                       v15: bool = False):
    """A HunyuanVideo 1.0-shaped ``ModelPatcher`` (``model_base.HunyuanVideo``): patch ``(1, 2, 2)``, CLIP-L pooled
    input, guidance embedding; ``in_channels`` 33 is the host's image-to-video model. ``v15``: HunyuanVideo 1.5's
    keys (``model_base.HunyuanVideo15``): patch ``(1, 1, 1)``, 32 latent channels out and 65 in (the latent, the
    host's image condition and its mask; 98 is the super-resolution model), byT5 mapper, SigLIP vision input,
    condition-type embedding, no pooled input, no guidance embedding."""
    in_channels = in_channels or (65 if v15 else 16)
    shapes = _shapes(in_channels, (1, 1, 1) if v15 else (1, 2, 2), VIDEO_TEXT_DIM, double, single, vector=not v15,
                     guidance=not v15, byt5=v15, out_channels=32 if v15 else None)
    if v15:
        shapes.update({"cond_type_embedding.weight": (3, WIDTH), "vision_in.proj.0.weight": (1152, 1152)})
    return _patcher(detected_config(shapes), seed)


def build_hunyuan_image(seed: int = 0, double: int = 1, single: int = 2):
    """A HunyuanImage 2.1-shaped ``ModelPatcher`` (``model_base.HunyuanImage21``): 64 latent channels, patch
    ``(1, 1)``, no pooled input, the byT5 glyph mapper."""
    shapes = _shapes(64, (1, 1), VIDEO_TEXT_DIM, double, single, vector=False, guidance=False, byt5=True)
    return _patcher(detected_config(shapes), seed)


def hunyuan_video_kept_positions(tokenizer, text: str):
    """``(tokens, positions)``: the host's ``HunyuanVideoTokenizer`` tokens of ``text`` (its ``"llama"`` entry) and the
    positions ``HunyuanVideoClipModel.encode_token_weights`` keeps of them."""
    from comfy.text_encoders.hunyuan_video import HunyuanVideoClipModel

    tokens = tokenizer.tokenize_with_weights(text, return_word_ids=True)

    class Pooled:
        def encode_token_weights(self, pairs):
            return None, torch.zeros(1, POOLED_DIM)

    return tokens, kept_positions(HunyuanVideoClipModel, tokens, module=True, llama=IndexEncoder(), clip_l=Pooled())


def hunyuan_video15_kept_positions(tokenizer, text: str):
    """``(tokens, positions)``: the host's ``HunyuanVideo15Tokenizer`` tokens of ``text`` and the positions
    ``HunyuanImageTEModel.encode_token_weights`` (HunyuanVideo 1.5's text encoder) keeps of its ``"qwen25_7b"``
    entry, run with an encoder whose hidden state at each position is that position's index."""
    from comfy.text_encoders.hunyuan_image import HunyuanImageTEModel

    tokens = tokenizer.tokenize_with_weights(text, return_word_ids=True)
    return tokens, kept_positions(HunyuanImageTEModel, {k: v for k, v in tokens.items() if k != "byt5"},
                                  clip_name="qwen25_7b", clip="qwen25_7b", qwen25_7b=IndexEncoder(), byt5_small=None)


def conditioning(tokens: int, seed: int = 0, batch: int = 1, pooled: bool = True, **extra):
    """A hand-made CONDITIONING ``[[cross_attn [B, tokens, VIDEO_TEXT_DIM], {...}]]`` (HunyuanVideo: with CLIP-L's
    pooled vector)."""
    g = torch.Generator().manual_seed(seed)
    cross = torch.randn((batch, tokens, VIDEO_TEXT_DIM), generator=g)
    info = {"pooled_output": torch.randn((batch, POOLED_DIM), generator=g)} if pooled else {}
    return [[cross, {**info, **extra}]]


def hunyuan_video_tokenizer():
    """The host's ``HunyuanVideoTokenizer`` with its Llama 3 tokenizer read as transformers 4 reads it.

    ComfyUI loads ``comfy/text_encoders/llama_tokenizer`` with ``LlamaTokenizerFast``; transformers 4 takes the file's
    byte-level pre-tokenizer as it is, transformers 5 (this test venv) rebuilds the class's own and drops the
    spaces. The same file is loaded here as a ``PreTrainedTokenizerFast`` (what ``LlamaTokenizerFast`` is in
    transformers 4), in place of the host object's inner tokenizer; the host's template, weights and BOS handling
    stay its own."""
    import os

    import comfy.text_encoders.hunyuan_video as hv
    from transformers import PreTrainedTokenizerFast

    tok = hv.HunyuanVideoTokenizer()
    path = os.path.join(os.path.dirname(hv.__file__), "llama_tokenizer", "tokenizer.json")
    tok.llama.tokenizer = PreTrainedTokenizerFast(tokenizer_file=path)
    return tok
