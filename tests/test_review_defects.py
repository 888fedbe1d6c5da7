"""Defects found in review (issue 15, item 2 d-i), each against the real host or an explicit reference."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from daam_core.engine.recorder import AttentionRecorder, RecordFilter
from daam_core.hosts.contract import cfg_rows, cfg_streams
from daam_core.engine.trace import AttentionTrace
from daam_core.text.layout import TokenLayout, Word


# -- d: bad filters are errors at creation, not silent zeros ----------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(factors=(3,)), "powers of two"),
    (dict(factors=()), "powers of two"),
    (dict(heads=()), "head list is empty"),
    (dict(heads=(-1,)), ">= 0"),
    (dict(parts=()), "non-empty list of part names"),
    (dict(branches=()), "no branch"),
])
def test_bad_record_filters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecordFilter(**kwargs)


def test_parts_the_model_does_not_have_are_refused_when_sampling_begins():
    """The filter does not know model families; the adapter's grid declares the model's parts."""
    from daam_core.engine.geometry import PatchGrid, UNetGrid

    with pytest.raises(ValueError, match=r"unknown network parts \['sideways'\]: this model's parts are \['down', 'mid', 'up'\]"):
        AttentionRecorder(RecordFilter(parts=("sideways",))).begin(UNetGrid((4, 4)), cfg_streams(1, [0], 1), [5, 5])
    with pytest.raises(ValueError, match=r"unknown network parts \['down'\]: this model's parts are \['joint'\]"):
        AttentionRecorder(RecordFilter(blocks=(("down", 0, 1),))).begin(
            PatchGrid((4, 4), 2, ("joint",)), cfg_streams(1, [0], 1), [5, 5])
    AttentionRecorder(RecordFilter(parts=("double",))).begin(PatchGrid((4, 4), 2, ("double", "single")),
                                                                  cfg_streams(1, [0], 1), [5, 5])


def test_heads_past_a_layers_head_count_are_an_error_naming_the_layer():
    rec = AttentionRecorder(RecordFilter(heads=(0, 99)))
    rec.begin((4, 4), cfg_streams(1, [0], 1), [5, 5])
    rec.set_call(cfg_rows(1, True), progress=0.0)
    with pytest.raises(ValueError, match=r"heads \[99\] do not exist: layer down\.0 has 2 heads"):
        rec.record("down.0", "down", torch.randn(2, 16, 8), torch.randn(2, 5, 8), 2)


def _layout(words: list[str]) -> TokenLayout:
    """BOS, one token per word, EOS (no tokenizer: queries match decoded pieces)."""
    n = len(words) + 2
    pieces = ("<|startoftext|>",) + tuple(f"{w}</w>" for w in words) + ("<|endoftext|>",)
    return TokenLayout(tuple(range(n)), (1.0,) * n, pieces, (-1,) + tuple(range(len(words))) + (-1,),
                       tuple(Word(w, i, (i + 1,), 1.0) for i, w in enumerate(words)), n)


def test_negative_maps_of_an_unrecorded_negative_branch_are_an_error():
    rec = AttentionRecorder(RecordFilter(branches=("cond",)))
    rec.begin((4, 4), cfg_streams(1, [0], 1), [5, 5])
    rec.set_call(cfg_rows(1, True), progress=0.0)
    rec.record("down.0", "down", torch.randn(2, 16, 8), torch.randn(2, 5, 8), 2)
    trace = AttentionTrace.from_recorder(rec.finish(), [_layout(["cat", "dog", "sofa"]), _layout(["blurry", "dark", "noisy"])], (4, 4))
    assert trace.word_maps("cat", image=0).shape == (1, 4, 4)
    with pytest.raises(ValueError, match="negative branch was not recorded"):
        trace.word_maps("blurry", image=0, branch="uncond")


# -- e: head selection does not copy host data to the device on every call ------------------------------------------

def test_head_selection_makes_no_fresh_tensor_on_the_hot_path():
    rec = AttentionRecorder(RecordFilter(heads=(0, 2)))
    rec.begin((4, 4), cfg_streams(1, [0], 1), [5, 5])
    q, k = torch.randn(2, 16, 3 * 8), torch.randn(2, 5, 3 * 8)
    rec.set_call(cfg_rows(1, True), progress=0.0)
    rec.record("mid", "mid", q, k, 3)  # first call: indices are built and cached
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        rec.set_call(cfg_rows(1, True), progress=0.0)
        rec.record("mid", "mid", q, k, 3)
    names = {e.name for e in prof.events()}
    assert "aten::lift_fresh" not in names, "a tensor was made from Python data during a recorded call"
    assert rec.finish().calls["mid"] == 2


# -- f: the error for embeddings without text names a function that exists --------------------------------------------

def test_prompt_embeds_without_text_error_names_the_real_helper(clip_tokenizer_dir, monkeypatch):
    monkeypatch.setenv("DAAM_CLIP_TOKENIZER_DIR", str(clip_tokenizer_dir))
    from daam_core import trace
    from helpers.tiny_pipelines import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    embeds = pipe.encode_prompt("a cat", "cpu", 1, True, "")  # (positive, negative) embeddings
    with trace(pipe) as tc, pytest.raises(ValueError, match=r"tc\.encode_prompt\(prompt, negative_prompt\)") as err:
        pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], num_inference_steps=1, output_type="np")
    assert hasattr(tc, "encode_prompt") and "daam_core.encode_prompt" not in str(err.value)
