"""NaN or infinity from the model is a clear error naming where it was, never a black or blank picture."""

import numpy as np
import pytest
import torch

from daam_core.engine import render
from daam_core.engine.geometry import UNetGrid
from daam_core.engine.recorder import AttentionRecorder
from daam_core.hosts.contract import cfg_rows, cfg_streams
from daam_core.engine.trace import AttentionTrace, NonFiniteAttentionError


def test_recorded_nan_names_only_the_layers_that_hold_it():
    torch.manual_seed(0)
    rec = AttentionRecorder()
    rec.begin(UNetGrid((4, 4)), cfg_streams(1, [0], 1), [5, 5])
    rec.set_call(cfg_rows(1, cfg=True), progress=0.5)
    q, k = torch.randn(2, 16, 8), torch.randn(2, 5, 8)
    rec.record("input.1.0", "down", q, k, heads=2)
    q_bad = q.clone()
    q_bad[1, 3, 0] = float("nan")  # one query of the cond row
    rec.record("middle.0.0", "mid", q_bad, k, heads=2)
    recorded = rec.finish()
    with pytest.raises(NonFiniteAttentionError, match=r"layer\(s\) middle\.0\.0 holds NaN") as err:
        AttentionTrace.from_recorder(recorded, [], (32, 32))  # checked before anything reads the layouts
    assert "input.1.0" not in str(err.value)


def test_rendering_refuses_nan_instead_of_casting_it_to_black():
    heat = np.full((4, 4), 0.5, np.float32)
    heat[1, 2] = np.nan
    with pytest.raises(ValueError, match="heat map has 1 NaN/infinite values of 16"):
        render.colorize(heat)
    with pytest.raises(ValueError, match="image has 1 NaN/infinite values"):
        render.to_uint8(heat)
    assert render.to_uint8(np.nan_to_num(heat)).dtype == np.uint8  # finite input still converts
