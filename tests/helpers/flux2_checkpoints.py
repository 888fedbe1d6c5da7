"""Flux.2 for the host's tests: a tiny Tekken tokenizer in the text-encoder file, the host's own Flux.2 tokenizer and
text encoder built from it, and the tiny Flux.2 network of ``helpers.dit_checkpoints.build_flux2``.

The tokenizer
    ComfyUI builds Flux.2's tokenizer from Mistral's ``tekken.json``, which travels inside the text-encoder file as
    the ``tekken_model`` entry (a byte tensor; ``comfy.sd.load_text_encoder_state_dicts`` hands it over as
    ``tokenizer_data``). ``tiny_tekken`` writes a Tekken file of the real format: Mistral Small 3's first 20
    special tokens (``<s>`` 1, ``<pad>`` 11, ``[INST]`` 3, ``[SYSTEM_PROMPT]`` 17, ...), the 256 byte tokens, then
    byte-level BPE merges learned here from the tests' prompts and the host's template (so the template and most
    words are a few tokens, and some words split into several). ``flux2_tokenizer`` is the host's
    ``Flux2Tokenizer(tokenizer_data={"tekken_model": ...})``.

    ComfyUI 0.3.75 builds it with transformers 4's ``MistralConverter(vocab=..., additional_special_tokens=...)``
    and ``LlamaTokenizerFast(tokenizer_object=...)``, which adds ``<s>`` in front of every text (its post-processor).
    transformers 5 changed both (the converter now reads a file; the Llama class adds no start token), and the
    host's constructor fails there. On transformers 5, ``host_mistral_tokenizer()`` gives the host those two
    transformers 4 behaviours, as transformers 4 defines them, while the host's constructor runs; everything else
    (the Tekken parsing, the template, the tokenization, the padding) is the host's code.

The text encoder
    ``build_tiny_flux2_clip`` loads a Mistral Small 3 of the host's own classes as ``CLIPLoader`` loads one: the
    host detects Mistral 3 24B from a 5120-wide ``post_attention_layernorm`` (pruned for Flux.2 without layer 39:
    30 layers, the hidden states of layers 10, 20 and 30 side by side), so the width and the 30 layers stay and the
    rest is cut (1 head and 1 key-value head of 128, an 8-wide MLP, the tiny Tekken's vocabulary): ~83 M
    parameters. Its conditioning is ``[1, tokens, 3 * 5120]``; ``build_flux2(context_dim=FLUX2_TEXT_DIM)`` takes
    it.
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import json
import zlib

import torch

TEMPLATE_WORDS = ("You are an AI that reasons about image descriptions. You give structured responses focusing on "
                  "object relationships, object\nattribution and actions without speculation.")
SPECIALS = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
            "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]")  # Mistral Small 3's Tekken v7
# Tekken's own pre-tokenizer pattern (the file's "pattern"; ComfyUI 0.3.75 does not pass it to the converter)
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                  r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
CORPUS = ("a cat and a dog on a red sofa", "blurry, low quality", "a small wooden house",
          "a golden dragon flies over the sea", "the cat sleeps on the sofa at night", TEMPLATE_WORDS)
FLUX2_TEXT_DIM = 3 * 5120  # Flux.2's text input: three Mistral hidden states side by side


def tiny_tekken(merges: int = 120, extra: tuple[str, ...] = ()) -> bytes:
    """A ``tekken.json`` (the real format) with ``merges`` byte-level BPE merges learned from the tests' texts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + merges, initial_alphabet=alphabet, show_progress=False,
                                  special_tokens=[])
    bpe.train_from_iterator(list(CORPUS + extra) * 20, trainer)
    decode = {c: b for b, c in bytes_to_unicode().items()}
    learned = json.loads(bpe.to_str())["model"]["merges"]
    vocab = [bytes([b]) for b in range(256)]
    for m in learned:
        left, right = m.split(" ") if isinstance(m, str) else m
        token = bytes(decode[c] for c in left + right)
        if token not in vocab:
            vocab.append(token)
    size = len(SPECIALS) + len(vocab)
    data = {"config": {"pattern": TEKKEN_PATTERN, "num_vocab_tokens": size, "default_vocab_size": size,
                       "default_num_special_tokens": len(SPECIALS), "version": "v7"},
            "vocab": [{"rank": r, "token_bytes": base64.b64encode(t).decode(),
                       "token_str": t.decode("utf-8", "replace")} for r, t in enumerate(vocab)],
            "special_tokens": [{"rank": r, "token_str": s, "is_control": True} for r, s in enumerate(SPECIALS)]}
    return json.dumps(data).encode()


def tekken_tensor(data: bytes) -> torch.Tensor:
    """The ``tekken_model`` entry of a text-encoder file."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


# -- transformers 4's two pieces the host relies on ------------------------------------------------------------

_TF4_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")  # the converter's default: the host passes no pattern


class _MistralConverter4:
    """transformers 4's ``transformers.integrations.mistral.MistralConverter``: a Tekken vocabulary (bytes or special
    token -> rank, specials first) to a byte-level BPE ``tokenizers.Tokenizer``; ids in the vocabulary's order."""

    def __init__(self, vocab=None, pattern=_TF4_PATTERN, add_prefix_space=False, additional_special_tokens=None,
                 **kwargs):
        self.vocab, self.pattern, self.add_prefix_space = vocab, pattern, add_prefix_space
        self.additional_special_tokens = additional_special_tokens

    def _vocab_merges(self):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        ranks, enc = self.vocab, bytes_to_unicode()

        def text(b: bytes) -> str:
            return "".join(enc[ord(ch)] for ch in b.decode("latin-1"))

        merges, vocab = [], {}
        for idx, (token, rank) in enumerate(ranks.items()):
            if token in self.additional_special_tokens:
                vocab[token] = idx
                continue
            vocab[text(token)] = idx
            if len(token) == 1:
                continue
            local = [(token[:i], token[i:], rank) for i in range(1, len(token))
                     if token[:i] in ranks and token[i:] in ranks and token in ranks]
            merges.extend(sorted(local, key=lambda x: (ranks[x[0]], ranks[x[1]])))
        merges.sort(key=lambda m: m[2])
        return vocab, [(text(a), text(b)) for a, b, _ in merges]

    def converted(self):
        from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
        from tokenizers.models import BPE

        vocab, merges = self._vocab_merges()
        tok = Tokenizer(BPE(vocab, merges, fuse_unk=False))
        if hasattr(tok.model, "ignore_merges"):
            tok.model.ignore_merges = True
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(self.pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=self.add_prefix_space, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(self.additional_special_tokens)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return tok


def _llama_fast4(path, tokenizer_object=None, **kwargs):
    """transformers 4's ``LlamaTokenizerFast(tokenizer_object=...)``: ``add_bos_token`` on, so its post-processor
    puts ``<s>`` before every text (``update_post_processor``)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bos = tokenizer_object.token_to_id("<s>")
    tokenizer_object.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer_object, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@contextlib.contextmanager
def host_mistral_tokenizer():
    """While it is open, the host's Flux.2 tokenizer is built as on transformers 4 (a no-op there, and on hosts
    that read the Tekken file with their own byte-level BPE, as 0.33 does)."""
    import comfy.text_encoders.flux as flux_te

    if hasattr(flux_te, "from_tekken_json"):
        yield  # the host's own tokenizer: transformers is not involved
        return
    import transformers.integrations.mistral as tf_mistral

    converter = getattr(tf_mistral, "MistralConverter", None)
    if converter is not None and "vocab_file" not in inspect.signature(converter.__init__).parameters:
        yield  # transformers 4: the host's code runs as written
        return
    saved = vars(flux_te.MistralTokenizerClass)["from_pretrained"]
    tf_mistral.MistralConverter = _MistralConverter4
    flux_te.MistralTokenizerClass.from_pretrained = staticmethod(_llama_fast4)
    try:
        yield
    finally:
        tf_mistral.MistralConverter = converter
        flux_te.MistralTokenizerClass.from_pretrained = saved


def flux2_tokenizer(tekken: bytes | None = None):
    """The host's ``Flux2Tokenizer`` around a Tekken file (default: ``tiny_tekken()``), as the host loads it from a
    text-encoder file's ``tekken_model`` entry."""
    from comfy.text_encoders.flux import Flux2Tokenizer

    with host_mistral_tokenizer():
        return Flux2Tokenizer(tokenizer_data={"tekken_model": tekken_tensor(tekken or tiny_tekken())})


# -- the text encoder -------------------------------------------------------------------------------------------

def mistral_tiny_options(vocab_size: int) -> dict:
    return {"mistral3_24b_model_config": {"intermediate_size": 8, "num_attention_heads": 1, "num_key_value_heads": 1,
                                          "vocab_size": vocab_size}}


def build_tiny_flux2_clip(seed: int = 0, tekken: bytes | None = None):
    """A ``comfy.sd.CLIP`` of Flux.2's text encoder (the host's Mistral 3 code, see the module docstring) loaded from
    a state dict that carries its Tekken tokenizer, as ``CLIPLoader(type="flux2")`` loads a file."""
    import comfy.sd
    import comfy.text_encoders.flux as flux_te

    from helpers.dit_checkpoints import _fill

    tekken = tekken or tiny_tekken()
    vocab = len(json.loads(tekken)["vocab"]) + len(SPECIALS)
    options = mistral_tiny_options(vocab)
    shapes = flux_te.flux2_te(pruned=True)(device="cpu", dtype=torch.float32, model_options=dict(options))
    _fill(shapes.mistral3_24b.transformer, seed + zlib.crc32(b"mistral3_24b"))
    state = {k: v.detach().clone() for k, v in shapes.mistral3_24b.transformer.state_dict().items()}
    del shapes
    state["tekken_model"] = tekken_tensor(tekken)
    with host_mistral_tokenizer():
        # CLIPLoader(type="flux2") on 0.3.75: no CLIPType.FLUX2, so STABLE_DIFFUSION; the file decides the encoder
        return comfy.sd.load_text_encoder_state_dicts([state], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                                                      model_options=options)


def build_tiny_flux2(seed: int = 0, context_dim: int = FLUX2_TEXT_DIM):
    """``helpers.dit_checkpoints.build_flux2`` (1 double + 1 single block, 2 heads of 128), for this encoder's width
    by default."""
    from helpers.dit_checkpoints import build_flux2

    return build_flux2(seed=seed, context_dim=context_dim)
