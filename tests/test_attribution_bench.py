"""bench/attribution.py on the shipped shapes model, at small scale: the maps point at the right objects."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from daam_core.shapes import dit as shapes_dit, model as shapes_model  # noqa: E402


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


@pytest.mark.skipif(not shapes_model.available(), reason="no shapes model shipped")
def test_refinement_comparison_at_small_scale(capsys):
    """``--refine`` scores every variant on the same traces; competing nouns take the spill off the other object
    (three seeds of 32 + 32: wrong-object IoU 0.185 -> 0.002, docs/benchmarks.md)."""
    import attribution

    assert attribution.main(["--refine", "--scenes", "4", "--generated", "6", "--steps", "12", "--seeds", "1234"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for kind in ("real", "generated"):
        rows = result["summary"][kind]
        assert set(rows) == set(attribution.REFINE_VARIANTS)
        for name, row in rows.items():
            assert all(0.0 <= v["min"] <= v["mean"] <= v["max"] <= 1.0 for v in row.values()), (kind, name)
        if "noun_2_wrong" in rows["plain"]:
            spill = rows["finest:2+heads:4"]["noun_2_wrong"]["mean"]
            kept = rows["finest:2+heads:4+exclusive"]["noun_2_wrong"]["mean"]
            assert kept <= spill and kept <= 0.05, (kind, kept, spill)
        # the noun maps of one object do not depend on exclusivity: there is nothing to compete with
        assert rows["finest:2+heads:4"]["noun_1"] == rows["finest:2+heads:4+exclusive"]["noun_1"]


@pytest.mark.skipif(not shapes_dit.available(), reason="no joint-attention shapes model shipped")
def test_joint_attention_model_compares_attention_and_output_similarity(capsys):
    """``--refine --dit``: the joint-attention shapes model traced with output-similarity sums; on rendered scenes
    both kinds of map find the named object far better than the whole image does, and competing nouns take the
    spill off the other object."""
    import attribution

    assert attribution.main(["--refine", "--dit", "--scenes", "4", "--generated", "2", "--steps", "12",
                             "--seeds", "1234"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == "shapes DiT"
    rows = result["summary"]["real"]
    assert set(rows) == set(attribution.DIT_VARIANTS) == set(result["summary"]["generated"])
    whole = rows["plain"]["whole_1"]["mean"]
    for name in ("plain", "output"):
        assert rows[name]["noun_1"]["mean"] > 3 * whole, (name, rows[name]["noun_1"], whole)
    for name in ("plain", "output"):
        assert rows[f"{name}+exclusive" if name == "output" else "exclusive"]["noun_2_wrong"]["mean"] <= \
            rows[name]["noun_2_wrong"]["mean"]


@pytest.mark.skipif(not shapes_model.available(), reason="no shapes model shipped")
def test_shipped_schedule_draws_where_the_full_cosine_schedule_fails():
    """The first 956 cosine steps (sigma_max 14.6) draw the prompts; all 1000 (sigma_max 2e4) draw noise."""
    import numpy as np
    import torch
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from daam_core.shapes import scenes

    pipe = shapes_model.load_shapes_pipeline()
    prompts = {"a red circle": {"red": "circle"}, "a blue square on the left": {"blue": "square"},
               "a yellow square and a red triangle": {"yellow": "square", "red": "triangle"}}

    def drawn_right(scheduler) -> int:
        pipe.scheduler = scheduler
        right = 0
        for i, (prompt, want) in enumerate(prompts.items()):
            img = pipe(prompt, num_inference_steps=20, guidance_scale=4.0, output_type="np",
                       generator=torch.Generator().manual_seed(i)).images[0]
            found = {c: s for c, s, _ in scenes.detect_objects((np.clip(img, 0, 1) * 255).round().astype(np.uint8))}
            right += found == want
        return right

    for cls in (EulerDiscreteScheduler, DPMSolverMultistepScheduler):
        assert drawn_right(cls(**shapes_model.SCHEDULER_CONFIG)) == len(prompts), cls.__name__
        assert drawn_right(cls(**shapes_model.TRAINING_SCHEDULER_CONFIG)) == 0, cls.__name__
