"""Token layouts of Forge prompts, checked against the tokens Forge really encoded.

Forge (A1111's text processing) encodes a prompt line with ``ClassicTextProcessingEngine.tokenize_line``: A1111
weighting ``(word:1.2)`` / ``[word]``, ``BREAK``, 75-token chunks with comma backtracking, and textual-inversion
embeddings found by their bare name (placeholder id 0 plus a ``fix`` naming the embedding). The engine's
:func:`daam_core.text.tokenize.tokenize` with ``syntax="a1111"`` re-does that; this module feeds it the embeddings Forge
found and refuses a layout whose ids differ from Forge's, so word positions are the host's, never a guess.
"""

from __future__ import annotations

import re
from typing import Sequence

from ...text.embeddings import EMBEDDING_PREFIX
from ...text.layout import TokenLayout
from ...text.tokenize import tokenize


class TokenMismatchError(ValueError):
    """DAAM's token layout of a prompt is not what Forge encoded."""


def text_engine(sd_model):
    """The ``ClassicTextProcessingEngine`` whose tokens feed the UNet's cross-attention (CLIP-L on SDXL)."""
    for name in ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g"):
        engine = getattr(sd_model, name, None)
        if engine is not None and hasattr(engine, "tokenize_line"):
            return engine
    return None


def forge_tokens(engine, prompt: str) -> tuple[list[int], dict[int, tuple[str, int]]]:
    """Forge's token ids of one prompt line (chunks concatenated) and its embeddings.

    Returns
    -------
    ids : list of int, length ``n_chunks * (chunk_length + 2)``
    embeddings : dict position -> (name, vector count)
        Where Forge placed each textual-inversion embedding.
    """
    chunks, _ = engine.tokenize_line(prompt)
    ids: list[int] = []
    fixes: dict[int, tuple[str, int]] = {}
    for chunk in chunks:
        base = len(ids)
        ids.extend(int(t) for t in chunk.tokens)
        for fix in chunk.fixes:
            # fix.offset counts from the chunk's first token, before BOS was added
            fixes[base + 1 + int(fix.offset)] = (str(fix.embedding.name), int(fix.embedding.vectors))
    return ids, fixes


def _mark_embeddings(prompt: str, names: Sequence[str]) -> str:
    """Prefix bare embedding names with ``embedding:`` so that the engine's tokenizer sees them as embeddings."""
    if not names:
        return prompt
    alternatives = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))
    return re.sub(rf"(?<![\w:])({alternatives})(?![\w])", lambda m: EMBEDDING_PREFIX + m.group(1), prompt)


def forge_layout(engine, prompt: str) -> TokenLayout:
    """The token layout of ``prompt`` as Forge's ``engine`` encodes it.

    Raises
    ------
    TokenMismatchError
        The engine's A1111 layout differs from Forge's tokens (named position and pieces).
    """
    tokenizer = engine.tokenizer
    host_ids, fixes = forge_tokens(engine, prompt)
    embeddings = {name: n for name, n in fixes.values()}
    text = _mark_embeddings(prompt, list(embeddings))
    layout = tokenize(text, tokenizer, syntax="a1111", max_length=int(engine.chunk_length) + 2, pad_with_end=True,
                      embeddings=embeddings or None)
    ours = list(layout.ids)
    theirs = list(host_ids)
    for pos, (_, n) in fixes.items():
        theirs[pos:pos + n] = [-1] * n
    if ours != theirs:
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        piece = lambda ids: tokenizer.convert_ids_to_tokens([i for i in ids[first:first + 3] if i >= 0])  # noqa: E731
        raise TokenMismatchError(
            f"DAAM's reading of the prompt differs from Forge's tokens at position {first} (of {len(theirs)}): "
            f"DAAM {piece(ours)} vs Forge {piece(theirs)}; maps for this prompt would be misplaced, so DAAM is off "
            f"for it. Prompt: {prompt[:120]!r}")
    return layout


def pad_layout(layout: TokenLayout, length: int, engine) -> TokenLayout:
    """``layout`` followed by Forge's empty chunks (BOS + EOS x 76) up to ``length`` positions.

    Forge encodes a batch of prompts to the longest one's chunk count (``ClassicTextProcessingEngine.__call__``
    pads the others with ``empty_chunk()``), so a shorter prompt's conditioning has these extra positions.
    """
    extra = length - layout.length
    n = layout.chunk_length
    if extra == 0:
        return layout
    if extra < 0 or extra % n:
        raise ValueError(f"a conditioning of {length} tokens cannot hold this prompt's {layout.length} "
                         f"in chunks of {n}")
    ids = ([int(engine.id_start)] + [int(engine.id_end)] * (n - 1)) * (extra // n)
    pieces = tuple(str(p) for p in engine.tokenizer.convert_ids_to_tokens(ids))
    return TokenLayout(layout.ids + tuple(ids), layout.weights + (1.0,) * extra, layout.pieces + pieces,
                       layout.word_of + (-1,) * extra, layout.words, n, layout.overflow_ids, layout.overflow_pieces,
                       layout.tokenizer)
