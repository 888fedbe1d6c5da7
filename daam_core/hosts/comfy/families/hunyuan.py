"""HunyuanVideo 1.0 (text-to-video), HunyuanVideo 1.5 and HunyuanImage 2.1 on ComfyUI: double-stream blocks, then
single-stream blocks, on ComfyUI's ``hunyuan_video`` network.

Every call attends over ``[image, text]`` (double blocks are built ``flipped_img_txt``, single blocks concatenate
the image first); ComfyUI names each call's block (``block_type``, ``block_index``). The image tokens are the latent
cut by ``img_in``'s patch (HunyuanVideo ``(1, 2, 2)``: frame after frame; HunyuanImage 2.1 ``(1, 1)``). A text mask
(``attention_mask`` of the conditioning: padding of a batch of prompts) reaches the attention as one row over the
keys and the recorder applies it. The token refiner's attention (text over text) is not a joint call.

HunyuanVideo's text is llava-llama-3's: the host's tokenizer wraps the prompt in its template and its encoder keeps
the tokens after the user header's ``\\n\\n`` up to and with the closing ``<|eot_id|>``; words are found by byte
offsets of the templated string (:func:`.qwen_image.chat_layout`). CLIP-L gives only the pooled vector.
HunyuanImage 2.1's text is Qwen2.5-VL's, cut as Qwen-Image's; a prompt with quoted text also gets byT5 glyph tokens,
which follow the text on the sequence (they take part in the softmax and are never mapped).

HunyuanVideo 1.5 (patch ``(1, 1, 1)``, 32 latent channels plus 33 of the host's image condition) has
HunyuanImage 2.1's text (Qwen2.5-VL with its own template, the same cut); its network puts the byT5 glyph tokens
and, for image-to-video, the SigLIP vision tokens *before* the text: ``[vision, glyphs, text]``, so a call is
``[image, vision, glyphs, text]`` (0.3.7x) or ``[vision, glyphs, text, image]`` (0.33). Those tokens take part in
the softmax and are never mapped.

HunyuanVideo image-to-video (its image tokens in the text, a guiding frame), SkyReels, the HunyuanVideo 1.5
super-resolution model and the HunyuanImage 2.1 refiner are not these families.
"""

from __future__ import annotations

from .base import DiTSpec, JointFamily, host_tokenizer, register
from .qwen_image import KEY as QWEN_KEY
from .qwen_image import _ids, _template_end, chat_layout
from .templated import flat_ids

LLAMA = "llama"
HEADER, USER, HEADER_END, EOT, BLANK = 128006, 882, 128007, 128009, 271  # Llama 3 ids the host's cut reads


def _net_kind(net) -> dict:
    """What distinguishes the models on the ``hunyuan_video`` network."""
    return {"dims": len(net.patch_size), "vector": getattr(net, "vector_in", None) is not None,
            "byt5": getattr(net, "byt5_in", None) is not None, "vision": getattr(net, "vision_in", None) is not None,
            "cond_type": getattr(net, "cond_type_embedding", None) is not None, "in": int(net.in_channels)}


def _spec(family, net, frame_patch: int = 1) -> DiTSpec | None:
    patch = [int(p) for p in net.patch_size][-2:]
    if patch[0] != patch[1]:
        return None
    # ComfyUI 0.3.7x builds the double blocks flipped_img_txt and joins [image, text]; newer versions (0.33) dropped
    # the flag and join [text, image] in every block
    double = list(net.double_blocks)
    image_first = bool(double and getattr(double[0], "flipped_img_txt", False))
    return DiTSpec(family, patch=patch[0], heads=int(net.num_heads), image_first=image_first,
                   frame_patch=frame_patch, blocks=(("double", len(double)), ("single", len(net.single_blocks))))


def plain_ids(hf, text: str) -> list[int]:
    """``text``'s token ids without special tokens: Hugging Face's tokenizer, or ComfyUI's own byte-level BPE
    (newer hosts; it adds none for Llama 3)."""
    try:
        return hf(text, add_special_tokens=False)["input_ids"]
    except TypeError:
        return hf(text)["input_ids"]


def video_keep(ids) -> tuple[int, int]:
    """The tokens ``[start, stop)`` ``HunyuanVideoClipModel.encode_token_weights`` keeps of a prompt encoded without
    images: from after the user header (and its ``\\n\\n``) through the ``<|eot_id|>`` that closes the turn."""
    template_end, user_end = 0, None
    for i, t in enumerate(ids):
        if t == HEADER and i + 2 < len(ids) and ids[i + 1] == USER and ids[i + 2] == HEADER_END:
            template_end, user_end = i + 2, -1
        if t == EOT and user_end == -1:
            user_end = i + 1
    if len(ids) > template_end + 2 and ids[template_end + 1] == BLANK:
        template_end += 2
    stop = len(ids) if user_end is None else (user_end if user_end >= 0 else len(ids) - 1)
    return template_end, max(template_end, stop)


class HunyuanVideo(JointFamily):
    name = "hunyuan_video"
    label = "HunyuanVideo"
    variants = "1.0 text-to-video"
    networks = ("comfy.ldm.hunyuan_video.model.HunyuanVideo",)
    image_first_parts = ("double", "single")
    distilled_guidance = True
    video = True

    def describe(self, model, net, config):
        kind = _net_kind(net)
        if config.get("image_model", "hunyuan_video") != "hunyuan_video" or kind != {
                "dims": 3, "vector": True, "byt5": False, "vision": False, "cond_type": False, "in": 16}:
            return None
        return _spec(self, net, frame_patch=int(net.patch_size[0]))

    def text_segments(self, tokenizer, tokens, encoders=None):
        if LLAMA not in tokens or not hasattr(tokenizer, "llama_template"):
            return []
        ids = _ids(tokens[LLAMA])
        start, stop = video_keep(ids)
        return [[("llama", LLAMA, stop - start)]]

    def layout(self, tokenizer, tokens, text, segments):
        hf = host_tokenizer(tokenizer, LLAMA, "Llama")
        if hf.decode(plain_ids(hf, "a b")) != "a b":
            raise ValueError(f"DAAM: this host's Llama 3 tokenizer ({type(hf).__name__}) drops the spaces between "
                             f"words (transformers 5 reads ComfyUI's llama_tokenizer without its byte-level "
                             f"pre-tokenizer), so the prompt's words cannot be told apart; use transformers 4")
        keep = video_keep(flat_ids(tokens[LLAMA], self.label))  # token ids, or an error naming an image's
        return chat_layout(tokens[LLAMA], hf, text, tokenizer.llama_template, keep=keep, segment="llama",
                           what=self.label)

    def no_negative_reason(self):
        return ("HunyuanVideo's guidance is distilled into the model: at cfg 1 the negative prompt is never "
                "evaluated, so negative words have no maps. Clear negative_words")


class HunyuanImage21(JointFamily):
    name = "hunyuan_image"
    label = "HunyuanImage 2.1"
    networks = ("comfy.ldm.hunyuan_video.model.HunyuanVideo",)
    image_first_parts = ("double", "single")

    def describe(self, model, net, config):
        kind = _net_kind(net)
        if config.get("image_model", "hunyuan_video") != "hunyuan_video" or kind["dims"] != 2 or kind["vector"] \
                or kind["vision"] or kind["cond_type"]:
            return None
        return _spec(self, net)

    pixels_per_cell = 32  # HunyuanImage 2.1's VAE downsamples 32x (newer hosts' latent format says so)

    def trailing_tokens(self, spec, conds) -> int:
        byt5 = conds.get("txt_byt5")  # [B, glyph tokens, 1472]; the network appends them after the text
        return int(byt5.shape[1]) if byt5 is not None else 0

    def spans(self, spec, part, text, image, refs):
        if spec.image_first:  # [image, text, glyphs]
            return super().spans(spec, part, text, image, refs)
        return (0, text), (text + refs, text + refs + image), text + refs + image  # [text, glyphs, image]

    def text_segments(self, tokenizer, tokens, encoders=None):
        if QWEN_KEY not in tokens or not hasattr(tokenizer, "llama_template"):
            return []
        ids = _ids(tokens[QWEN_KEY])
        return [[("qwen", QWEN_KEY, len(ids) - _template_end(ids))]]

    def layout(self, tokenizer, tokens, text, segments):
        hf = host_tokenizer(tokenizer, QWEN_KEY, "Qwen2.5")
        return chat_layout(tokens[QWEN_KEY], hf, text, tokenizer.llama_template, what=self.label)


class HunyuanVideo15(HunyuanImage21):
    name = "hunyuan_video15"
    label = "HunyuanVideo 1.5"
    variants = "text-to-video, image-to-video"
    video = True
    pixels_per_cell = 16  # HunyuanVideo 1.5's VAE downsamples 16x (EmptyHunyuanVideo15Latent: height // 16)
    in_channels = (32 + 32 + 1,)  # noise, the image condition (zeros for text-to-video), its mask; SR: 98

    def describe(self, model, net, config):
        kind = _net_kind(net)
        if config.get("image_model", "hunyuan_video") != "hunyuan_video" or kind["dims"] != 3 or kind["vector"] \
                or not kind["byt5"] or not kind["cond_type"] or kind["in"] not in self.in_channels:
            return None
        return _spec(self, net, frame_patch=int(net.patch_size[0]))

    def trailing_tokens(self, spec, conds) -> int:
        """The glyph (``txt_byt5``) and vision (``clip_fea``) tokens: this network puts them before the text
        (:meth:`spans`)."""
        return sum(int(conds[k].shape[1]) for k in ("txt_byt5", "clip_fea") if conds.get(k) is not None)

    def spans(self, spec, part, text, image, refs):
        if spec.image_first:  # [image, vision, glyphs, text]
            return (image + refs, image + refs + text), (0, image), image + refs + text
        return (refs, refs + text), (refs + text, refs + text + image), refs + text + image  # [.., text, image]



register(HunyuanVideo())
register(HunyuanImage21())
register(HunyuanVideo15())
