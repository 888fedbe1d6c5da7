"""Masks, metrics and rendering against hand-computed values."""

import numpy as np
import pytest
import torch

from daam_core.engine import masks, metrics, render


def box(h, w, top, left, bottom, right):
    m = torch.zeros(h, w)
    m[top:bottom, left:right] = 1
    return m


def test_threshold_modes():
    m = torch.tensor([[0.0, 0.1, 0.5], [0.39, 0.4, 1.0]])
    rel = masks.threshold(m * 2, 0.4, "relative")  # 40% of the max (2.0) = 0.8
    assert rel.tolist() == [[0, 0, 1], [0, 1, 1]]
    assert masks.threshold(m, 0.45, "absolute").tolist() == [[0, 0, 1], [0, 0, 1]]
    assert masks.threshold(torch.zeros(2, 2), 0.4).sum() == 0  # an all-zero map gives an empty mask
    bimodal = torch.cat([torch.full((50,), 0.1), torch.full((50,), 0.9)]).view(10, 10)
    otsu = masks.threshold(bimodal, mode="otsu")
    assert otsu.sum() == 50 and otsu.view(-1)[50:].sum() == 50
    with pytest.raises(ValueError, match="threshold mode"):
        masks.threshold(m, 0.4, "median")


def test_grow_shrink_open_close_feather():
    m = box(20, 20, 5, 5, 15, 15)  # 10x10 square
    grown = masks.grow(m, 2)
    assert grown.sum() > m.sum() and grown[3, 10] == 1 and grown[2, 10] == 0
    shrunk = masks.grow(m, -2)
    assert shrunk.sum() == 36  # 6x6 left after eroding 2 px with a disk on a square's straight edges
    speck = m.clone()
    speck[0, 0] = 1
    opened = masks.open_close(speck, open_px=1)
    assert opened[0, 0] == 0 and opened[10, 10] == 1
    holed = m.clone()
    holed[10, 10] = 0
    assert masks.open_close(holed, close_px=1)[10, 10] == 1
    soft = masks.feather(m, 3)
    assert 0 < soft[5, 10] < 1 and soft[10, 10] == pytest.approx(1.0, abs=1e-3) and soft.max() <= 1


def test_set_operations():
    a = box(4, 4, 0, 0, 2, 4)
    b = box(4, 4, 1, 0, 3, 4)
    assert masks.combine([a, b], "union").sum() == 12
    assert masks.combine([a, b], "intersection").sum() == 4
    diff = masks.combine([a, b], "difference")
    assert diff.sum() == 4 and diff[0].sum() == 4
    with pytest.raises(ValueError, match="different shapes"):
        masks.combine([a, torch.zeros(3, 3)])


def test_iou_miou_miod_mioh():
    head = box(10, 10, 0, 0, 10, 5)  # 50 px
    dep = box(10, 10, 0, 0, 4, 10)  # 40 px, 20 px inside head
    assert metrics.iou(head, dep) == pytest.approx(20 / 70)
    assert metrics.iod(head, dep) == pytest.approx(20 / 40)
    assert metrics.ioh(head, dep) == pytest.approx(20 / 50)
    rel = metrics.head_dependent_overlap([(head, dep), (head, head)])
    assert rel == pytest.approx({"miou": (20 / 70 + 1) / 2, "miod": (0.5 + 1) / 2, "mioh": (0.4 + 1) / 2})
    assert metrics.mean_iou([(head, head), (head, torch.zeros(10, 10))]) == pytest.approx(0.5)
    assert metrics.soft_iou(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0])) == pytest.approx(3 / 4)
    x = torch.arange(10.0)
    assert metrics.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert metrics.pearson(x, -x) == pytest.approx(-1.0)


def test_rendering_colours_and_grid():
    heat = torch.zeros(8, 8)
    heat[:, 4:] = 1
    rgb = render.colorize(heat, "jet")
    assert rgb.shape == (8, 8, 3)
    assert rgb[0, 0, 2] > 0.4 and rgb[0, 0, 0] < 0.1  # jet: cold is blue
    assert rgb[0, 7, 0] > 0.4 and rgb[0, 7, 2] < 0.1  # hot is red
    img = np.full((8, 8, 3), 0.5, np.float32)
    over = render.overlay(img, heat, alpha=0.0)
    np.testing.assert_allclose(over, img)
    over = render.overlay(img, heat, alpha=1.0, weighted=True)
    np.testing.assert_allclose(over[:, :4], img[:, :4])  # zero heat leaves the image untouched
    g = render.grid([img, over, img], labels=["a", "b", "c"], columns=2, gap=2)
    assert g.shape == (18, 18, 3)
    big = render.grid([img, over], min_side=20, gap=0)  # 8 px tiles enlarged 3x (nearest), side by side
    assert big.shape == (24, 48, 3)
    np.testing.assert_array_equal(big[-6:, 24:], over.repeat(3, 0).repeat(3, 1)[-6:])  # below any label band
    with pytest.raises(ValueError, match="colour map"):
        render.colorize(heat, "rainbow-unicorn")


def test_threshold_levels_equal_every_threshold_in_one_pass():
    """The preview's levels: ``levels > i`` is the relative mask at ``i / steps`` bit for bit (ties, zeros and an
    all-zero map included), computed in one pass instead of one threshold per step."""
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(3, 2, 17, 23, generator=g)
    maps[0, 0] = torch.round(maps[0, 0] * 10) / 10  # many values exactly on thresholds
    maps[1, 1] = 0  # peak 0: every mask empty
    maps[2, 0, :5] = maps[2, 0].max()  # ties at the peak
    for steps in (100, 7):
        levels = masks.threshold_levels(maps, steps)
        assert levels.dtype == torch.uint8 and levels.shape == maps.shape
        for i in range(steps + 1):
            for idx in np.ndindex(*maps.shape[:2]):  # the paper's rule, one map at a time
                m = maps[idx]
                peak = m.max()
                expected = (m >= (i / steps) * peak) & (peak > 0)
                assert torch.equal(levels[idx] > i, expected), (steps, i, idx)
            assert torch.equal(levels > i, masks.threshold(maps, i / steps, "relative").bool())
    assert int(masks.threshold_levels(maps, 100)[1, 1].max()) == 0
    with pytest.raises(ValueError, match="steps must be in 1..254"):
        masks.threshold_levels(maps, 300)
