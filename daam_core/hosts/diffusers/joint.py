"""Tracing diffusers joint-attention transformers: Stable Diffusion 3 (MMDiT) and Flux.

In these models text and image tokens form one sequence and every query attends over all of it; DAAM records,
for the generated image's queries, the probabilities over the text keys of the softmax over the whole sequence
(:meth:`CrossAttentionRecorder.record_joint`). As for UNets, nothing of the host is replaced: forward hooks on each
attention module's projections and q/k norms keep the tensors its processor computed, and a hook after the module
hands the joint queries and keys to the recorder.

- SD3 (``JointAttnProcessor2_0``): image queries ``to_q`` (then ``norm_q``), text queries ``add_q_proj`` (then
  ``norm_added_q``), joined image first: ``[image | text]``. SD3.5 Medium's ``attn2`` (image only) is not joint
  and is left alone.
- Flux (``FluxAttention`` + ``FluxAttnProcessor`` calling ``dispatch_attention_fn``): per head ``norm_q`` /
  ``norm_added_q`` outputs ``[B, L, H, D]``, joined text first ``[text | image (| reference latents)]``, then
  RoPE; the hook applies diffusers' own ``apply_rotary_emb`` to the same tensors, so the recorded queries are the
  ones the attention function received. Single-stream blocks attend over the already joined sequence.

The spatial grid is a :class:`PatchGrid`: SD3 from the latent and the patch size, Flux from the image ids of the
generated latent (reference latents of Kontext-style pipelines carry another id and are not mapped).
"""

from __future__ import annotations

import inspect

import torch

from ...engine.geometry import FLUX_PARTS, MMDIT_PARTS, PatchGrid
from ...engine.recorder import CrossAttentionRecorder, cfg_rows, cfg_streams
from ...text.layout import TokenLayout
from .adapter import DiffusersTrace, _as_list


class _Sequence:
    """Facts of the current transformer call shared by the observers: text tokens and generated image tokens."""

    text = 0
    image = 0


def _last(keep: dict, key: str):
    def hook(module, args, output):
        keep[key] = output
    return hook


class JointObserver:
    """Forward hooks on one joint-attention module; records after the module's processor returned.

    Parameters
    ----------
    module : diffusers Attention (SD3) or FluxAttention
    recorder : CrossAttentionRecorder
    name : str
        Module path (``transformer_blocks.3.attn``, ``single_transformer_blocks.12.attn``).
    part : {"joint", "double", "single"}
    family : {"sd3", "flux"}
    seq : _Sequence
        Text / image token counts of the current call (set by the transformer's pre-hook).
    """

    _PROJECTIONS = ("to_q", "to_k", "add_q_proj", "add_k_proj", "norm_q", "norm_k", "norm_added_q", "norm_added_k",
                    "to_qkv", "to_added_qkv")

    def __init__(self, module, recorder: CrossAttentionRecorder, name: str, part: str, family: str, seq: _Sequence):
        self.module = module
        self.recorder = recorder
        self.name = name
        self.part = part
        self.family = family
        self.seq = seq
        self.kept: dict = {}
        self.kwargs: dict = {}

    def install(self) -> list:
        m = self.module
        handles = [m.register_forward_pre_hook(self._reset, with_kwargs=True)]
        for attr in self._PROJECTIONS:
            sub = getattr(m, attr, None)
            if isinstance(sub, torch.nn.Module):
                handles.append(sub.register_forward_hook(_last(self.kept, attr)))
        handles.append(m.register_forward_hook(self._record))
        return handles

    def _reset(self, module, args, kwargs):
        self.kept.clear()
        self.kwargs = kwargs
        return None

    def _record(self, module, args, output):
        kept, kwargs = dict(self.kept), self.kwargs
        self.kept.clear()
        self.kwargs = {}
        if not self.recorder.wants(self.name, self.part):
            return None
        if self.family == "sd3":
            q, k, n_image = self._sd3(kept)
            text, image = (n_image, q.shape[2]), (0, self.seq.image)
            mask = None  # JointAttnProcessor2_0 attends without a mask
        else:
            q, k = self._flux(kept, kwargs)
            text = (0, self.seq.text)
            image = (self.seq.text, self.seq.text + self.seq.image)
            mask = kwargs.get("attention_mask")
        # both processors call SDPA / dispatch_attention_fn without a scale: the default D ** -0.5
        self.recorder.record_joint(self.name, self.part, q, k, q.shape[1], text=text, image=image, mask=mask,
                                   skip_reshape=True)
        return None

    def _missing(self, what: str):
        return RuntimeError(
            f"DAAM cannot observe {self.name}: its processor {type(self.module.processor).__name__} computed the "
            f"{what} without calling the module's projection / norm layers, so there is nothing to record")

    def _sd3(self, kept: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Joint ``[B, H, L, D]`` queries and keys ``[image | text]`` as JointAttnProcessor2_0 builds them."""
        heads = self.module.heads

        def side(norm, proj, fused, index):
            if norm in kept:  # norm_q / norm_added_q run on [B, H, N, D]
                return kept[norm]
            if proj in kept:
                x = kept[proj]
            elif fused in kept:  # fuse_qkv_projections(): q, k, v = split(qkv, 3)
                qkv = kept[fused]
                x = qkv[..., index * (qkv.shape[-1] // 3):(index + 1) * (qkv.shape[-1] // 3)]
            else:
                raise self._missing(f"{proj} output")
            return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

        q_img, k_img = side("norm_q", "to_q", "to_qkv", 0), side("norm_k", "to_k", "to_qkv", 1)
        q_txt = side("norm_added_q", "add_q_proj", "to_added_qkv", 0)
        k_txt = side("norm_added_k", "add_k_proj", "to_added_qkv", 1)
        return torch.cat([q_img, q_txt], dim=2), torch.cat([k_img, k_txt], dim=2), q_img.shape[2]

    def _flux(self, kept: dict, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint ``[B, H, L, D]`` queries and keys ``[text | image]`` after RoPE, as FluxAttnProcessor builds them."""
        from diffusers.models.embeddings import apply_rotary_emb

        if "norm_q" not in kept or "norm_k" not in kept:
            raise self._missing("per-head query / key norms (norm_q, norm_k)")
        q, k = kept["norm_q"], kept["norm_k"]  # [B, N, H, D]
        if getattr(self.module, "added_kv_proj_dim", None) is not None:
            if "norm_added_q" not in kept or "norm_added_k" not in kept:
                raise self._missing("text query / key norms (norm_added_q, norm_added_k)")
            q = torch.cat([kept["norm_added_q"], q], dim=1)
            k = torch.cat([kept["norm_added_k"], k], dim=1)
        rotary = kwargs.get("image_rotary_emb")
        if rotary is not None:
            q = apply_rotary_emb(q, rotary, sequence_dim=1)
            k = apply_rotary_emb(k, rotary, sequence_dim=1)
        return q.transpose(1, 2), k.transpose(1, 2)


def _flux_grid(img_ids: torch.Tensor) -> tuple[int, int, int]:
    """(rows, cols, tokens) of the generated latent from Flux's image ids ``[N, 3]`` (id 0, row, col); reference
    latents (Kontext) carry another first id. One host sync per sampling."""
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    gen = ids[ids[:, 0] == ids[0, 0]]
    rows, cols = int(gen[:, 1].max()) + 1, int(gen[:, 2].max()) + 1
    return rows, cols, int(gen.shape[0])


class JointTrace(DiffusersTrace):
    """Joint-attention tracing of a diffusers Stable Diffusion 3 or Flux pipeline (and their img2img / inpaint
    variants). Use :func:`daam_core.trace`; the results are those of :class:`DiffusersTrace`.

    Text tokens: SD3's sequence is 77 CLIP positions (CLIP-L and CLIP-G side by side) followed by
    ``max_sequence_length`` T5 positions, and a word has positions in both segments; Flux's is the T5 tokens
    alone. Flux without true CFG has no negative branch: asking for negative words is an error.
    """

    required = ("transformer", "tokenizer", "encode_prompt")

    def __init__(self, pipe, filter=None, keep_on_device: bool = False):
        super().__init__(pipe, filter, keep_on_device)
        name = type(pipe.transformer).__name__
        if "SD3" in name:
            self.family, self.parts = "sd3", MMDIT_PARTS
        elif "Flux" in name:
            self.family, self.parts = "flux", FLUX_PARTS
        else:
            raise TypeError(f"{type(pipe).__name__} with a {name} is not supported: DAAM traces the joint attention "
                            "of SD3Transformer2DModel and FluxTransformer2DModel")
        self._seq = _Sequence()

    layer_kind = "joint-attention"

    def _observer(self, name: str, module):
        part = self._joint_module(name, module)
        return None if part is None else JointObserver(module, self.recorder, name, part, self.family, self._seq)

    def _wrap_encode(self, original_encode):
        """``pipe.encode_prompt`` that hands its prompts and the T5 embeddings it made to :meth:`_capture_prompts`."""
        signature = inspect.signature(original_encode)

        def encode_prompt(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            out = original_encode(*args, **kwargs)
            self._capture_prompts(bound.arguments, out[0])
            return out

        return encode_prompt

    def _joint_module(self, name: str, module) -> str | None:
        """The part of a joint-attention module, None for anything else."""
        if not name.endswith(".attn"):  # SD3.5's attn2 is image-only self-attention
            return None
        if self.family == "sd3":
            from diffusers.models.attention_processor import Attention

            if isinstance(module, Attention) and getattr(module, "add_k_proj", None) is not None:
                return "joint"
            return None
        if type(module).__name__ != "FluxAttention" and not hasattr(module, "norm_q"):
            return None
        return "single" if name.startswith("single_transformer_blocks") else "double"

    # -- prompts ----------------------------------------------------------------------------------
    def _layout_joint(self, text: str, t5_length: int, t5_text: str | None = None) -> TokenLayout:
        from ...text.layout import concat_layouts
        from ...text.sentencepiece import tokenize_t5

        t5_tok = self.pipe.tokenizer_3 if self.family == "sd3" else self.pipe.tokenizer_2
        t5 = tokenize_t5(text if t5_text is None else t5_text, t5_tok, max_length=t5_length, syntax="plain")
        if self.family == "flux":
            return t5
        return concat_layouts([("clip", self._layout(text)), ("t5", t5)], self.pipe.tokenizer)

    def _capture_prompts(self, args: dict, embeds=None) -> None:
        t5_length = int(args.get("max_sequence_length") or (256 if self.family == "sd3" else 512))
        prompt = args.get("prompt")
        if self.family == "flux" and self._pending is not None and self._pending.get("negative_embeds") is None \
                and self._pending.get("awaiting_negative"):
            self._capture_flux_negative(args, embeds, t5_length)
            return
        self._finalize()
        n_img = int(args.get("num_images_per_prompt") or 1)
        if prompt is None:
            if self._staged is None:
                raise ValueError("DAAM needs the prompt text to name words: pass `prompt=` to the pipeline")
            layouts, n_prompts, texts = self._staged, self._staged_count, self._staged_texts
            self._staged = None
        else:
            prompts = _as_list(prompt)
            n_prompts = len(prompts)
            if self.family == "sd3":
                negatives = _as_list(args.get("negative_prompt"), n_prompts)
                if len(negatives) != n_prompts:
                    raise ValueError(f"{n_prompts} prompts but {len(negatives)} negative prompts")
                t5_pos = _as_list(args.get("prompt_3"), n_prompts) if args.get("prompt_3") is not None else prompts
                t5_neg = (_as_list(args.get("negative_prompt_3"), n_prompts)
                          if args.get("negative_prompt_3") is not None else negatives)
                layouts = ([self._layout_joint(p, t5_length, t) for p, t in zip(prompts, t5_pos)] +
                           [self._layout_joint(p, t5_length, t) for p, t in zip(negatives, t5_neg)])
                texts = prompts + negatives
            else:  # Flux: the negative prompt (true CFG) comes in a second encode_prompt call
                layouts = [self._layout_joint(p, t5_length) for p in prompts]
                layouts += [self._layout_joint("", t5_length) for _ in prompts]  # replaced by a negative prompt
                texts = prompts + [""] * n_prompts
        n_images = n_prompts * n_img
        cfg = bool(args.get("do_classifier_free_guidance", True)) if self.family == "sd3" else False
        streams = cfg_streams(n_images, [i // n_img for i in range(n_images)], n_prompts)
        self._pending = dict(layouts=layouts, cfg=cfg, n_images=n_images, n_prompts=n_prompts, all_streams=streams,
                             streams=streams if cfg else streams[:n_images], texts=texts,
                             rows=tuple(cfg_rows(n_images, cfg)), positive_embeds=embeds, negative_embeds=None,
                             awaiting_negative=self.family == "flux")

    def _capture_flux_negative(self, args: dict, embeds, t5_length: int) -> None:
        pending = self._pending
        negatives = _as_list(args.get("prompt"), pending["n_prompts"])
        if len(negatives) != pending["n_prompts"]:
            raise ValueError(f"{pending['n_prompts']} prompts but {len(negatives)} negative prompts")
        n = pending["n_prompts"]
        pending["layouts"][n:] = [self._layout_joint(p, t5_length) for p in negatives]
        pending["texts"][n:] = negatives
        pending["negative_embeds"] = embeds
        pending["cfg"] = True
        pending["streams"] = pending["all_streams"]
        pending["awaiting_negative"] = False

    # -- per transformer call ---------------------------------------------------------------------
    def _before_network(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending["awaiting_negative"] = False
            if self.family == "sd3":
                h, w = hidden.shape[-2:]
                grid = PatchGrid((int(h), int(w)), module.config.patch_size)
            else:
                img_ids = kwargs.get("img_ids")
                if img_ids is None:
                    raise ValueError("DAAM needs Flux's img_ids to place the image tokens on a grid")
                rows, cols, _ = _flux_grid(img_ids)
                grid = PatchGrid((2 * rows, 2 * cols), 2)  # ids count 2x2 latent patches
            lengths = [lay.length for lay in pending["layouts"]]
            if context is not None and context.shape[1] not in lengths:
                raise ValueError(f"the transformer got {context.shape[1]} text tokens but the prompt layouts have "
                                 f"{sorted(set(lengths))}: the text encoding was not the one DAAM saw")
            self.recorder.begin(grid, pending["streams"], lengths)
            self._clock = self._sampling_clock()
            self._current = pending
            self._current["latent_hw"] = grid.latent_hw
            self._current["unet_calls"] = 0
        if self._current is None:
            self.recorder.skip_call()
            return None
        cur = self._current
        cur["unet_calls"] += 1
        rows = cur["rows"]
        if self.family == "flux":
            n = cur["n_images"]
            if context is cur["positive_embeds"] or cur["negative_embeds"] is None:
                rows = tuple(range(n))
            elif context is cur["negative_embeds"]:
                rows = tuple(n + i for i in range(n))
            else:
                self.recorder.warn("a transformer call with text embeddings that are neither the prompt's nor the "
                                   "negative prompt's; call skipped")
                self.recorder.skip_call()
                return None
        if hidden.shape[0] != len(rows):
            self.recorder.warn(f"a transformer call with batch {hidden.shape[0]} does not match the expected "
                               f"{len(rows)} rows (images x CFG branches); call skipped")
            self.recorder.skip_call()
            return None
        self._seq.text = int(context.shape[1]) if context is not None else 0
        self._seq.image = self.recorder.grid.n_image
        self.recorder.set_call(rows, self._moment(kwargs.get("timestep", args[2] if len(args) > 2 else None)))
        return None

    @property
    def timestep_scale(self) -> float:
        """SD3 passes the scheduler's timestep (0..1000), Flux the sigma (timestep / 1000)."""
        return 1000.0 if self.family == "flux" else 1.0
