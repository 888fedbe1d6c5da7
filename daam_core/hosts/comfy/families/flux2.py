"""Flux.2 on ComfyUI: Flux's double-stream blocks, then single-stream blocks, over ``[text, image, reference latents]``.

The network is ComfyUI's Flux code with ``global_modulation`` (``image_model "flux2"``): patch 1 over a 128-channel
latent (16 image pixels a cell), ``block_type`` / ``block_index`` in ``transformer_options``, reference latents
after the image (never mapped), guidance distilled into the model.

The text is Mistral Small 3's (the ``mistral3_24b`` encoder; its Tekken tokenizer travels in the text-encoder file):
the host's tokenizer wraps the prompt in a system-prompt template (``[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]{}
[/INST]``) and tokenizes the templated string in one piece after its start token; the encoder keeps every token
(the hidden states of three layers side by side in width). Words are found by byte offsets of the templated string
(:mod:`.templated`); the template's tokens and the start token are no word. The network then pads the text on the
left to 512 tokens with zeros (``model_base.Flux2.extra_conds``): a model call's text is ``max(tokens, 512)``
long, the prompt's tokens last, and the prompt's layout over it (:meth:`Flux2.call_layout`) has the padding
first.
"""

from __future__ import annotations

from .base import DiTSpec, flat_length, host_tokenizer, register
from .flux import Flux1, flux_spec
from .templated import pad_left, templated_layout

KEY = "mistral3_24b"
TEXT_TOKENS = 512  # model_base.Flux2.extra_conds: the conditioning is padded on the left to this many tokens
PAD = 11  # Mistral3Tokenizer's pad token: the id the layout shows at the network's padding (zeros, no token)


class Flux2(Flux1):
    name = "flux2"
    label = "Flux.2"
    variants = "dev, reference latents"
    pixels_per_cell = 16  # the VAE's 8, then 2 x 2 cells folded into the 128 channels (EmptyFlux2LatentImage)

    def describe(self, model, net, config) -> DiTSpec | None:
        if config.get("image_model") != "flux2":
            return None
        return flux_spec(self, net)

    def text_length(self, cond):
        return max(int(cond["cross_attn"].shape[1]), TEXT_TOKENS)

    def call_layout(self, layout, length, tokenizer=None, text=None, encoders=None):
        return pad_left(layout, length - layout.length, PAD)

    def text_segments(self, tokenizer, tokens, encoders=None):
        if KEY not in tokens or not hasattr(tokenizer, "llama_template"):
            return []  # not Flux.2's text encoder: the conditioning's width check names it
        return [[("mistral", KEY, flat_length(tokens[KEY]))]]

    def layout(self, tokenizer, tokens, text, segments):
        hf = host_tokenizer(tokenizer, KEY, "Mistral")
        return templated_layout(tokens[KEY], hf, tokenizer.llama_template, segment="mistral", label="Flux.2")

    def no_negative_reason(self):
        return ("Flux.2's guidance is distilled into the model: at its usual cfg 1 the negative prompt is never "
                "evaluated, so negative words have no maps. Clear negative_words, or sample at cfg > 1")


register(Flux2())
