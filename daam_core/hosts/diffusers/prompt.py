"""Long and weighted prompts for diffusers pipelines, encoded the way ComfyUI encodes them.

Diffusers truncates prompts at 77 tokens and reads ``(word:1.2)`` literally. :func:`encode_prompt`
splits the prompt into 75-token chunks (BOS + 75 + EOS each), encodes every chunk, applies weights as
ComfyUI does (``z = z_empty + w * (z - z_empty)`` per position) and returns ``prompt_embeds`` keyword
arguments for the pipeline. Given a trace, it registers the token layouts so words resolve to the
positions the UNet really receives.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ...text.layout import TokenLayout
from ...text.tokenize import tokenize


def _layout(text: str, tokenizer, syntax: str) -> TokenLayout:
    return tokenize(text, tokenizer, syntax=syntax, chunked=True, max_length=tokenizer.model_max_length,
                    pad_with_end=tokenizer.pad_token_id == tokenizer.eos_token_id)


def _encode(layout: TokenLayout, tokenizer, encoder, penultimate: bool, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states ``[1, L, C]`` (weighted) and the projected pooled output of the first chunk ``[1, P]``."""
    if any(i < 0 for i in layout.ids):
        raise ValueError("textual-inversion embeddings are not supported by the diffusers prompt encoder; "
                         "load them into the pipeline and use a plain prompt")
    n = layout.chunk_length
    ids = torch.tensor(layout.ids, dtype=torch.long, device=device).view(-1, n)
    weights = torch.tensor(layout.weights, dtype=torch.float32, device=device).view(-1, n, 1)
    empty = torch.tensor(_layout("", tokenizer, "plain").ids, dtype=torch.long, device=device).view(1, n)
    with torch.no_grad():
        both = encoder(torch.cat([ids, empty]), output_hidden_states=True)
    hidden = both.hidden_states[-2] if penultimate else both.last_hidden_state
    z, z_empty = hidden[:-1].float(), hidden[-1:].float()
    if not torch.all(weights == 1):
        z = z_empty + (z - z_empty) * weights
    pooled = getattr(both, "text_embeds", None)  # only encoders with a projection (SDXL's second) pool
    pooled = pooled[:1] if pooled is not None else None
    return z.reshape(1, -1, z.shape[-1]).to(hidden.dtype), pooled


def _repeat_to(x: torch.Tensor, length: int) -> torch.Tensor:
    return x.repeat(1, length // x.shape[1], 1)


def encode_prompt(pipe, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] = "", *,
                  syntax: str = "comfy", trace=None, device=None) -> dict:
    """Encode long / weighted prompts for a Stable Diffusion or SDXL pipeline.

    Parameters
    ----------
    pipe : StableDiffusion(XL)Pipeline
    prompt, negative_prompt : str or list of str
    syntax : {"comfy", "a1111", "plain"}
        Prompt syntax: weights ``(word:1.2)``; ``a1111`` adds ``[word]`` and ``BREAK``.
    trace : DiffusersTrace, optional
        Registers the token layouts for the next pipeline call.

    Returns
    -------
    dict
        ``prompt_embeds`` and ``negative_prompt_embeds`` ``[B, L, C]`` (all padded to a common length
        by repeating chunks, as ComfyUI does), plus the pooled embeddings for SDXL. Pass as ``pipe(**kw)``.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
    device = device or pipe.unet.device
    xl = getattr(pipe, "text_encoder_2", None) is not None
    tok = pipe.tokenizer
    texts = prompts + negatives
    layouts = [_layout(t, tok, syntax) for t in texts]
    encoded = []
    for text, layout in zip(texts, layouts):
        z, pooled = _encode(layout, tok, pipe.text_encoder, xl, device)
        if xl:
            tok2 = pipe.tokenizer_2
            z2, pooled = _encode(_layout(text, tok2, syntax), tok2, pipe.text_encoder_2, True, device)
            z = torch.cat([z, z2], dim=-1)
        encoded.append((z, pooled))
    length = math.lcm(*[z.shape[1] for z, _ in encoded])
    embeds = [_repeat_to(z, length) for z, _ in encoded]
    n = len(prompts)
    out = {"prompt_embeds": torch.cat(embeds[:n]), "negative_prompt_embeds": torch.cat(embeds[n:])}
    if xl:
        pooled = [p for _, p in encoded]
        out["pooled_prompt_embeds"] = torch.cat(pooled[:n])
        out["negative_pooled_prompt_embeds"] = torch.cat(pooled[n:])
        if getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            for i, t in enumerate(negatives):
                if t == "":
                    out["negative_prompt_embeds"][i].zero_()
                    out["negative_pooled_prompt_embeds"][i].zero_()
    if trace is not None:
        trace.stage_layouts(layouts[:n], layouts[n:], texts)
    return out
