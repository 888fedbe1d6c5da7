"""Tracing diffusers joint-attention transformers (the families of :mod:`.families`: SD3, Flux, ...).

In these models text and image tokens form one sequence and every query attends over all of it; DAAM records,
for the generated image's queries, the probabilities over the text keys of the softmax over the whole sequence
(:meth:`AttentionRecorder.record_joint`). As for UNets, nothing of the host is replaced: forward hooks on each
attention module's projections and q/k norms keep the tensors its processor computed, and a hook after the module
hands the joint queries and keys (rebuilt by the family, :meth:`JointFamily.joint_qk`) to the recorder.
"""

from __future__ import annotations

import inspect

import torch

from ...engine.recorder import AttentionRecorder
from ...text.layout import TokenLayout
from ..contract import cfg_rows, cfg_streams
from .adapter import DiffusersTrace, _as_list
from .families import JointFamily, family_of


class _Sequence:
    """Facts of the current transformer call shared by the observers: text tokens and generated image tokens."""

    text = 0
    image = 0


def _last(keep: dict, key: str):
    def hook(module, args, output):
        keep[key] = output
    return hook


def _input(keep: dict, key: str):
    def hook(module, args):
        keep[key] = args[0]
    return hook


class JointObserver:
    """Forward hooks on one joint-attention module; records after the module's processor returned.

    Parameters
    ----------
    module : diffusers Attention (SD3) or FluxAttention
    recorder : AttentionRecorder
    name : str
        Module path (``transformer_blocks.3.attn``, ``single_transformer_blocks.12.attn``).
    part : str
        The module's network part (its family's).
    family : JointFamily
    seq : _Sequence
        Text / image token counts of the current call (set by the transformer's pre-hook).
    """

    _PROJECTIONS = ("to_q", "to_k", "add_q_proj", "add_k_proj", "norm_q", "norm_k", "norm_added_q", "norm_added_k",
                    "to_qkv", "to_added_qkv")

    def __init__(self, module, recorder: AttentionRecorder, name: str, part: str, family: JointFamily,
                 seq: _Sequence):
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
        extra = self.recorder.extra
        if extra is not None and extra.options.output_similarity:  # the outputs before their projections
            outs = getattr(m, "to_out", None)
            for key, sub in (("out_image", outs[0] if isinstance(outs, torch.nn.ModuleList) else None),
                             ("out_text", getattr(m, "to_add_out", None))):
                if isinstance(sub, torch.nn.Module):
                    handles.append(sub.register_forward_pre_hook(_input(self.kept, key)))
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
        kept["__name__"] = self.name
        q, k, text, image, mask = self.family.joint_qk(self.module, kept, kwargs, self.seq.text, self.seq.image)
        # the processors call SDPA / dispatch_attention_fn without a scale: the default D ** -0.5
        self.recorder.record_joint(self.name, self.part, q, k, q.shape[1], text=text, image=image, mask=mask)
        extra = self.recorder.extra
        if extra is not None and extra.options.output_similarity:
            out = self.family.joint_out(self.module, kept, output, text, image)
            extra.record_output(self.recorder, self.name, self.part, out, text, image, mask=mask)
        return None


class JointTrace(DiffusersTrace):
    """Joint-attention tracing of a diffusers pipeline of a registered family (SD3, Flux and their img2img /
    inpaint variants). Use :func:`daam_core.trace`; the results are those of :class:`DiffusersTrace`.

    Text tokens: with ``family.clip_segment`` (SD3) the sequence is 77 CLIP positions (CLIP-L and CLIP-G side by
    side) followed by ``max_sequence_length`` T5 positions, and a word has positions in both segments; otherwise
    (Flux) the T5 tokens alone. Without true CFG Flux has no negative branch: asking for negative words is an error.
    """

    required = ("transformer", "tokenizer", "encode_prompt")

    def __init__(self, pipe, filter=None, keep_on_device: bool = False, refine=None):
        self.family = family_of(getattr(pipe, "transformer", None))
        if refine is not None and refine.unet_only:
            raise ValueError("self-attention and per-head sums are recorded for UNet pipelines only (SD1.x/2.x, "
                             "SDXL); this pipeline uses joint attention (output_similarity is recorded)")
        super().__init__(pipe, filter, keep_on_device, refine=refine)
        self._seq = _Sequence()

    @property
    def parts(self) -> tuple[str, ...]:
        return self.family.parts

    layer_kind = "joint-attention"

    def _observer(self, name: str, module):
        part = self.family.part_of(name, module)
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

    # -- prompts ----------------------------------------------------------------------------------
    def _layout_joint(self, text: str, t5_length: int, t5_text: str | None = None) -> TokenLayout:
        from ...text.layout import concat_layouts, zero_positions
        from ...text.sentencepiece import tokenize_t5

        t5_tok = getattr(self.pipe, self.family.t5_tokenizer)
        if t5_tok is None and self.family.clip_segment:  # SD3 loaded without T5: the pipeline's zero T5 vectors
            return concat_layouts([("clip", self._layout(text)), ("t5", zero_positions(t5_length, "t5"))],
                                  self.pipe.tokenizer)
        t5 = tokenize_t5(text if t5_text is None else t5_text, t5_tok, max_length=t5_length, syntax="plain")
        if not self.family.clip_segment:
            return t5
        return concat_layouts([("clip", self._layout(text)), ("t5", t5)], self.pipe.tokenizer)

    def _capture_prompts(self, args: dict, embeds=None) -> None:
        t5_length = int(args.get("max_sequence_length") or self.family.default_t5_length)
        prompt = args.get("prompt")
        second_call = self.family.negative_in_second_call
        if second_call and self._pending is not None and self._pending.get("negative_embeds") is None \
                and self._pending.get("awaiting_negative"):
            self._capture_negative(args, embeds, t5_length)
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
            if not second_call:  # the negative prompts come with the prompts (SD3: also its prompt_3)
                negatives = _as_list(args.get("negative_prompt"), n_prompts)
                if len(negatives) != n_prompts:
                    raise ValueError(f"{n_prompts} prompts but {len(negatives)} negative prompts")
                t5_pos = _as_list(args.get("prompt_3"), n_prompts) if args.get("prompt_3") is not None else prompts
                t5_neg = (_as_list(args.get("negative_prompt_3"), n_prompts)
                          if args.get("negative_prompt_3") is not None else negatives)
                layouts = ([self._layout_joint(p, t5_length, t) for p, t in zip(prompts, t5_pos)] +
                           [self._layout_joint(p, t5_length, t) for p, t in zip(negatives, t5_neg)])
                texts = prompts + negatives
            else:  # the negative prompt (Flux's true CFG) comes in a second encode_prompt call
                layouts = [self._layout_joint(p, t5_length) for p in prompts]
                layouts += [self._layout_joint("", t5_length) for _ in prompts]  # replaced by a negative prompt
                texts = prompts + [""] * n_prompts
        n_images = n_prompts * n_img
        cfg = False if second_call else bool(args.get("do_classifier_free_guidance", True))
        streams = cfg_streams(n_images, [i // n_img for i in range(n_images)], n_prompts)
        self._pending = dict(layouts=layouts, cfg=cfg, n_images=n_images, n_prompts=n_prompts, all_streams=streams,
                             streams=streams if cfg else streams[:n_images], texts=texts,
                             rows=tuple(cfg_rows(n_images, cfg)), positive_embeds=embeds, negative_embeds=None,
                             awaiting_negative=second_call)

    def _capture_negative(self, args: dict, embeds, t5_length: int) -> None:
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
            grid = self.family.grid(module, hidden, kwargs)
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
        if self.family.negative_in_second_call:  # each branch has its own calls: which one is it
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
        """The family's: SD3 passes the scheduler's timestep (0..1000), Flux the sigma (timestep / 1000)."""
        return self.family.timestep_scale
