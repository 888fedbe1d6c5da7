"""The Forge section's options as the UI and ``alwayson_scripts`` give them (no Forge needed)."""

from __future__ import annotations

import pytest

from daam_core.hosts.forge.extension import ARG_NAMES, DEFAULTS, OptionError, Options
from daam_core.hosts.forge.session import distinct
from daam_core.text.layout import TokenLayout


def test_defaults_and_order():
    assert ARG_NAMES[0] == "enabled" and len(ARG_NAMES) == len(DEFAULTS) == 10
    o = Options.parse([])
    assert not o.enabled and o.factors == (1, 2, 4, 8) and o.threshold == 0.4 and o.hires_pass == "hires"


def test_api_values_strings_and_lists():
    o = Options.parse([True, "dog, red car,", ["blurry"], 0.5, "1/16,1/32", 0.2, 0.8, "both", "masks"])
    assert o.words == ["dog", "red car"] and o.negative_words == ["blurry"]
    assert o.factors == (2, 4) and (o.start, o.end) == (0.2, 0.8) and o.outputs == ("masks",)
    f = o.record_filter()
    assert f.factors == (2, 4) and f.branches == ("cond", "uncond") and (f.start, f.end) == (0.2, 0.8)
    assert Options.parse([True, "dog"]).record_filter().branches == ("cond",)  # no negative words: no uncond sums


@pytest.mark.parametrize("args, message", [
    ([True, ""], "no words are given"),
    ([True, "dog", "", 1.5], "threshold must be in [0, 1]"),
    ([True, "dog", "", 0.4, ["1/8", "1/12"]], "resolutions must be a non-empty subset"),
    ([True, "dog", "", 0.4, []], "resolutions must be a non-empty subset"),
    ([True, "dog", "", 0.4, ["1/8"], 0.9, 0.1], "0 <= start <= end <= 1"),
    ([True, "dog", "", 0.4, ["1/8"], 0.0, 1.0, "second"], "hires_pass must be one of"),
    ([True, "dog", "", 0.4, ["1/8"], 0.0, 1.0, "hires", ["pictures"]], "outputs must be a subset"),
    ([True, "dog", "", "x"], "must be numbers"),
    ([True] * 11, "at most 10 args"),
])
def test_bad_options_name_what_is_wrong(args, message):
    with pytest.raises(OptionError) as e:
        Options.parse(args)
    assert message in str(e.value)


def test_distinct_layouts_keep_each_images_index():
    a = TokenLayout((1, 2), (1.0, 1.0), ("a", "b"), (-1, -1), (), 2)
    b = TokenLayout((1, 3), (1.0, 1.0), ("a", "c"), (-1, -1), (), 2)
    uniq, index = distinct([a, b, a, a])
    assert uniq == [a, b] and index == [0, 1, 0, 0]
