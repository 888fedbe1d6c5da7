"""T5 (SentencePiece) layouts and SD3's CLIP + T5 concatenation, against the host's real tokenizers.

Only the tokenizer files ComfyUI ships are used (comfy/text_encoders/t5_tokenizer, comfy/sd1_tokenizer); no
weights. Skipped when the host is not set up.
"""

import pytest

from daam_core.hosts.comfy.dit import conditioning_layout
from daam_core.hosts.comfy.tokens import layout_from_comfy_t5
from daam_core.text.layout import Segment, TokenLayout, concat_layouts
from daam_core.text.query import WordNotFoundError
from daam_core.text.sentencepiece import tokenize_t5, word_keys
from daam_core.text.tokenize import tokenize

pytestmark = pytest.mark.host

PROMPTS = [
    "a photo of a dog",
    "",
    "a photo of a (Dog:1.2), sitting on a sheepdog's hat",
    "(masterpiece:1.2), ((best quality)), ultra-detailed, \\(literal parens\\), [square]",
    "a (b (c:1.5) d) e",
    "dog, cat; bird! (fish?) -- ... 'quoted' \"double\" #tag @home",
    "1girl, 2boys, 3.5 meters, 1024x768, 50% off, (7:1.3)",
    "café ñandú 東京 x² Ωmega naïve",
    "a dog\n\nin the park\tat noon",
    "it's the dog's bone, don't",
    "embedding:foo bar",
    ", ".join(["a highly detailed oil painting of a (red:1.1) fox in a snowy forest"] * 12),  # > 256 T5 tokens
]


@pytest.fixture(scope="module")
def host(comfy_host):
    from comfy.text_encoders import flux, sd3_clip

    return {"flux": flux.FluxTokenizer(), "sd3": sd3_clip.SD3Tokenizer()}


@pytest.fixture(scope="module")
def t5(host):
    return host["flux"].t5xxl.tokenizer


def flat(chunks):
    return ([t for c in chunks for t, *_ in c], [w for c in chunks for _, w, *_ in c],
            [wid for c in chunks for *_, wid in c])


def sd3_layout(sd3, prompt, clip_only=False):
    """SD3's layout as the ComfyUI adapter builds it for a conditioning of the host's length (CLIP, then T5)."""
    tokens = sd3.tokenize_with_weights(prompt, return_word_ids=True)
    return conditioning_layout(sd3, prompt, 77 * len(tokens["l"]) + (0 if clip_only else len(flat(tokens["t5xxl"])[0])))


def tokenize_sd3(prompt, clip_tokenizer, t5_tokenizer):
    """The pure builders joined as SD3 joins its encoders: CLIP chunks, then T5 (at least 77)."""
    return concat_layouts([("clip", tokenize(prompt, clip_tokenizer)),
                           ("t5", tokenize_t5(prompt, t5_tokenizer, min_length=77))], clip_tokenizer)


@pytest.mark.parametrize("family,min_length", [("flux", 256), ("sd3", 77)])
@pytest.mark.parametrize("prompt", PROMPTS, ids=[f"p{i}" for i in range(len(PROMPTS))])
def test_t5_layout_equals_host(host, t5, family, min_length, prompt):
    chunks = host[family].tokenize_with_weights(prompt, return_word_ids=True)["t5xxl"]
    ids, weights, wids = flat(chunks)
    ours = tokenize_t5(prompt, t5, min_length=min_length)
    assert list(ours.ids) == ids and list(ours.weights) == weights
    assert ours.length == max(min_length, len(ids)) == len(ids)
    assert ours.segments == (Segment("t5", 0, ours.length, "sentencepiece"),)
    # no BOS; EOS right after the content, then <pad> (id 0)
    content = ours.content_positions()
    assert content == tuple(p for p, w in enumerate(wids) if w != 0)
    end = (content[-1] + 1) if content else 0
    assert ours.ids[end] == t5.eos_token_id == 1 and set(ours.ids[end + 1:]) <= {0}
    replay = layout_from_comfy_t5(chunks, t5, prompt=prompt)
    assert replay.ids == ours.ids and replay.word_of == ours.word_of and replay.pieces == ours.pieces
    assert [(w.text, w.positions, w.weight) for w in replay.words] == [(w.text, w.positions, w.weight)
                                                                        for w in ours.words]
    for word in ours.words:
        assert replay.positions(word.text) == ours.positions(word.text)
        assert set(word.positions) <= set(ours.positions(word.text))


def test_word_positions_against_the_t5_tokenizer(t5):
    prompt = "a photo of a (Dog:1.2), sitting on a sheepdog's hat"
    layout = tokenize_t5(prompt, t5, min_length=256)
    pieces = t5.convert_ids_to_tokens(list(layout.ids))
    assert layout.pieces == tuple(pieces)
    # "Dog" is one piece "▁Dog", weighted; queries are case-insensitive and ignore edge punctuation
    dog = t5(["Dog"], add_special_tokens=False)["input_ids"][0]
    assert len(dog) == 1 and layout.positions("dog") == (layout.ids.index(dog[0]),)
    assert layout.positions("DOG!") == layout.positions("dog")  # "!" absent: retried without it
    d = layout.positions("dog")[0]
    assert pieces[d + 1:d + 3] == ["\u2581", ","] and layout.positions("Dog,") == (d, d + 1, d + 2)  # as written
    assert layout.weights[layout.positions("dog")[0]] == 1.2
    # "a" is two pieces ("▁", "a"); its second occurrence is the second such pair
    pairs = [p for p in range(layout.length - 1) if pieces[p] == "\u2581" and pieces[p + 1] == "a"]
    assert layout.positions("a#2") == (pairs[1], pairs[1] + 1)
    assert layout.positions("a") == tuple(sorted(p + i for p in pairs for i in (0, 1)))
    # "sheepdog's" = ▁sheep dog ' s; "dog" does not match inside it, the phrase does
    sheep = pieces.index("\u2581sheep")
    assert layout.positions("sheepdog's") == tuple(range(sheep, sheep + 4))
    assert sheep + 1 not in layout.positions("dog")
    assert layout.positions("sitting on") == (pieces.index("\u2581sitting"), pieces.index("\u2581on"))
    assert layout.length == 256 and layout.ids[-1] == 0
    with pytest.raises(WordNotFoundError):
        layout.positions("cat")
    assert word_keys("Sheepdog's, hat!") == ["sheepdog", "'", "s", ",", "hat", "!"]


def test_long_prompt_grows_past_min_length(t5):
    prompt = " ".join(f"word{i}" for i in range(200))
    layout = tokenize_t5(prompt, t5, min_length=256)
    assert layout.length > 256 and layout.ids[-1] == 1  # EOS last, nothing padded, nothing cut
    last = layout.positions("word199")
    assert last and max(last) == layout.length - 2
    cut = tokenize_t5(prompt, t5, max_length=256)  # diffusers' max_sequence_length truncation
    assert cut.length == 256 and cut.ids[-1] == 1
    with pytest.raises(WordNotFoundError, match="truncat|cut|limit"):
        cut.positions("word199")


@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[2], PROMPTS[3], PROMPTS[-1]])
def test_sd3_concatenation_equals_host(host, t5, prompt):
    sd3 = host["sd3"]
    tokens = sd3.tokenize_with_weights(prompt, return_word_ids=True)
    clip_tok = sd3.clip_l.tokenizer
    layout = sd3_layout(sd3, prompt)
    n_clip = 77 * len(tokens["l"])
    l_ids, _, _ = flat(tokens["l"])
    t_ids, t_weights, _ = flat(tokens["t5xxl"])
    assert layout.length == n_clip + len(t_ids)
    assert list(layout.ids) == l_ids + t_ids and list(layout.weights[n_clip:]) == t_weights
    assert [(g.name, g.start, g.stop) for g in layout.segments] == [("clip", 0, n_clip),
                                                                     ("t5", n_clip, layout.length)]
    assert all(layout.segment_of(p) == ("clip" if p < n_clip else "t5") for p in range(layout.length))
    # the same words as each encoder alone, each with positions in both segments
    clip_alone = tokenize(prompt, clip_tok)
    t5_alone = tokenize_t5(prompt, t5, min_length=77)
    assert [w.text for w in layout.words] == [w.text for w in clip_alone.words] == [w.text for w in t5_alone.words]
    for word in layout.words:
        c = clip_alone.positions(word.text)
        t = tuple(p + n_clip for p in t5_alone.positions(word.text))
        assert layout.positions(word.text, segments="clip") == c
        assert layout.positions(word.text, segments="t5") == t
        assert layout.positions(word.text) == tuple(sorted(c + t))
    # the pure builder gives the same layout as the replay of the host's tokens
    built = tokenize_sd3(prompt, clip_tok, t5)
    assert built.ids == layout.ids and built.word_of == layout.word_of and built.segments == layout.segments
    # only the encoders the model has: without T5 the layout is the CLIP segment alone
    clip_only = sd3_layout(sd3, prompt, clip_only=True)
    assert clip_only.length == n_clip and [g.name for g in clip_only.segments] == ["clip"]
    with pytest.raises(ValueError, match="no 't5' positions"):
        clip_only.positions(layout.words[0].text, segments="t5") if layout.words else clip_only._segments_for("t5")


def test_sd3_occurrences_and_serialisation(host, t5):
    prompt = "a dog and a (dog:1.3) on a hill"
    layout = tokenize_sd3(prompt, host["sd3"].clip_l.tokenizer, t5)
    n_clip = layout.segments[0].stop
    first, second = layout.positions("dog#1"), layout.positions("dog#2")
    assert [p < n_clip for p in first] == [True, False] and [p < n_clip for p in second] == [True, False]
    assert layout.weights[second[0]] == layout.weights[second[1]] == 1.3
    back = TokenLayout.from_dict(layout.to_dict())  # no tokenizer: text-key matching in both segments
    assert back == layout and back.segments == layout.segments
    for q in ("dog", "dog#2", "a", "hill", "and a"):
        assert back.positions(q) == layout.positions(q)
        assert back.positions(q, segments="t5") == layout.positions(q, segments="t5")
    # a layout written before segments existed reads as one CLIP segment
    old = tokenize("a dog", host["sd3"].clip_l.tokenizer).to_dict()
    old.pop("segments")
    legacy = TokenLayout.from_dict(old)
    assert legacy.segments == () and legacy.segment_list == (Segment("clip", 0, 77, "bpe"),)
    assert legacy.positions("dog") == (2,) and legacy.positions("dog", segments="clip") == (2,)
    with pytest.raises(ValueError, match="segments must be one of"):
        legacy.positions("dog", segments="t6")
    with pytest.raises(ValueError, match="cover"):
        concat_layouts([("clip", legacy)]).with_segments((Segment("clip", 0, 10),))


def test_word_maps_choose_segments(host, t5):
    """An SD3 trace: the word map of "dog" from the CLIP positions, the T5 positions or both."""
    import torch

    from daam_core.engine.geometry import PatchGrid
    from daam_core.engine.recorder import AttentionRecorder, Stream
    from daam_core.engine.trace import AttentionTrace

    layout = tokenize_sd3("a dog on a hill", host["sd3"].clip_l.tokenizer, t5)
    clip_dog, t5_dog = layout.positions("dog", segments="clip"), layout.positions("dog", segments="t5")
    hw, length = (8, 8), layout.length
    n = hw[0] * hw[1]
    left, right = torch.zeros(hw, dtype=torch.bool), torch.zeros(hw, dtype=torch.bool)
    left[:, :3], right[:, 5:] = True, True
    # keys of the CLIP "dog" attract the left image columns, the T5 "dog" the right ones
    g = torch.Generator().manual_seed(0)
    d = 32
    q = torch.randn(1, 2, length + n, d, generator=g) * 0.1
    k = torch.randn(1, 2, length + n, d, generator=g) * 0.1
    a, b = torch.zeros(d), torch.zeros(d)
    a[0], b[1] = 6.0, 6.0
    for p in clip_dog:
        k[0, :, p] += a
    for p in t5_dog:
        k[0, :, p] += b
    q[0, :, length:][:, left.flatten()] += a
    q[0, :, length:][:, right.flatten()] += b
    rec = AttentionRecorder()
    rec.begin(PatchGrid((16, 16), 2), [Stream(0, "cond", 0)], [length])
    rec.set_call([0], 0.5)
    rec.record_joint("joint.0", "joint", q, k, 2, text=(0, length), image=(length, length + n))
    trace = AttentionTrace.from_recorder(rec.finish(), [layout], image_hw=hw)
    for segments, region in (("clip", left), ("t5", right), ("both", left | right)):
        heat = trace.word_maps("dog", image=0, segments=segments, upsample="nearest")[0]
        found = heat >= 0.4
        assert (found == region).all(), segments
    assert trace.word_map("dog", segments="t5").positions == t5_dog
