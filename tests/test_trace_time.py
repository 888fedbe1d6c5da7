"""Time sums travel with the trace: ``AttentionTrace`` keeps them, saves and loads them; old files still load."""

from __future__ import annotations

import json

import pytest
import torch

from daam_core.engine.io import TraceFormatError, write_trace_file
from daam_core.engine.recorder import AttentionRecorder, RecordFilter
from daam_core.hosts.contract import cfg_rows, cfg_streams
from daam_core.engine.schedule import Moment
from daam_core.engine.trace import AttentionTrace, load_trace, save_trace
from daam_core.text.tokenize import tokenize

TOKENS = 77
LAYOUT = None


@pytest.fixture(autouse=True, scope="module")
def layout(clip_tokenizer):
    global LAYOUT
    LAYOUT = tokenize("a cat and a dog", clip_tokenizer)
    assert LAYOUT.length == TOKENS


def record(steps, buckets, keep=None, seed=0, latent=(4, 8)):
    """Record ``steps`` calls of two layers; ``keep``: the steps to record (default all)."""
    torch.manual_seed(seed)
    rec = AttentionRecorder(RecordFilter(time_buckets=buckets))
    rec.begin(latent, cfg_streams(1, [0], 1), [TOKENS, TOKENS])
    for i in range(steps):
        q = {n: torch.randn(2, latent[0] * latent[1] // f, 16) for n, f in (("down.0", 1), ("up.0", 4))}
        k = torch.randn(2, TOKENS, 16)
        rec.set_call(cfg_rows(1, cfg=True), Moment(i, steps, keep is None or i in keep))
        rec.record("down.0", "down", q["down.0"], k, 2)
        rec.record("up.0", "up", q["up.0"], k, 2)
    return AttentionTrace.from_recorder(rec.finish(), [LAYOUT, LAYOUT], (16, 32))


def test_a_time_bucket_is_the_trace_of_its_own_steps():
    timed = record(8, 4)
    assert timed.time_buckets == 4 and timed.time_calls == {"down.0": [2] * 4, "up.0": [2] * 4}
    for b in range(4):
        alone = record(8, 1, keep={2 * b, 2 * b + 1})  # the same calls, only the bucket's steps recorded
        part = timed.at_time(b)
        for name in alone.sums:
            torch.testing.assert_close(part.sums[name], alone.sums[name], atol=1e-6, rtol=0)
        assert part.calls == alone.calls
        torch.testing.assert_close(part.word_maps(["cat", "dog"]), alone.word_maps(["cat", "dog"]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="time bucket 4 does not exist: this trace has 4 buckets"):
        timed.at_time(4)


def test_time_sums_are_saved_and_loaded(tmp_path):
    timed = record(8, 4)
    path = save_trace(timed, tmp_path / "timed")
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["time_calls"] == {"down.0": [2] * 4, "up.0": [2] * 4}
    loaded = load_trace(path)
    assert loaded.time_calls == timed.time_calls and loaded.time_buckets == 4
    for name in timed.time_sums:
        assert torch.equal(loaded.time_sums[name], timed.time_sums[name])
    assert torch.equal(loaded.at_time(3).word_maps("dog"), timed.at_time(3).word_maps("dog"))


def test_a_trace_file_of_the_old_format_still_loads(tmp_path):
    """The file exactly as the save_trace of 0.2 wrote it: no time sums, no time calls."""
    plain = record(4, 1)
    names = ["down.0", "up.0"]
    meta = {"layers": [{"name": n, "part": plain.layers[n].part, "kind": plain.layers[n].kind,
                        "order": plain.layers[n].order, "factor": plain.layers[n].factor,
                        "hw": list(plain.layers[n].hw), "heads": plain.layers[n].heads} for n in names],
            "calls": dict(plain.calls), "streams": [{"image": s.image, "branch": s.branch, "prompt": s.prompt}
                                                   for s in plain.streams],
            "layouts": [LAYOUT.to_dict(), LAYOUT.to_dict()], "latent_hw": [4, 8], "image_hw": [16, 32],
            "recorded_branches": ["cond", "uncond"], "meta": {}, "warnings": []}
    path = write_trace_file(tmp_path / "old", {f"sums/{i}": plain.sums[n] for i, n in enumerate(names)}, meta)
    loaded = load_trace(path)
    assert loaded.time_sums == {} and loaded.time_calls == {} and loaded.time_buckets == 1
    assert torch.equal(loaded.word_maps("cat"), plain.word_maps("cat"))
    with pytest.raises(ValueError, match="traced without time buckets"):
        loaded.at_time(0)


def test_metadata_without_layers_is_a_format_error(tmp_path):
    path = write_trace_file(tmp_path / "broken", {"sums/0": torch.zeros(1, 2, 3)}, {"calls": {}})
    with pytest.raises(TraceFormatError, match="lacks 'layers', 'streams', 'layouts', 'latent_hw', 'image_hw'"):
        load_trace(path)


def test_a_nul_byte_in_the_file_name_is_named(tmp_path):
    with pytest.raises(TraceFormatError, match="contains a NUL byte"):
        save_trace(record(2, 1), tmp_path / "a\x00b")
    with pytest.raises(TraceFormatError, match="contains a NUL byte"):
        load_trace(str(tmp_path / "a\x00b.safetensors"))
