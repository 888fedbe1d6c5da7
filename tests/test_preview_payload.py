"""The preview payload of DAAM Heatmaps, in-process on the real host: the browser's mask at every slider step is
the node's MASK at that threshold, bit for bit, also where the maps are resized (latent 6x8 -> image 48x64)."""

from __future__ import annotations

import base64
import json
import zlib

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.host

POS = "a cat and a dog on a red sofa"
NEG = "blurry, low quality"


@pytest.fixture(scope="module")
def run(pack, sd15_checkpoint):
    import comfy.sample
    import comfy.sd
    import nodes as host_nodes

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint), output_vae=True,
                                                               output_clip=True)
    traced = pack.DAAMTraceModel.execute(model, time_buckets=4)[0]
    pos = host_nodes.CLIPTextEncode().encode(clip, POS)[0]
    neg = host_nodes.CLIPTextEncode().encode(clip, NEG)[0]
    latent = torch.zeros(2, 4, 6, 8)
    noise = comfy.sample.prepare_noise(latent, 3)
    samples = comfy.sample.sample(traced, noise, 4, 5.0, "euler", "normal", pos, neg, latent, denoise=1.0, seed=3,
                                  disable_pbar=True)
    images = host_nodes.VAEDecode().decode(vae, {"samples": samples})[0]

    def heatmaps(words, negative_words="", threshold=0.4, normalize="minmax"):
        return pack.DAAMHeatmaps.execute(traced, clip, {"samples": samples}, POS, NEG, words,
                                            negative_words=negative_words, threshold=threshold,
                                            normalize=normalize, images=images)

    return heatmaps


def decode(payload):
    h, w = payload["map_hw"]
    hh, ww = payload["image_hw"]
    e = len(payload["entries"])
    out = []
    for item in payload["images"]:
        maps = np.frombuffer(base64.b64decode(item["maps"]), "<f4").reshape(e, h, w)
        levels = np.frombuffer(zlib.decompress(base64.b64decode(item["levels"])), np.uint8).reshape(e, hh, ww)
        out.append((maps, levels))
    return out


def index_of(payload, key, prompt="positive"):
    return next(i for i, x in enumerate(payload["entries"]) if x["key"] == key and x["prompt"] == prompt)


def test_chips_cover_words_occurrences_phrases_and_the_negative_prompt(run):
    payload = run("cat, red sofa, dog#1", negative_words="blurry").ui["daam_preview"][0]
    keys = [(x["key"], x["prompt"], x["kind"]) for x in payload["entries"]]
    pos = [k for k, p, _ in keys if p == "positive"]
    assert pos[:6] == ["a", "a#1", "a#2", "a#3", "cat", "and"]  # prompt order; 'a' occurs three times
    assert ("red sofa", "positive", "phrase") in keys and ("dog#1", "positive", "occurrence") in keys
    assert [k for k, p, _ in keys if p == "negative"] == ["blurry", "low", "quality"]
    selected = {(x["key"], x["prompt"]) for x in payload["entries"] if x["selected"]}
    assert selected == {("cat", "positive"), ("red sofa", "positive"), ("dog#1", "positive"), ("blurry", "negative")}
    assert payload["map_hw"] == [6, 8] and payload["image_hw"] == [48, 64] and len(payload["images"]) == 2
    assert all(item["image"]["type"] == "temp" for item in payload["images"])
    assert len(json.dumps(payload)) < 200_000  # small: low-resolution maps, compressed level maps


def test_mask_at_every_slider_step_is_the_node_mask(run):
    words, negative, normalize = "cat, red sofa, dog", "blurry", "shared"
    payload = run(words, negative, normalize=normalize).ui["daam_preview"][0]
    decoded = decode(payload)
    order = [index_of(payload, k) for k in ("cat", "red sofa", "dog")] + [index_of(payload, "blurry", "negative")]
    checked = 0
    for step in (0, 1, 40, 73, 100):
        masks = run(words, negative, threshold=step / 100, normalize=normalize).result[2]  # [B * 4, H, W]
        for b, (_, levels) in enumerate(decoded):
            for j, e in enumerate(order):
                node = masks[b * len(order) + j].numpy()
                browser = (levels[e] > step).astype(np.float32)
                assert np.array_equal(node, browser), (step, b, payload["entries"][e]["key"])
                checked += int(0 < node.mean() < 1)
    assert checked > 10  # most of the masks compared are neither empty nor full


def test_maps_are_the_raw_maps_at_latent_size_and_time_buckets_differ(run, pack):
    out = run("cat, dog")
    payload = out.ui["daam_preview"][0]
    trace = out.result[3].trace
    keys = [x["key"] for x in payload["entries"] if x["prompt"] == "positive"]
    for b, (maps, _) in enumerate(decode(payload)):
        ref = trace.word_maps(keys, image=b, size=trace.latent_hw, normalize="none", missing="zeros").numpy()
        assert np.array_equal(maps[:len(keys)], ref)
    assert payload["time"]["buckets"] == 4 and payload["time"]["edges"] == [0, 0.25, 0.5, 0.75, 1]
    e = len(payload["entries"])
    timed = np.frombuffer(zlib.decompress(base64.b64decode(payload["images"][0]["time"])), np.uint8)
    timed = timed.reshape(4, e, 6, 8)
    cat = index_of(payload, "cat")
    assert timed.reshape(4, -1).max(-1).tolist() == [255] * 4  # each part of the sampling scaled to its own peak
    assert timed[:, cat].max() > 0
    assert not np.array_equal(timed[0, cat], timed[3, cat])  # early and late differ


@pytest.fixture(scope="module")
def refined_run(pack, sd15_checkpoint):
    """As ``run``, traced with the refinements' sums (self-attention and per-head)."""
    import comfy.sample
    import comfy.sd
    import nodes as host_nodes

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint), output_vae=True,
                                                              output_clip=True)
    traced = pack.DAAMTraceModel.execute(model, time_buckets=2, record_self_attention=True,
                                         record_head_sums=True)[0]
    pos = host_nodes.CLIPTextEncode().encode(clip, POS)[0]
    neg = host_nodes.CLIPTextEncode().encode(clip, NEG)[0]
    latent = torch.zeros(1, 4, 6, 8)
    samples = comfy.sample.sample(traced, comfy.sample.prepare_noise(latent, 5), 3, 5.0, "euler", "normal", pos,
                                  neg, latent, denoise=1.0, seed=5, disable_pbar=True)

    def heatmaps(words, negative_words="", threshold=0.4, **kwargs):
        return pack.DAAMHeatmaps.execute(traced, clip, {"samples": samples}, POS, NEG, words,
                                         negative_words=negative_words, threshold=threshold, **kwargs)

    return heatmaps


def decode_other(payload):
    h, w = payload["map_hw"]
    hh, ww = payload["image_hw"]
    e = len(payload["entries"])
    return [(np.frombuffer(base64.b64decode(item["other"]["maps"]), "<f4").reshape(e, h, w),
             np.frombuffer(zlib.decompress(base64.b64decode(item["other"]["levels"])), np.uint8).reshape(e, hh, ww))
            for item in payload["images"]]


PLAIN_SETTING = {"propagate_steps": 0, "head_power": 0.0, "map_source": "attention",
                 "propagate_at": "each resolution", "exclusive": False}


@pytest.mark.parametrize("node_refine", [{}, {"propagate_steps": 2, "head_power": 1.0},
                                         {"propagate_steps": 2, "head_power": 4.0, "propagate_at": "finest resolution",
                                          "exclusive": True}])
def test_preview_switches_refinement_and_each_mask_is_the_node_mask(refined_run, pack, node_refine):
    """The payload holds the node's maps and the other refinement setting's; at every slider step the mask of
    either is the MASK the node outputs with that setting (exclusive: the node's words compete, the other chips
    do not)."""
    words, negative = "cat, red sofa, dog", "blurry"
    payload = refined_run(words, negative, **node_refine).ui["daam_preview"][0]
    mine = {**PLAIN_SETTING, **node_refine}
    other = dict(PLAIN_SETTING) if node_refine else {**PLAIN_SETTING, "propagate_steps": 4, "head_power": 2.0}
    assert payload["refine"] == {"node": mine, "other": other}
    order = [index_of(payload, k) for k in ("cat", "red sofa", "dog")] + [index_of(payload, "blurry", "negative")]
    checked = 0
    for setting, decoded in ((mine, decode(payload)), (other, decode_other(payload))):
        out = refined_run(words, negative, **setting)
        trace = out.result[3].trace
        keys = [x["key"] for x in payload["entries"] if x["prompt"] == "positive"]
        how = dict(image=0, size=trace.latent_hw, normalize="none", missing="zeros",
                   propagate=setting["propagate_steps"], head_power=setting["head_power"],
                   propagate_at=setting["propagate_at"].split()[0])
        ref = trace.word_maps(keys, **how)
        if setting["exclusive"]:
            asked = ["cat", "red sofa", "dog"]
            ref[[keys.index(k) for k in asked]] = trace.word_maps(asked, exclusive=True, **how)
        assert np.array_equal(decoded[0][0][:len(keys)], ref.numpy())
        for step in (0, 25, 40, 77):
            masks = refined_run(words, negative, threshold=step / 100, **setting).result[2]
            for j, e in enumerate(order):
                node = masks[j].numpy()
                assert np.array_equal(node, (decoded[0][1][e] > step).astype(np.float32)), (setting, step, e)
                checked += int(0 < node.mean() < 1)
    assert checked > 10
    plain, refined = decode(payload)[0][0], decode_other(payload)[0][0]
    assert not np.array_equal(plain, refined)


def test_plain_trace_offers_no_other_refinement(run):
    payload = run("cat").ui["daam_preview"][0]
    assert payload["refine"] == {"node": PLAIN_SETTING, "other": None}
    assert all("other" not in item for item in payload["images"])
