"""The synthetic scenes behind the shapes model: masks, captions and the colour/shape detector."""

from __future__ import annotations

import numpy as np
import pytest

from daam_core.shapes import scenes


def test_shape_masks_have_the_expected_areas():
    hw = (64, 64)
    size = 20.0
    areas = {s: scenes.shape_mask(s, (32, 32), size, hw).sum() for s in scenes.SHAPES}
    assert areas["square"] == pytest.approx(size * size, rel=0.12)
    assert areas["circle"] == pytest.approx(np.pi * (size / 2) ** 2, rel=0.05)
    assert areas["triangle"] == pytest.approx(size * size / 2, rel=0.1)
    tri = scenes.shape_mask("triangle", (32, 32), size, hw)
    rows = tri.sum(1)[tri.any(1)]
    assert rows[0] < rows[-1]  # apex up


def test_random_scenes_match_their_captions_and_masks():
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = scenes.random_scene(rng)
        assert s.image.shape == (32, 32, 3) and s.image.dtype == np.uint8
        assert 1 <= len(s.objects) <= 2
        for o in s.objects:
            assert f"{o.color} {o.shape}" in s.caption
            assert o.mask.sum() > 20
            assert (s.image[o.mask] == scenes.COLORS[o.color]).all()  # the mask is exactly the painted pixels
        if len(s.objects) == 2:
            a, b = s.objects
            assert not (a.mask & b.mask).any() and a.color != b.color and a.shape != b.shape
            for o in (a, b):  # position words, when present, are true
                side = scenes.side_of(o.center[1], 32)
                if " on the " in s.caption:
                    assert f"{o.color} {o.shape} on the {side}" in s.caption
        assert s.mask_of(s.objects[0].shape).sum() == s.objects[0].mask.sum()
    with pytest.raises(KeyError, match="zebra"):
        s.mask_of("zebra")


def test_held_out_pairs_are_recognised():
    rng = np.random.default_rng(1)
    c1, s1, c2, s2 = scenes.held_out_prompts()[0]
    s = scenes.random_scene(rng, n_objects=2, colors=(c1, c2), shapes=(s1, s2))
    assert scenes.is_held_out(s)
    assert not scenes.is_held_out(scenes.random_scene(rng, n_objects=1))


def test_detector_reads_rendered_scenes_back():
    rng = np.random.default_rng(2)
    right = 0
    for _ in range(100):
        s = scenes.random_scene(rng)
        found = {c: (shape, m) for c, shape, m in scenes.detect_objects(s.image)}
        assert set(found) == {o.color for o in s.objects}
        right += all(found[o.color][0] == o.shape and (found[o.color][1] == o.mask).all() for o in s.objects)
    assert right >= 90  # shape from fill ratio: small triangles and circles can be confused at 32 px
