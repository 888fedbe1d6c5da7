"""HiDream-I1 on ComfyUI: double-stream blocks, then single-stream blocks, each one joint attention over
``[image, text]`` (the image first), real CFG.

The text of every call is built per block (``comfy/ldm/hidream/model.py``): T5's 128 tokens (the conditioning's
``cross_attn``), then Llama 3.1's tokens twice: the hidden states of the last layer the network lists
(``llama_layers[-1]``, carried through the double blocks with T5), then those of the block's own layer
(``conditioning_llama3``, one hidden state per layer). So a call holds ``128 + 2 x llama tokens`` text keys and a
word has positions in three segments: ``t5``, ``llama``, ``llama`` (``segments`` picks ``t5`` or ``llama``; both
by default). CLIP-L/G give only the pooled vector. ComfyUI names no HiDream block: the n-th joint call of a model
call is block n.

The host's T5 tokenizer pads or cuts the prompt to 128 tokens (words past them have no T5 positions); its Llama 3.1
tokenizer keeps the whole prompt after its start token, padded to 128 with ``<|eot_id|>``, and keeps prompt weights
(a weighted part is tokenized on its own). Llama's words are found by byte offsets of what it tokenized
(:mod:`.templated`), T5's by replaying the host's grouping. An encoder loaded without T5 gives 128 zero vectors
and one without Llama one zero token (twice in each call): given that CLIP, those positions are no word; a
conditioning whose Llama part is not the text's is refused by the length check. An edit model's image condition
(HiDream-E1: the latent doubled in width) gives calls of another length, which are not recorded.
"""

from __future__ import annotations

from ....text.layout import TokenLayout, concat_layouts, zero_positions
from .base import DiTSpec, JointFamily, flat_length, host_tokenizer, register
from .templated import templated_layout

T5, LLAMA = "t5xxl", "llama"


class HiDream(JointFamily):
    name = "hidream"
    label = "HiDream"
    variants = "I1 full, dev, fast"
    networks = ("comfy.ldm.hidream.model.HiDreamImageTransformer2DModel",)
    image_first_parts = ("double", "single")

    def describe(self, model, net, config) -> DiTSpec | None:
        if config.get("image_model", "hidream") != "hidream":
            return None
        return DiTSpec(self, patch=int(net.patch_size), heads=int(net.num_attention_heads),
                       blocks=(("double", len(net.double_stream_blocks)), ("single", len(net.single_stream_blocks))),
                       image_first=True)

    def layer(self, spec, index, options):
        return JointFamily.layer(self, spec, index, {})  # the host names no HiDream block: blocks run in order

    def text_length(self, cond):
        llama = cond.get("conditioning_llama3")
        return int(cond["cross_attn"].shape[1]) + 2 * (int(llama.shape[2]) if llama is not None else 0)

    def text_segments(self, tokenizer, tokens, encoders=None):
        if T5 not in tokens or LLAMA not in tokens:
            return []  # not HiDream's tokenizer
        return [[("t5", T5, flat_length(tokens[T5]))]]

    def call_layout(self, layout, length, tokenizer=None, text=None, encoders=None):
        if encoders is not None and getattr(encoders, "t5xxl", True) is None:
            layout = wordless(layout)  # no T5 loaded: the encoder gives 128 zero vectors
        if encoders is not None and getattr(encoders, "llama", True) is None and length == layout.length + 2:
            empty = zero_positions(1, "llama")
            return concat_layouts([("t5", layout), ("llama", empty), ("llama", empty)])  # one zero Llama token
        if text is None:
            raise ValueError("DAAM: HiDream's layout needs the prompt's text")
        hf = host_tokenizer(tokenizer, LLAMA, "Llama")
        chunks = tokenizer.tokenize_with_weights(text, return_word_ids=True)[LLAMA]
        n = flat_length(chunks)
        if layout.length + 2 * n != length:
            raise ValueError(f"the text encodes to {layout.length} T5 tokens and {n} Llama tokens, but the sampler's "
                             f"HiDream conditioning holds {length - layout.length} Llama positions ({n} twice "
                             f"expected): give DAAM the same text and CLIP that encoded the conditioning")
        llama = templated_layout(chunks, hf, "{}", segment="llama", label="HiDream")
        return concat_layouts([("t5", layout), ("llama", llama), ("llama", llama)])


def wordless(layout: TokenLayout) -> TokenLayout:
    """``layout``'s positions holding no word (an encoder that is not loaded gives zeros there)."""
    return TokenLayout(layout.ids, layout.weights, layout.pieces, (-1,) * layout.length, (), layout.chunk_length,
                       tokenizer=layout.tokenizer, segments=layout.segments)


register(HiDream())
