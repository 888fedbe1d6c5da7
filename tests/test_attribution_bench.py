"""bench/attribution.py on the shipped shapes model, at small scale: the maps point at the right objects."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from daam_core import shapes_model  # noqa: E402


@pytest.mark.skipif(not shapes_model.available(), reason="no shapes model shipped")
def test_attribution_on_the_shipped_model(capsys):
    import attribution

    assert attribution.main(["--scenes", "8", "--generated", "4", "--steps", "12", "--quick"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    real, base, gen = result["real"], result["baselines"], result["generated"]
    assert set(real) >= {"noun_1", "noun_2", "noun_2_wrong", "color_1", "color_2"}
    assert real["noun_1"] > 0.6 and real["noun_1"] > 3 * base["whole"]  # 48 scenes: 0.73 vs 0.12
    assert real["noun_2"] > 0.45 and real["noun_2"] > 3 * real["noun_2_wrong"]
    assert gen["correct_fraction"] >= 0.5  # 48 prompts: 95%
    hd = result["head_dependent"]
    assert 0 <= hd["miou"] <= min(hd["miod"], hd["mioh"]) <= 1
