"""Prompt syntax and token alignment with the real CLIP BPE vocabulary (no host needed)."""

import json

import pytest
import torch

from daam_core.text.syntax import PromptSegment, parse_prompt
from daam_core.hosts.comfy.tokens import layout_from_comfy_tokens
from daam_core.text.layout import TokenLayout, Word
from daam_core.text.query import WordNotFoundError, parse_query
from daam_core.text.tokenize import tokenize

BOS, EOS = 49406, 49407


def seg(text, weight=1.0, is_break=False):
    return PromptSegment(text, weight, is_break)


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def vocab_id(tok, piece):
    return tok.convert_tokens_to_ids(piece)


# -- parse_prompt -------------------------------------------------------------------------------------------------


def test_comfy_weights_and_nesting():
    assert parse_prompt("a (b:1.5) c") == [seg("a "), seg("b", 1.5), seg(" c")]
    assert parse_prompt("((a))") == [seg("a", 1.1 * 1.1)]
    # an explicit weight replaces the enclosing one instead of multiplying it
    assert parse_prompt("((a:1.5))") == [seg("a", 1.5)]
    assert parse_prompt("(a (b:0.5) c)") == [seg("a ", 1.1), seg("b", 0.5), seg(" c", 1.1)]
    assert parse_prompt("(a:b)") == [seg("a:b", 1.1)]  # not a number: the colon is text
    assert parse_prompt("(time: 12:30:0.8)") == [seg("time: 12:30", 0.8)]  # the last colon counts
    assert parse_prompt("()a") == [seg("a")]


def test_comfy_escapes_brackets_break_unbalanced():
    assert parse_prompt(r"\(a\) (b)") == [seg("(a) "), seg("b", 1.1)]
    assert parse_prompt(r"(\(x\):1.3)") == [seg("(x)", 1.3)]
    # square brackets and BREAK mean nothing to ComfyUI
    assert parse_prompt("[a] BREAK b") == [seg("[a] BREAK b")]
    assert parse_prompt("((a) b") == [seg("((a) b")]
    assert parse_prompt("a) b (c") == [seg("a) b (c")]
    assert parse_prompt("") == []


def test_a1111_weights():
    assert parse_prompt("a (b:1.5) c", "a1111") == [seg("a "), seg("b", 1.5), seg(" c")]
    assert parse_prompt("(a)", "a1111") == [seg("a", 1.1)]
    assert parse_prompt("[a]", "a1111") == [seg("a", 1 / 1.1)]
    # nesting multiplies, explicit weights included
    assert parse_prompt("((a:1.5))", "a1111") == [seg("a", 1.5 * 1.1)]
    assert parse_prompt("[[a]]", "a1111") == [seg("a", (1 / 1.1) * (1 / 1.1))]
    (only,) = parse_prompt("[(a)]", "a1111")
    assert only.text == "a" and only.weight == pytest.approx(1.0)
    # an unclosed bracket runs to the end of the prompt
    assert parse_prompt("x (a", "a1111") == [seg("x "), seg("a", 1.1)]
    # pieces of equal weight merge, so "(b:1)" does not split the text
    assert parse_prompt("a (b:1) c", "a1111") == [seg("a b c")]


def test_a1111_escapes_and_break():
    assert parse_prompt(r"\[a\] \(b\) c\\d", "a1111") == [seg(r"[a] (b) c\d")]
    assert parse_prompt("a cat BREAK a dog", "a1111") == [seg("a cat"), seg("", 1.0, True), seg("a dog")]
    assert parse_prompt("(red:1.2) BREAK\nblue", "a1111") == [seg("red", 1.2), seg("", 1.0, True), seg("blue")]
    # only the upper-case word on its own is a break
    assert parse_prompt("a break b", "a1111") == [seg("a break b")]
    assert parse_prompt("aBREAK b", "a1111") == [seg("aBREAK b")]


def test_plain_and_unknown_syntax():
    assert parse_prompt("(a:1.2) [b] BREAK c", "plain") == [seg("(a:1.2) [b] BREAK c")]
    assert parse_prompt("", "plain") == [seg("")]
    with pytest.raises(ValueError, match="unknown prompt syntax"):
        parse_prompt("a", "nai")


# -- tokenize: single words ---------------------------------------------------------------------------------------


def test_simple_words_match_tokenizer(clip_tokenizer):
    prompt = "a photo of a dog"
    layout = tokenize(prompt, clip_tokenizer)
    ref = clip_tokenizer(prompt)["input_ids"]  # [BOS, a, photo, of, a, dog, EOS]
    assert layout.length == 77 and layout.chunk_length == 77
    assert list(layout.ids[:7]) == ref
    assert layout.ids[7:] == (EOS,) * 70  # SD1 pads with EOS
    dog = vocab_id(clip_tokenizer, "dog</w>")
    assert layout.positions("dog") == (5,) and layout.ids[5] == dog == ref[5]
    assert layout.positions("photo") == (2,)
    assert layout.pieces[:6] == ("<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "dog</w>")
    assert layout.word_of[:7] == (-1, 0, 1, 2, 3, 4, -1)
    assert [w.text for w in layout.words] == ["a", "photo", "of", "a", "dog"]
    assert layout.words[4] == Word("dog", 4, (5,), 1.0)
    assert layout.content_positions() == (1, 2, 3, 4, 5)


def test_multi_piece_word(clip_tokenizer):
    layout = tokenize("a xylophonist playing", clip_tokenizer)
    pieces = clip_tokenizer.convert_ids_to_tokens(ids_of(clip_tokenizer, "xylophonist"))
    assert len(pieces) == 4  # xy lo ph onist</w>
    assert layout.positions("xylophonist") == (2, 3, 4, 5)
    assert layout.pieces[2:6] == tuple(pieces)
    assert layout.words[1] == Word("xylophonist", 1, (2, 3, 4, 5), 1.0)
    assert layout.positions("playing") == (6,)


def test_punctuation_and_case(clip_tokenizer):
    layout = tokenize("a dog, running", clip_tokenizer)
    assert [w.text for w in layout.words] == ["a", "dog,", "running"]
    assert layout.words[1].positions == (2, 3)  # dog</w> ,</w>
    assert layout.positions("dog") == (2,)
    assert layout.positions("dog,") == (2, 3)
    assert layout.positions("Dog,") == (2, 3)
    # a query with punctuation the prompt lacks still finds the word
    plain = tokenize("A Dog running", clip_tokenizer)
    assert plain.positions("dog,") == (2,)
    assert plain.positions("dog") == plain.positions("DOG") == (2,)
    assert plain.words[1].text == "Dog"


def test_repeated_words_and_occurrences(clip_tokenizer):
    layout = tokenize("a dog and a dog", clip_tokenizer)
    assert layout.positions("dog") == (2, 5)
    assert layout.positions("dog#1") == (2,)
    assert layout.positions("dog#2") == (5,)
    assert layout.positions("dog", 1) == (5,)
    assert layout.positions("dog", occurrence=0) == (2,)
    with pytest.raises(ValueError, match="occurs 2 time"):
        layout.positions("dog#3")
    with pytest.raises(ValueError, match="empty"):
        layout.positions("  ")


def test_parse_query():
    assert parse_query("dog") == ("dog", None)
    assert parse_query(" dog#2 ") == ("dog", 1)
    assert parse_query("red car #1") == ("red car", 0)
    assert parse_query("C#") == ("C#", None)
    assert parse_query("#3") == ("#3", None)  # nothing before the suffix: a literal
    with pytest.raises(ValueError, match="start at 1"):
        parse_query("dog#0")


def test_phrases(clip_tokenizer):
    layout = tokenize("a red car next to a red apple", clip_tokenizer)
    assert layout.positions("red car") == (2, 3)
    assert layout.positions("red") == (2, 7)
    assert layout.positions("a red") == (1, 2, 6, 7)
    assert layout.positions("a red#2") == (6, 7)
    with pytest.raises(WordNotFoundError):
        layout.positions("red apple car")


def test_word_start_rule(clip_tokenizer):
    assert clip_tokenizer.convert_ids_to_tokens(ids_of(clip_tokenizer, "sheepdog")) == ["sheep", "dog</w>"]
    layout = tokenize("a sheepdog", clip_tokenizer)
    assert layout.positions("sheepdog") == (2, 3)
    with pytest.raises(WordNotFoundError):
        layout.positions("dog")  # the last BPE piece of "sheepdog" is dog</w>, but it starts no word
    # a word after punctuation without a space still starts a word piece
    assert tokenize("red,dog", clip_tokenizer).positions("dog") == (3,)


def test_weights_per_position(clip_tokenizer):
    layout = tokenize("a (red:1.5) ((car)) [x]", clip_tokenizer)
    # groups: "a ", "red", " ", "car", " [x]"
    red, car = layout.positions("red"), layout.positions("car")
    assert red == (2,) and car == (3,)
    assert layout.weights[2] == 1.5 and layout.weights[3] == 1.1 * 1.1
    assert layout.weights[0] == layout.weights[1] == 1.0
    assert all(w == 1.0 for w in layout.weights[4:])  # "[x]" and specials
    assert [(w.text, w.weight) for w in layout.words] == [("a", 1.0), ("red", 1.5), ("car", 1.1 * 1.1), ("[x]", 1.0)]
    a1111 = tokenize("a (red:1.5) ((car)) [x]", clip_tokenizer, syntax="a1111")
    assert a1111.weights[2] == 1.5 and a1111.weights[3] == 1.1 * 1.1
    assert a1111.positions("x") == (4,) and a1111.weights[4] == 1 / 1.1


# -- tokenize: chunks -----------------------------------------------------------------------------------------------


def long_prompt(clip_tokenizer):
    prompt = "red car, " * 40 + "giraffe"  # 3 tokens x 40 + 1
    assert len(ids_of(clip_tokenizer, prompt)) == 121
    return prompt


def test_long_prompt_two_chunks(clip_tokenizer):
    prompt = long_prompt(clip_tokenizer)
    layout = tokenize(prompt, clip_tokenizer)
    assert layout.length == 154 and layout.num_chunks == 2
    assert (layout.ids[0], layout.ids[76], layout.ids[77], layout.ids[153]) == (BOS, EOS, BOS, EOS)
    content = ids_of(clip_tokenizer, prompt)
    # one unweighted group of 121 tokens (>= 8) is split exactly after 75 tokens
    assert list(layout.ids[1:76]) == content[:75]
    assert list(layout.ids[78:78 + 46]) == content[75:]
    assert layout.ids[124] == EOS and layout.word_of[124] == -1
    (g,) = layout.positions("giraffe")
    assert g >= 77 and g == 78 + 45 and layout.ids[g] == vocab_id(clip_tokenizer, "giraffe</w>")
    assert len(layout.positions("red car")) == 80
    assert layout.positions("red car#40") == (78 + 42, 78 + 43)
    assert 76 not in layout.content_positions() and 77 not in layout.content_positions()
    assert len(layout.content_positions()) == 121


def test_match_crosses_chunk_boundary(clip_tokenizer):
    prompt = "x " * 74 + "red car"  # red is token 75 (last of chunk 1), car the first of chunk 2
    layout = tokenize(prompt, clip_tokenizer)
    assert layout.positions("red car") == (75, 78)
    assert layout.ids[76] == EOS and layout.ids[77] == BOS


def test_short_group_moves_to_next_chunk(clip_tokenizer):
    # ComfyUI keeps a group of < 8 tokens whole: it moves to the next chunk when it does not fit
    prompt = "x " * 74 + "(xylophonist:1.2)"
    layout = tokenize(prompt, clip_tokenizer)
    assert layout.length == 154
    assert layout.ids[75] == EOS and layout.ids[76] == EOS  # end token, then padding
    assert layout.positions("xylophonist") == (78, 79, 80, 81)
    assert all(layout.weights[p] == 1.2 for p in (78, 79, 80, 81))
    # SD2 / SDXL clip_g pad with 0 instead of EOS
    sd2 = tokenize(prompt, clip_tokenizer, pad_with_end=False)
    assert sd2.ids[75] == EOS and sd2.ids[76] == 0 and sd2.ids[82] == EOS and set(sd2.ids[83:]) == {0}
    assert sd2.pieces[76] == "!"


def test_chunked_false_truncates_like_diffusers(clip_tokenizer):
    prompt = long_prompt(clip_tokenizer)
    layout = tokenize(prompt, clip_tokenizer, syntax="plain", chunked=False)
    ref = clip_tokenizer(prompt, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert list(layout.ids) == ref and layout.length == 77
    assert layout.positions("red car#1") == (1, 2)
    with pytest.raises(WordNotFoundError, match="truncated at 77 tokens") as err:
        layout.positions("giraffe")
    assert err.value.truncated
    with pytest.raises(WordNotFoundError, match="is not in the prompt"):
        layout.positions("zebra")
    assert "giraffe" not in [w.text for w in layout.words]
    # a word cut in the middle is also reported as truncated
    cut = tokenize("x " * 73 + "xylophonist", clip_tokenizer, chunked=False)
    assert cut.positions("x") == tuple(range(1, 74))
    with pytest.raises(WordNotFoundError, match="truncated"):
        cut.positions("xylophonist")
    assert cut.words[-1].text == "xylophonist" and cut.words[-1].positions == (74, 75)


def test_break_chunks(clip_tokenizer):
    layout = tokenize("a cat BREAK a dog", clip_tokenizer, syntax="a1111")
    assert layout.length == 154
    assert layout.ids[:4] == (BOS, vocab_id(clip_tokenizer, "a</w>"), vocab_id(clip_tokenizer, "cat</w>"), EOS)
    assert layout.positions("cat") == (2,) and layout.positions("dog") == (79,)
    assert layout.ids[77] == BOS
    # BREAK is an ordinary word in ComfyUI
    comfy = tokenize("a cat BREAK a dog", clip_tokenizer)
    assert comfy.length == 77 and comfy.positions("BREAK") == (3,)


def test_a1111_comma_backtrack(clip_tokenizer):
    # 70 x + "," + 8 dogs: when the chunk fills, the tokens after the comma move to the next chunk
    prompt = "x " * 70 + ", " + "dog " * 8
    layout = tokenize(prompt, clip_tokenizer, syntax="a1111")
    assert layout.ids[71] == vocab_id(clip_tokenizer, ",</w>") and layout.ids[72] == EOS
    assert layout.positions("dog") == tuple(range(78, 86))
    # ComfyUI splits the single long group at 75 tokens instead
    comfy = tokenize(prompt, clip_tokenizer)
    assert comfy.positions("dog") == (72, 73, 74, 75, 78, 79, 80, 81)


def test_embeddings(clip_tokenizer):
    layout = tokenize("a embedding:foo dog", clip_tokenizer, embeddings={"foo": 3})
    assert layout.ids[:6] == (BOS, vocab_id(clip_tokenizer, "a</w>"), -1, -1, -1, vocab_id(clip_tokenizer, "dog</w>"))
    assert layout.pieces[2:5] == ("<embedding:foo:0>", "<embedding:foo:1>", "<embedding:foo:2>")
    assert [w.text for w in layout.words] == ["a", "embedding:foo", "dog"]
    assert layout.positions("embedding:foo") == layout.positions("foo") == (2, 3, 4)
    assert layout.positions("embedding:foo dog") == (2, 3, 4, 5)
    assert layout.positions("dog") == (5,)
    # a file name with extension, a trailing comma and weights work as in ComfyUI
    ext = tokenize("(embedding:foo.pt, dog:1.2)", clip_tokenizer, embeddings={"foo": 2})
    assert ext.ids[1:5] == (-1, -1, vocab_id(clip_tokenizer, ",</w>"), vocab_id(clip_tokenizer, "dog</w>"))
    assert ext.weights[1:5] == (1.2,) * 4 and ext.positions("foo") == (1, 2)
    # unknown embeddings are dropped; without an embedding table the text is ordinary words
    assert [w.text for w in tokenize("a embedding:bar dog", clip_tokenizer, embeddings={"foo": 3}).words] == ["a", "dog"]
    literal = tokenize("a embedding:foo dog", clip_tokenizer)
    assert literal.ids[2:6] == tuple(ids_of(clip_tokenizer, "embedding:foo"))
    assert literal.positions("embedding:foo") == (2, 3, 4, 5)


def test_long_embedding_is_split_like_a_long_word(clip_tokenizer):
    layout = tokenize("x " * 70 + "embedding:big", clip_tokenizer, embeddings={"big": 10})
    assert layout.positions("big") == (71, 72, 73, 74, 75, 78, 79, 80, 81, 82)
    assert layout.pieces[78] == "<embedding:big:5>"
    small = tokenize("x " * 70 + "embedding:small", clip_tokenizer, embeddings={"small": 6})
    assert small.positions("small") == tuple(range(78, 84))


def test_empty_prompt(clip_tokenizer):
    for syntax in ("comfy", "a1111", "plain"):
        for chunked in (True, False):
            layout = tokenize("", clip_tokenizer, syntax=syntax, chunked=chunked)
            assert layout.ids == (BOS,) + (EOS,) * 76
            assert layout.words == () and layout.content_positions() == ()
    with pytest.raises(WordNotFoundError, match=r"words are: \(none\)"):
        tokenize("", clip_tokenizer).positions("dog")


def test_word_not_found_message(clip_tokenizer):
    layout = tokenize("a photo of a dog", clip_tokenizer)
    with pytest.raises(WordNotFoundError) as err:
        layout.positions("cat")
    msg = str(err.value)
    assert "'cat'" in msg and "'a', 'photo', 'of', 'a', 'dog'" in msg
    assert isinstance(err.value, ValueError)
    assert err.value.query == "cat" and err.value.words == ("a", "photo", "of", "a", "dog")


def test_unicode_and_numbers(clip_tokenizer):
    prompt = "café ñandú 東京 x² 1234"
    layout = tokenize(prompt, clip_tokenizer)
    assert list(layout.ids[:12]) == clip_tokenizer(prompt)["input_ids"][:12]
    assert [w.text for w in layout.words] == ["café", "ñandú", "東京", "x²", "1234"]
    assert layout.positions("東京") == layout.words[2].positions and len(layout.words[2].positions) == 3
    assert layout.positions("1234") == layout.words[4].positions and len(layout.words[4].positions) == 4


def test_digits_are_word_pieces(clip_tokenizer):
    # CLIP splits numbers into one piece per digit, each its own word piece
    layout = tokenize("1234 cats", clip_tokenizer)
    assert layout.positions("1234") == (1, 2, 3, 4)
    assert layout.positions("3") == (3,)


# -- serialization and host tokens --------------------------------------------------------------------------------


def test_dict_round_trip(clip_tokenizer):
    layout = tokenize("a (red:1.2) sheepdog, embedding:foo BREAK " + "x " * 80, clip_tokenizer,
                      embeddings={"foo": 2})
    d = json.loads(json.dumps(layout.to_dict()))
    back = TokenLayout.from_dict(d)
    assert back == layout and back.tokenizer is None
    # without a tokenizer, queries match decoded word pieces and give the same answers
    for q in ["red", "Red,", "sheepdog", "sheepdog,", "foo", "embedding:foo", "BREAK", "x#3", "x"]:
        assert back.positions(q) == layout.positions(q), q
    for q in ["dog", "cat"]:
        with pytest.raises(WordNotFoundError):
            back.positions(q)
    assert back.bind(clip_tokenizer).positions("red") == layout.positions("red")
    truncated = tokenize(long_prompt(clip_tokenizer), clip_tokenizer, chunked=False)
    loaded = TokenLayout.from_dict(truncated.to_dict())
    with pytest.raises(WordNotFoundError, match="truncated"):
        loaded.positions("giraffe")
    cut = TokenLayout.from_dict(tokenize("x " * 73 + "xylophonist", clip_tokenizer, chunked=False).to_dict())
    with pytest.raises(WordNotFoundError, match="truncated"):
        cut.positions("xylophonist")
    assert cut.positions("x#73") == (73,)


def test_unicode_round_trip_without_tokenizer(clip_tokenizer):
    layout = tokenize("café ñandú 東京", clip_tokenizer)
    back = TokenLayout.from_dict(layout.to_dict())
    for q in ["café", "Ñandú", "東京"]:
        assert back.positions(q) == layout.positions(q)


def test_layout_from_hand_made_host_tokens(clip_tokenizer):
    a, dog, comma = (vocab_id(clip_tokenizer, p) for p in ("a</w>", "dog</w>", ",</w>"))
    chunk = [(BOS, 1.0, 0), (a, 1.0, 1), (dog, 1.2, 2), (comma, 1.2, 2)]
    chunk += [(torch.zeros(768), 1.0, 3), (torch.zeros(768), 1.0, 3), (EOS, 1.0, 0)]
    chunk += [(EOS, 1.0, 0)] * (77 - len(chunk))
    layout = layout_from_comfy_tokens([chunk], clip_tokenizer, prompt="a (dog,:1.2) embedding:foo")
    assert layout.length == 77 and layout.ids[:7] == (BOS, a, dog, comma, -1, -1, EOS)
    assert [w.text for w in layout.words] == ["a", "dog,", "embedding:foo"]
    assert layout.positions("dog") == (2,) and layout.positions("foo") == (4, 5)
    assert layout.weights[2] == 1.2 and layout.words[1].weight == 1.2
    # tokens that do not match the prompt: words fall back to the decoded pieces
    other = layout_from_comfy_tokens([chunk], clip_tokenizer, prompt="something else")
    assert [w.text for w in other.words] == ["a", "dog", ",", "embedding:embedding0"]
    assert other.positions("dog") == (2,)
    with pytest.raises(ValueError, match="word ids"):
        layout_from_comfy_tokens([[(t, w) for t, w, _ in chunk]], clip_tokenizer, prompt="a")
