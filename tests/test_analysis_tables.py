"""The relation table, entanglement and shapes scores against hand-computed numbers on planted maps.

A planted trace has one layer at image size whose running sum for token position ``p`` is a chosen 0/1 rectangle,
so each token's normalised map is that rectangle exactly and thresholding at 0.4 gives it back.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from daam_core.analysis.entanglement import (adjective_spread, article, cohyponym_prompts, cohyponym_summary,
                                             map_overlap, match_objects, shape_similarity)
from daam_core.analysis.relations import pair_stats, relation_pairs, relation_table
from daam_core.analysis.shapes_truth import objects_in_prompt, score_item
from daam_core.analysis.syntax import ParsedPrompt, SyntaxToken
from daam_core import AttentionTrace, LayerInfo, Stream, TokenLayout, Word

H = W = 10


def rect(y0, y1, x0, x1) -> torch.Tensor:
    m = torch.zeros(H, W)
    m[y0:y1, x0:x1] = 1
    return m


def planted_trace(words: list[str], planted: dict[int, torch.Tensor], hw: tuple[int, int] = (H, W)) -> AttentionTrace:
    """A trace of ``words`` (position i + 1 = word i, BOS at 0, EOS after) whose position p's map is planted[p]."""
    n = len(words) + 2
    word_of = [-1] + list(range(len(words))) + [-1]
    layout = TokenLayout(tuple(range(n)), (1.0,) * n, tuple(["<|startoftext|>"] + [f"{w}</w>" for w in words]
                                                            + ["<|endoftext|>"]), tuple(word_of),
                         tuple(Word(w, i, (i + 1,), 1.0) for i, w in enumerate(words)), n)
    sums = torch.full((1, hw[0] * hw[1], n), 0.01)  # BOS/EOS: flat
    for p, m in planted.items():
        sums[0, :, p] = m.flatten() * 3.0  # as if summed over 3 calls
    layer = LayerInfo(name="planted", part="up", order=0, factor=1, hw=hw, heads=1)
    return AttentionTrace(sums={"planted": sums}, layers={"planted": layer}, calls={"planted": 3},
                          streams=[Stream(0, "cond", 0)], layouts=[layout], latent_hw=hw, image_hw=hw)


def test_pair_stats_by_hand():
    head, dep = rect(0, 4, 0, 5), rect(2, 6, 0, 5)  # 20 px each, overlap rows 2-3: 10 px, union 30
    s = pair_stats(head, dep)
    assert s == {"iou": pytest.approx(10 / 30), "iod": pytest.approx(10 / 20), "ioh": pytest.approx(10 / 20)}
    small = rect(0, 2, 0, 2)  # 4 px inside the head
    s = pair_stats(head, small)
    assert s == {"iou": pytest.approx(4 / 20), "iod": 1.0, "ioh": pytest.approx(4 / 20)}


def tok(i, text, dep, head, pos="NOUN"):
    return SyntaxToken(i, text, 0, len(text), dep, head, pos, i, (i + 1,))


def test_relation_pairs_and_table_on_planted_maps():
    # "a red dog ." : det(dog, a), amod(dog, red), punct(dog, .)
    words = ["a", "red", "dog", "."]
    planted = {1: rect(0, 10, 0, 9), 2: rect(0, 10, 0, 5), 3: rect(0, 4, 0, 4), 4: rect(8, 10, 8, 10)}
    tr = planted_trace(words, planted)
    parsed = ParsedPrompt("a red dog .", [tok(0, "a", "det", 2, "DET"), tok(1, "red", "amod", 2, "ADJ"),
                                          tok(2, "dog", "ROOT", 2), tok(3, ".", "punct", 2, "PUNCT")])
    rows = relation_pairs(parsed, tr, 0, tau=0.4)
    got = {(r["kind"], r["head"], r["dependent"]): (r["iou"], r["iod"], r["ioh"]) for r in rows}
    # hand-computed from the rectangles: a = 90 px, red = 50 px (inside a), dog = 16 px (inside both), . = 4 px
    # (a constant map would normalise to zero: no rectangle covers the whole image)
    expect = {("related", "dog", "a"): (16 / 90, 16 / 90, 1.0),
              ("related", "dog", "red"): (16 / 50, 16 / 50, 1.0),
              ("related", "dog", "."): (0.0, 0.0, 0.0),
              ("unrelated", "a", "red"): (50 / 90, 50 / 50, 50 / 90)}
    assert set(got) == set(expect)  # "." is in no unrelated pair; a-dog and red-dog are related
    for k, v in expect.items():
        assert got[k] == pytest.approx(v, abs=1e-6), k

    # a second prompt: dog is rows 0-2 over all columns (30 px), 15 of them inside red (50 px)
    tr2 = planted_trace(words, {**planted, 3: rect(0, 3, 0, 10)})
    rows2 = relation_pairs(parsed, tr2, 0, tau=0.4)
    table = {r["group"]: r for r in relation_table(rows + rows2)}
    amod = [(16 / 50, 16 / 50, 1.0), (15 / 65, 15 / 50, 15 / 30)]  # (IoU, over red, over dog)
    assert table["amod"]["pairs"] == 2
    assert table["amod"]["miou"] == pytest.approx(sum(a[0] for a in amod) / 2)
    assert table["amod"]["miod"] == pytest.approx(sum(a[1] for a in amod) / 2)
    assert table["amod"]["mioh"] == pytest.approx(sum(a[2] for a in amod) / 2)
    assert table["amod"]["delta"] == pytest.approx(table["amod"]["mioh"] - table["amod"]["miod"])
    related = [r for r in rows + rows2 if r["kind"] == "related"]
    assert table["all related"]["pairs"] == 6
    assert table["all related"]["miou"] == pytest.approx(sum(r["iou"] for r in related) / 6)
    assert table["unrelated"]["pairs"] == 2
    assert [r["group"] for r in relation_table(rows + rows2)][:2] == ["unrelated", "all related"]


def test_entanglement_functions_by_hand():
    assert cohyponym_prompts([("giraffe", "zebra"), ("owl", "apple")]) == ["a giraffe and a zebra",
                                                                           "an owl and an apple"]
    assert article("elephant") == "an" and article("zebra") == "a"
    a, b = rect(0, 5, 0, 10), rect(3, 10, 0, 10)  # 50 and 70 px, 20 shared
    assert map_overlap(a, b) == pytest.approx(20 / 100)
    assert adjective_spread(b, a) == pytest.approx(50 / 70)
    assert adjective_spread(a, torch.ones(H, W)) == 0.0
    with pytest.raises(ValueError, match="empty"):
        adjective_spread(torch.zeros(H, W), a)
    assert shape_similarity("circle", "circle") == 1.0
    assert shape_similarity("circle", "square") == pytest.approx(math.pi / 4, abs=0.02)  # disc inside its square
    assert shape_similarity("triangle", "square") == pytest.approx(0.5, abs=0.03)
    rows = [{"group": "g", "overlap": 0.2, "both_present": True}, {"group": "g", "overlap": 0.6, "both_present": False}]
    assert cohyponym_summary(rows) == [{"group": "g", "prompts": 2, "overlap": pytest.approx(0.4),
                                        "both_present": 0.5}]


def test_match_objects_uses_each_detection_once():
    found = [("red", "circle", None), ("blue", "circle", None), ("green", "square", None)]
    assert match_objects([{"color": "blue", "shape": "circle"}, {"color": None, "shape": "circle"}], found) == [1, 0]
    assert match_objects([{"color": None, "shape": "triangle"}, {"color": "green", "shape": "square"}], found) == \
        [None, 2]


def test_score_item_on_a_rendered_scene():
    """The image is a rendered scene; noun maps are planted on the objects (one shifted), colour maps wide."""
    from daam_core.shapes import scenes

    hw = (H * 4, W * 4)
    red = scenes.SceneObject("red", "square", (10.0, 10.0), 12.0, scenes.shape_mask("square", (10, 10), 12, hw))
    blue = scenes.SceneObject("blue", "circle", (28.0, 28.0), 14.0, scenes.shape_mask("circle", (28, 28), 14, hw))
    image = scenes.render([red, blue], (235, 235, 235), hw)
    prompt = "a red square and a blue circle"
    objects = objects_in_prompt(prompt)
    assert objects == [{"color": "red", "shape": "square"}, {"color": "blue", "shape": "circle"}]
    shifted = torch.from_numpy(np.roll(blue.mask, 3, axis=1)).float()
    wide = torch.ones(hw)
    wide[-1] = 0  # all but the last row (a constant map would normalise to zero)
    planted = {2: wide, 3: torch.from_numpy(red.mask).float(), 6: wide, 7: shifted}
    out = score_item(planted_trace(prompt.split(), planted, hw), image, objects, tau=0.4)
    found = {c: m for c, _, m in scenes.detect_objects(image)}
    assert (found["red"] == red.mask).all() and (found["blue"] == blue.mask).all()  # detection is exact here
    r, b = out["objects"]
    assert out["drawn_right"] and out["both_present"]
    assert r["noun_iou"] == 1.0
    inter = (shifted.numpy().astype(bool) & blue.mask).sum()
    union = (shifted.numpy().astype(bool) | blue.mask).sum()
    assert b["noun_iou"] == pytest.approx(inter / union)
    assert r["color_iou"] == pytest.approx(red.mask.sum() / wide.sum().item())  # "red" covers the square and more
    assert r["spread"] == pytest.approx(1 - red.mask.sum() / wide.sum().item())
    assert r["noun_wrong_iou"] == 0.0
    assert out["noun_overlap"] == 0.0
    assert out["similarity"] == pytest.approx(shape_similarity("square", "circle"))
