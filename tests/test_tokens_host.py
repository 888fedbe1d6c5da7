"""Token layouts against the real ComfyUI tokenizers (SD1 CLIP-L, SD2 OpenCLIP-H, SDXL clip_l + clip_g).

Only the host's tokenizer folders are used (no model weights). Skipped when the host is not set up.
"""

import pytest
import torch

from daam_core.hosts.comfy.tokens import layout_from_comfy_tokens
from daam_core.text.tokenize import tokenize

pytestmark = pytest.mark.host

PROMPTS = [
    "a photo of a dog",
    "",
    "(masterpiece:1.2), ((best quality)), ultra-detailed, \\(literal parens\\), [square] BREAK end",
    "a (b (c:1.5) d) e",
    "((a) b",
    "a) b (c",
    "(time: 12:30:0.8) (a:b) ()a (x:1e-1)",
    "dog, cat; bird! (fish?) -- ... 'quoted' \"double\" #tag @home",
    "1girl, 2boys, 3.5 meters, 1024x768, 50% off, (7:1.3)",
    "café ñandú 東京 😀 x² Ωmega naïve",
    "a dog\n\nin the park\tat noon",
    "it's the dog's bone, don't",
    "embedding:foo bar",  # no embedding folder: ordinary text
    ", ".join(["a highly detailed oil painting of a (red:1.1) fox in a snowy forest"] * 9),  # > 150 tokens
    "antidisestablishmentarianism " * 25,
    " ".join(f"(word{i}:1.{i % 9})" for i in range(60)),  # many short groups around the boundaries
    "x " * 73 + "(xylophonist:1.2) y",
    "x " * 70 + "(supercalifragilisticexpialidocious:1.1) y " * 3,
]

# (tokenizer factory, output key, pad_with_end)
ENCODERS = {
    "sd1-l": ("sd1", "l", True),
    "sd2-h": ("sd2", "h", False),
    "sdxl-l": ("sdxl", "l", True),
    "sdxl-g": ("sdxl", "g", False),
}


def make_tokenizer(kind, embedding_directory=None):
    import comfy.sd1_clip
    import comfy.sdxl_clip
    from comfy.text_encoders import sd2_clip

    factory = {"sd1": comfy.sd1_clip.SD1Tokenizer, "sd2": sd2_clip.SD2Tokenizer,
               "sdxl": comfy.sdxl_clip.SDXLTokenizer}[kind]
    return factory(embedding_directory=embedding_directory)


def hf_tokenizer(host_tokenizer, key):
    return getattr(host_tokenizer, f"clip_{key}").tokenizer


@pytest.fixture(scope="module")
def host_tokenizers(comfy_host):
    return {kind: make_tokenizer(kind) for kind in ("sd1", "sd2", "sdxl")}


def flat(chunks):
    ids = [t if isinstance(t, int) else -1 for c in chunks for t, *_ in c]
    weights = [w for c in chunks for _, w, *_ in c]
    return ids, weights


def word_table(layout):
    return [(w.text, w.positions, w.weight) for w in layout.words]


@pytest.mark.parametrize("encoder", list(ENCODERS))
@pytest.mark.parametrize("prompt", PROMPTS, ids=[f"p{i}" for i in range(len(PROMPTS))])
def test_tokenize_equals_host(host_tokenizers, encoder, prompt):
    kind, key, pad_with_end = ENCODERS[encoder]
    host = host_tokenizers[kind]
    tok = hf_tokenizer(host, key)
    host_chunks = host.tokenize_with_weights(prompt, return_word_ids=True)[key]
    host_ids, host_weights = flat(host_chunks)

    ours = tokenize(prompt, tok, syntax="comfy", pad_with_end=pad_with_end)
    assert list(ours.ids) == host_ids
    assert list(ours.weights) == host_weights  # exact: the same float arithmetic
    assert ours.length == 77 * len(host_chunks)
    # the host's word ids mark the same content positions
    assert ours.content_positions() == tuple(p for p, (*_, wid) in enumerate(e for c in host_chunks for e in c)
                                             if wid != 0)

    from_host = layout_from_comfy_tokens(host_chunks, tok, prompt=prompt)
    assert from_host.ids == ours.ids and from_host.weights == ours.weights
    assert word_table(from_host) == word_table(ours)
    assert from_host.word_of == ours.word_of and from_host.pieces == ours.pieces
    for word in ours.words:
        assert from_host.positions(word.text) == ours.positions(word.text)


def test_chunk_counts_on_host(host_tokenizers):
    """The host behaviours the layout relies on, spelled out."""
    sd1, sd2 = host_tokenizers["sd1"], host_tokenizers["sd2"]
    short_group = "x " * 73 + "(xylophonist:1.2) y"
    chunks = sd1.tokenize_with_weights(short_group)["l"]
    assert len(chunks) == 2 and all(len(c) == 77 for c in chunks)
    # chunk 1: BOS + 73 x + EOS + pad (EOS for CLIP-L); the 4-token group moved whole to chunk 2
    assert [t for t, _ in chunks[0][74:]] == [49407, 49407, 49407]
    assert [w for _, w in chunks[1][1:5]] == [1.2] * 4
    pads = [t for t, _ in sd2.tokenize_with_weights(short_group)["h"][0][74:]]
    assert pads == [49407, 0, 0]  # OpenCLIP-H pads with 0 after the EOS
    long_group = sd1.tokenize_with_weights("antidisestablishmentarianism " * 26)["l"]  # 156 tokens
    assert len(long_group) == 3 and long_group[0][76][0] == 49407 and long_group[1][0][0] == 49406


@pytest.fixture(scope="module")
def embedding_dir(tmp_path_factory):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("embeddings")
    for name, n in (("foo", 3), ("big", 10)):
        save_file({"clip_l": torch.randn(n, 768), "clip_g": torch.randn(n, 1280), "clip_h": torch.randn(n, 1024)},
                  str(d / f"{name}.safetensors"))
    return d


EMBEDDING_PROMPTS = [
    "a embedding:foo dog",
    "embedding:foo, dog",
    "(embedding:foo:1.2) cat",
    "a embedding:missing dog",
    "a embedding:foo.safetensors\nembedding:foo cat",
    "x " * 70 + "embedding:big y",
    "x " * 70 + "embedding:foo y",
    "embedding:foo,cat",
    "red,embedding:foo car",  # not preceded by a space: plain text
]


@pytest.mark.parametrize("encoder", list(ENCODERS))
@pytest.mark.parametrize("prompt", EMBEDDING_PROMPTS, ids=[f"e{i}" for i in range(len(EMBEDDING_PROMPTS))])
def test_embeddings_equal_host(comfy_host, embedding_dir, encoder, prompt):
    kind, key, pad_with_end = ENCODERS[encoder]
    host = make_tokenizer(kind, str(embedding_dir))
    tok = hf_tokenizer(host, key)
    host_chunks = host.tokenize_with_weights(prompt, return_word_ids=True)[key]
    host_ids, host_weights = flat(host_chunks)

    ours = tokenize(prompt, tok, syntax="comfy", pad_with_end=pad_with_end, embeddings={"foo": 3, "big": 10})
    assert list(ours.ids) == host_ids
    assert list(ours.weights) == host_weights

    from_host = layout_from_comfy_tokens(host_chunks, tok, prompt=prompt)
    assert word_table(from_host) == word_table(ours)
    assert from_host.pieces == ours.pieces
    if "embedding:foo" in [w.text for w in ours.words]:
        assert from_host.positions("foo") == ours.positions("embedding:foo")
        assert len(from_host.positions("foo#1")) == 3


def test_embedding_words_on_host(comfy_host, embedding_dir):
    host = make_tokenizer("sd1", str(embedding_dir))
    tok = hf_tokenizer(host, "l")
    chunks = host.tokenize_with_weights("x " * 70 + "embedding:big y", return_word_ids=True)["l"]
    layout = layout_from_comfy_tokens(chunks, tok, prompt="x " * 70 + "embedding:big y")
    # a 10-vector embedding is a "large" group: it fills chunk 1 and continues in chunk 2
    assert layout.positions("big") == (71, 72, 73, 74, 75, 78, 79, 80, 81, 82)
    assert layout.positions("y") == (83,)
    assert [w.text for w in layout.words][-2:] == ["embedding:big", "y"]
