"""Parsing prompts with spaCy and aligning its tokens to the token positions of CLIP and SentencePiece layouts."""

from __future__ import annotations

import pytest

from daam_core.analysis import syntax
from daam_core.analysis.syntax import SyntaxUnavailableError, align, layout_text, parse_layout, piece_texts
from daam_core import TokenLayout, Word, tokenize

spacy = pytest.importorskip("spacy", reason="the [syntax] extra (spaCy) is not installed")


@pytest.fixture(scope="module")
def nlp():
    try:
        return syntax.load_parser()
    except SyntaxUnavailableError as e:
        pytest.skip(str(e))


def spelled(layout, positions) -> str:
    """The text the pieces at ``positions`` spell (the reference: read straight from the tokenizer's pieces)."""
    return "".join(piece_texts(layout.pieces[p])[0] for p in positions)


def test_punctuation_gets_its_own_positions(nlp, clip_tokenizer):
    layout = tokenize("A dog's well-known toy-box, on a mat!", clip_tokenizer)
    parsed = parse_layout(layout, nlp)
    assert parsed.text == " ".join(w.text for w in layout.words)
    by_text = {}
    for t in parsed.tokens:
        assert t.positions, t
        assert spelled(layout, t.positions) == t.text.lower()  # each token covers exactly its own pieces
        by_text.setdefault(t.text, []).append(t)
    # "toy-box," is one layout word but four tokens, each on its own position
    word = next(w for w in layout.words if w.text == "toy-box,")
    parts = [t for t in parsed.tokens if t.word == word.index]
    assert [t.text for t in parts] == ["toy", "-", "box", ","]
    assert sorted(p for t in parts for p in t.positions) == sorted(word.positions)
    labels = {(r.head.text, r.dependent.text): r.label for r in parsed.relations()}
    assert labels[("box", "toy")] == "compound"
    punct = [r for r in parsed.relations() if r.dependent.text in {",", "!", "-"}]
    assert len(punct) == 4 and all(r.label == "punct" for r in punct)
    # punctuation is never half of an unrelated pair
    assert all(not r.head.is_punct and not r.dependent.is_punct for r in parsed.unrelated())


def test_multi_piece_words_and_weights(nlp, clip_tokenizer):
    layout = tokenize("a (golden:1.3) dragon over Zürich and a xylophonegrapefruit", clip_tokenizer)
    parsed = parse_layout(layout, nlp)
    for text in ("Zürich", "xylophonegrapefruit"):
        word = next(w for w in layout.words if w.text == text)
        assert len(word.positions) > 1  # several BPE pieces
        tok = next(t for t in parsed.tokens if t.text == text)
        assert tok.positions == tuple(sorted(word.positions))
    golden = next(t for t in parsed.tokens if t.text == "golden")
    assert golden.positions == next(w for w in layout.words if w.text == "golden").positions
    assert golden.dep == "amod" and parsed.tokens[golden.head].text == "dragon"


def test_long_prompt_spans_chunks(nlp, clip_tokenizer):
    prompt = ", ".join(f"a red circle number {i}" for i in range(30))  # ~150 tokens: two chunks and more
    layout = tokenize(prompt, clip_tokenizer)
    assert layout.num_chunks >= 2
    parsed = parse_layout(layout, nlp)
    covered = sorted(p for t in parsed.tokens for p in t.positions)
    content = sorted(p for w in layout.words for p in w.positions)
    assert covered == content  # every token position of every word belongs to exactly one spaCy token
    late = [t for t in parsed.tokens if t.positions and min(t.positions) >= layout.chunk_length]
    assert late and all(spelled(layout, t.positions) == t.text.lower() for t in late)
    rel = parsed.relations()
    assert any(r.label == "amod" and r.dependent.positions[0] >= layout.chunk_length for r in rel)


def test_sentencepiece_layout(nlp):
    """A T5-style layout (SentencePiece pieces, no BOS, EOS at the end) aligns the same way."""
    pieces = ["▁a", "▁fluffy", "▁dog", ",", "▁sleep", "ing", "▁on", "▁a", "▁sofa", ".", "</s>"]
    words_text = ["a", "fluffy", "dog,", "sleeping", "on", "a", "sofa."]
    word_of = [0, 1, 2, 2, 3, 3, 4, 5, 6, 6, -1]
    words = tuple(Word(t, i, tuple(p for p, w in enumerate(word_of) if w == i), 1.0) for i, t in enumerate(words_text))
    layout = TokenLayout(tuple(range(len(pieces))), (1.0,) * len(pieces), tuple(pieces), tuple(word_of), words,
                         len(pieces))
    parsed = parse_layout(layout, nlp)
    assert [(t.text, t.positions) for t in parsed.tokens] == [
        ("a", (0,)), ("fluffy", (1,)), ("dog", (2,)), (",", (3,)), ("sleeping", (4, 5)), ("on", (6,)), ("a", (7,)),
        ("sofa", (8,)), (".", (9,))]
    assert {(r.head.text, r.dependent.text, r.label) for r in parsed.relations()} >= {("dog", "fluffy", "amod"),
                                                                                       ("dog", ",", "punct")}


def test_align_without_spacy_and_unspelled_pieces():
    """Embedding pieces spell nothing: every token of that word gets the whole word's positions."""
    pieces = ["<|startoftext|>", "a</w>", "<embedding:style:0>", "<embedding:style:1>", "cat</w>", ",</w>",
              "<|endoftext|>"]
    word_of = [-1, 0, 1, 1, 2, 2, -1]
    texts = ["a", "embedding:style", "cat,"]
    words = tuple(Word(t, i, tuple(p for p, w in enumerate(word_of) if w == i), 1.0) for i, t in enumerate(texts))
    layout = TokenLayout((0,) * 7, (1.0,) * 7, tuple(pieces), tuple(word_of), words, 7)
    text, spans = layout_text(layout.words)
    assert text == "a embedding:style cat,"
    assert spans == [(0, 1), (2, 17), (18, 22)]
    got = align([("a", 0), ("embedding", 2), (":", 11), ("style", 12), ("cat", 18), (",", 21)], layout)
    assert got == [(0, (1,)), (1, (2, 3)), (1, (2, 3)), (1, (2, 3)), (2, (4,)), (2, (5,))]


def test_byte_level_pieces_decode():
    assert piece_texts("dog</w>") == ["dog"]
    assert piece_texts("\u2581dog") == ["dog"]
    assert piece_texts("Ã¼") == ["ü", "Ã¼"]  # CLIP's byte-level spelling of ü
    assert piece_texts("<|endoftext|>") == []


def test_missing_model_is_a_clear_error():
    with pytest.raises(SyntaxUnavailableError, match=r"no_such_spacy_model.*pip install"):
        syntax.load_parser("no_such_spacy_model")
