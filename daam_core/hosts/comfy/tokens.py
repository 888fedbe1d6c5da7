"""ComfyUI's token replay: the layout of exactly what ComfyUI's tokenizer returned (pure Python, no ComfyUI import)."""

from __future__ import annotations

import numbers

from ...text.embeddings import EMBEDDING_PREFIX
from ...text.layout import Segment, TokenLayout, Word
from ...text.pieces import END_OF_WORD, decode_pieces, pieces_of
from ...text.sentencepiece import WORD_START, is_sentencepiece
from ...text.syntax import parse_prompt
from ...text.tokenize import LITERAL, renumber_embedding_pieces, segment_groups


def _as_id(token) -> int:
    """A host token: a Python/NumPy/0-d tensor integer -> its id; an embedding vector -> -1."""
    if isinstance(token, numbers.Integral):
        return int(token)
    shape = getattr(token, "shape", None)
    if shape is not None and len(shape) == 0:
        return int(token.item())
    return -1


def layout_from_comfy_tokens(chunks, tokenizer, *, prompt: str) -> TokenLayout:
    """Layout of exactly what ComfyUI's tokenizer produced for one text encoder.

    Parameters
    ----------
    chunks : list of list of (token, weight, word_id)
        ``SDTokenizer.tokenize_with_weights(prompt, return_word_ids=True)`` for one encoder (e.g. ``["l"]``):
        ``n_chunks`` lists of ``chunk_length`` entries; ``token`` is an int id or an embedding vector tensor,
        ``word_id`` is 0 for BOS/EOS/padding and otherwise numbers ComfyUI's word groups.
    tokenizer : CLIPTokenizer-like
        The encoder's Hugging Face tokenizer (``sd_tokenizer.tokenizer``).
    prompt : str
        The text that was tokenized, to recover the words as written and the embeddings' names.

    Returns
    -------
    TokenLayout
        Ids and weights exactly as the host encodes them, ``length = n_chunks * chunk_length``.
    """
    flat = [entry for chunk in chunks for entry in chunk]
    if not chunks or not flat:
        raise ValueError("no tokens: expected the output of tokenize_with_weights(..., return_word_ids=True)")
    chunk_length = len(chunks[0])
    if any(len(c) != chunk_length for c in chunks):
        raise ValueError("chunks differ in length")
    ids = [_as_id(e[0]) for e in flat]
    weights = [float(e[1]) for e in flat]
    if any(len(e) < 3 for e in flat):
        raise ValueError("word ids missing: call tokenize_with_weights(text, return_word_ids=True)")
    word_ids = [int(e[2]) for e in flat]

    # the host's groups in order of appearance
    host_groups: dict[int, list[int]] = {}
    for p, wid in enumerate(word_ids):
        if wid != 0:
            host_groups.setdefault(wid, []).append(p)
    groups = list(host_groups.values())

    assigned = None
    for literal in (False, True):
        assigned = _align_comfy(prompt, tokenizer, groups, ids, literal)
        if assigned is not None:
            break
    sentencepiece = is_sentencepiece(tokenizer)
    if assigned is None:
        assigned = _words_from_pieces(groups, ids, tokenizer, sentencepiece)

    word_of = [-1] * len(ids)
    names: list[str | None] = [None] * len(ids)
    words = []
    for index, (text, positions, name) in enumerate(assigned):
        for p in positions:
            word_of[p] = index
            names[p] = name
        words.append(Word(text, index, tuple(positions), weights[positions[0]]))
    real = [i for i in ids if i >= 0]
    it = iter(pieces_of(tokenizer, real))
    pieces = [next(it) if i >= 0 else f"<{EMBEDDING_PREFIX}{names[p] or '?'}:0>" for p, i in enumerate(ids)]
    pieces = renumber_embedding_pieces(pieces, word_of)
    segments = (Segment("t5", 0, len(ids), "sentencepiece"),) if sentencepiece else ()
    return TokenLayout(tuple(ids), tuple(weights), tuple(pieces), tuple(word_of), tuple(words), chunk_length,
                       (), (), tokenizer, segments)


def _align_comfy(prompt: str, tokenizer, host: list[list[int]], ids: list[int], literal: bool):
    """Replay ComfyUI's grouping of ``prompt`` against the host's groups.

    Returns ``[(word text, positions, embedding name)]``, or None when the replay disagrees with the host.
    """
    state = {"j": 0}

    def resolve(name: str):
        if literal:
            return LITERAL
        j = state["j"]
        if j < len(host) and all(ids[p] < 0 for p in host[j]):
            # the host found a file: by the name as written unless it has commas to strip
            return None if name != name.strip(",") else len(host[j])
        return None

    out = []
    for seg in parse_prompt(prompt, "comfy"):
        for g in segment_groups(seg, tokenizer, resolve, True):
            if not g.ids:
                continue
            j = state["j"]
            if j >= len(host):
                return None
            positions = host[j]
            host_ids = [ids[p] for p in positions]
            if g.embedding is not None:
                if any(i >= 0 for i in host_ids):
                    return None
            elif host_ids != g.ids:
                return None
            k = 0
            for text, n in g.words:
                out.append((text, positions[k:k + n], g.embedding))
                k += n
            state["j"] = j + 1
    return out if state["j"] == len(host) else None


def _words_from_pieces(host: list[list[int]], ids: list[int], tokenizer, sentencepiece: bool = False):
    """Fallback words: one per word piece (up to an end-of-word marker, or from a SentencePiece word start),
    embeddings one each."""
    out = []
    n_emb = 0
    for positions in host:
        if all(ids[p] < 0 for p in positions):
            name = f"embedding{n_emb}"
            n_emb += 1
            out.append((EMBEDDING_PREFIX + name, list(positions), name))
            continue
        run_pos: list[int] = []
        run_pieces: list[str] = []
        for p, piece in zip(positions, pieces_of(tokenizer, [ids[p] for p in positions])):
            if sentencepiece and piece.startswith(WORD_START) and run_pos:
                out.append(("".join(run_pieces).replace(WORD_START, " ").strip(), run_pos, None))
                run_pos, run_pieces = [], []
            run_pos.append(p)
            run_pieces.append(piece)
            if not sentencepiece and piece.endswith(END_OF_WORD):
                out.append((decode_pieces(run_pieces), run_pos, None))
                run_pos, run_pieces = [], []
        if run_pos:
            text = ("".join(run_pieces).replace(WORD_START, " ").strip() if sentencepiece
                    else decode_pieces(run_pieces))
            out.append((text, run_pos, None))
    return out


def layout_from_comfy_t5(chunks, tokenizer, *, prompt: str) -> TokenLayout:
    """Layout of what ComfyUI's T5-XXL tokenizer returned (``tokenize_with_weights(...)["t5xxl"]``, Flux/SD3).

    One chunk: content tokens, EOS ``</s>``, ``<pad>`` up to the tokenizer's minimum length (Flux 256, SD3 77),
    no BOS. The layout has one ``"t5"`` SentencePiece segment.
    """
    layout = layout_from_comfy_tokens(chunks, tokenizer, prompt=prompt)
    if not layout.segments:
        raise ValueError("the tokenizer given for the T5 tokens is not a SentencePiece (T5) tokenizer")
    return layout



class SentencePieceView:
    """ComfyUI's ``SPieceTokenizer`` (umT5 for Wan: a SentencePiece model the text-encoder file carries) seen
    through the Hugging Face tokenizer methods the layouts use: ids without specials, pieces of ids, the specials.

    Parameters
    ----------
    spiece : comfy.text_encoders.spiece_tokenizer.SPieceTokenizer
        The host's tokenizer object; its ``tokenizer`` is the ``sentencepiece.SentencePieceProcessor``.
    """

    def __init__(self, spiece):
        self.processor = spiece.tokenizer
        self.bos_token_id = None if self.processor.bos_id() < 0 else int(self.processor.bos_id())
        self.eos_token_id = int(self.processor.eos_id())
        self.pad_token_id = max(0, int(self.processor.pad_id()))

    def __call__(self, texts, add_special_tokens=False):
        one = isinstance(texts, str)
        ids = [self.processor.encode(t, add_bos=False, add_eos=add_special_tokens) for t in ([texts] if one else texts)]
        return {"input_ids": ids[0] if one else ids}

    def convert_ids_to_tokens(self, ids):
        return [self.processor.id_to_piece(int(i)) for i in ids]
