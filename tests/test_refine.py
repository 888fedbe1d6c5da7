"""Refinements of the word maps (issue 24): self-attention sums and per-head sums against fp64 softmax references,
propagation and head weighting against planted structure, the image bit-identical, memory as the formulas say."""

import math

import pytest
import torch

from daam_core.engine import refine
from daam_core.engine.recorder import AttentionRecorder, Stream
from daam_core.hosts.contract import cfg_rows, cfg_streams
from daam_core.engine.refine import RefineRecording, RefineSums
from daam_core.engine.trace import AttentionTrace, load_trace, save_trace
from daam_core.engine.geometry import LayerInfo
from daam_core.shapes import model as shapes_model
from daam_core.text.layout import TokenLayout


def softmax64(q, k, heads):
    """Per-head probabilities ``[B, H, N, T]`` of ``q [B, N, H*d]`` over ``k [B, T, Hk*d]`` in float64."""
    b, n, c = q.shape
    d = c // heads
    qh = q.double().view(b, n, heads, d).transpose(1, 2)
    kh = k.double().view(b, k.shape[1], -1, d).transpose(1, 2)
    kh = kh.repeat_interleave(heads // kh.shape[1], dim=1)
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)


def recorder(options, n_images=2, tokens=(7, 7, 7, 7), latent=(8, 12)):
    rec = AttentionRecorder()
    rec.extra = RefineSums(options)
    rec.begin(latent, cfg_streams(n_images, range(n_images), n_images), list(tokens))
    return rec


def assert_close_rel(got, want, rel=1e-5):
    err = (got.double() - want).abs().max().item()
    assert err <= rel * want.abs().max().item(), (err, want.abs().max().item())


def test_self_attention_sums_equal_fp64_softmax_over_calls_rows_and_resolutions():
    torch.manual_seed(0)
    heads, d = 4, 8
    rec = recorder(RefineRecording(self_attention=True, max_queries=96))
    want = {"8x12": torch.zeros(4, 96, 96, dtype=torch.float64), "4x6": torch.zeros(4, 24, 24, dtype=torch.float64)}
    rows = cfg_rows(2, cfg=True)  # uncond first: rows 0, 1 -> streams 2, 3
    for call in range(3):
        rec.set_call(rows if call < 2 else [None, 3, None, 1], progress=0.5)  # last call: two rows, reordered
        for n, key in ((96, "8x12"), (24, "4x6"), (24, "4x6")):
            q, k = torch.randn(4, n, heads * d), torch.randn(4, n, heads * d)
            rec.extra.record_self(rec, "down", q, k, heads)
            p = softmax64(q, k, heads).sum(1)
            for row, stream in enumerate(rec._call.rows):
                if stream is not None:
                    want[key][stream] += p[row]
        rec.extra.record_self(rec, "down", torch.randn(4, 384, heads * d), torch.randn(4, 384, heads * d), heads)
    out = rec.finish().extras
    assert set(out["self_sums"]) == {"8x12", "4x6"}  # 384 queries (16x24) is above max_queries: not kept
    assert out["self_calls"] == {"8x12": 3, "4x6": 6}
    for key, w in want.items():
        assert_close_rel(out["self_sums"][key], w)
    # each recorded row of a call adds one unit per query and head: row sums count calls x heads
    assert torch.allclose(out["self_sums"]["4x6"][3].sum(-1), torch.full((24,), 6.0 * heads), rtol=1e-5)


def test_self_attention_with_grouped_query_keys_and_the_window():
    torch.manual_seed(1)
    rec = recorder(RefineRecording(self_attention=True), n_images=1, tokens=(5, 5))
    rec.set_call([1, 0], progress=0.5)
    q, k = torch.randn(2, 96, 4 * 8), torch.randn(2, 96, 2 * 8)  # 4 query heads read 2 key heads
    rec.extra.record_self(rec, "up", q, k, 4)
    rec.skip_call()  # outside the window: nothing
    rec.extra.record_self(rec, "up", q, k, 4)
    out = rec.finish().extras
    want = softmax64(q, k, 4).sum(1)
    assert out["self_calls"] == {"8x12": 1}
    assert_close_rel(out["self_sums"]["8x12"], want[[1, 0]])


def test_head_sums_equal_fp64_softmax_and_add_up_to_the_plain_sums():
    torch.manual_seed(2)
    heads, d = 4, 8
    rec = recorder(RefineRecording(head_sums=True), tokens=(7, 7, 5, 5))
    rec.set_call(cfg_rows(2, cfg=True), progress=0.5)
    q, k = torch.randn(4, 96, heads * d), torch.randn(4, 7, heads * d)
    rec.record("down.0", "down", q, k, heads)
    q2, k2 = torch.randn(4, 24, heads * d), torch.randn(4, 14, 2 * d)  # 14 keys = two copies of 7; GQA keys
    rec.record("down.1", "down", q2, k2, heads)
    out = rec.finish()
    hs = out.extras["head_sums"]
    p = softmax64(q, k, heads)
    want = torch.zeros(4, heads, 96, 7, dtype=torch.float64)
    for row, stream in enumerate(cfg_rows(2, cfg=True)):
        t = 7 if stream < 2 else 5  # the negative prompts have 5 tokens: keys past them only normalise
        want[stream, :, :, :t] = p[row, :, :, :t]
    assert_close_rel(hs["down.0"], want)
    p2 = softmax64(q2, k2, heads)
    want2 = torch.zeros(4, heads, 24, 7, dtype=torch.float64)
    for row, stream in enumerate(cfg_rows(2, cfg=True)):
        t = 7 if stream < 2 else 5
        if t == 7:
            want2[stream] = p2[row].reshape(heads, 24, 2, 7).sum(2)
        else:
            want2[stream, :, :, :5] = p2[row, :, :, :5]  # 14 is no multiple of 5: extra keys only normalise
    assert_close_rel(hs["down.1"], want2)
    for name in ("down.0", "down.1"):
        assert torch.allclose(hs[name].sum(1), out.sums[name], rtol=1e-5, atol=1e-6)


def test_propagation_spreads_a_map_over_its_planted_segment():
    # planted self-attention on a 4x4 grid: the left half attends uniformly to itself, the right half to itself
    n = 16
    left = torch.tensor([x % 4 < 2 for x in range(n)])
    p = (left[:, None] == left[None, :]).float() * 3.0  # three calls' worth, unnormalised
    a = refine.propagation_matrix(p)
    assert torch.allclose(a.sum(-1), torch.ones(n))
    m = torch.zeros(2, n)
    m[0, 0] = 8.0  # one hot pixel in the left segment
    m[1] = torch.arange(n, dtype=torch.float32)
    out = refine.propagate(m, a, 1)
    want0 = torch.where(left, 1.0, 0.0)  # 8 / 8 pixels of the segment
    want1 = torch.where(left, m[1][left].mean(), m[1][~left].mean())
    assert torch.allclose(out[0], want0) and torch.allclose(out[1], want1)
    assert torch.allclose(refine.propagate(m, a, 3), out)  # block averaging is idempotent
    assert torch.equal(refine.propagate(m, a, 0), m)


def test_head_weighting_prefers_the_concentrated_head():
    # head 0: all of the word's mass on pixel 5; head 1: uniform; head 2: nothing
    maps = torch.zeros(3, 16)
    maps[0, 5] = 0.8
    maps[1] = 0.05
    w = refine.head_weights(maps, 1.0)
    # IPR: head 0 = 16 * 0.64 / 0.64 = 16, head 1 = 16 * 16 * 0.0025 / 0.64 = 1, head 2 = 0 (no mass)
    assert torch.allclose(w, torch.tensor([3 * 16 / 17, 3 * 1 / 17, 0.0]))
    assert torch.equal(refine.head_weights(maps, 0.0), torch.ones(3))  # power 0: plain DAAM's equal heads
    assert torch.allclose(refine.head_weights(maps, 2.0), torch.tensor([3 * 256 / 257, 3 / 257, 0.0]))


def hand_trace(head_sums, self_sums=None):
    """A one-layer trace on a 4x4 grid over the prompt "a dog" (per-head sums of one call; plain sums = their
    head sum)."""
    from daam_core.hosts.diffusers.tokenizers import clip_tokenizer
    from daam_core.text.tokenize import tokenize

    tok = clip_tokenizer()
    layout = tokenize("a dog", tok, syntax="plain", chunked=False, max_length=tok.model_max_length,
                      pad_with_end=True)
    t = layout.length
    heads = head_sums.shape[0]
    hs = torch.full((1, heads, 16, t), 0.0)
    dog = layout.positions("dog")[0]
    hs[0, :, :, dog] = head_sums
    hs[0, :, :, 0] = 1.0 - head_sums
    layer = LayerInfo(name="l0", part="down", kind="cross", order=0, factor=1, hw=(4, 4), heads=heads)
    return AttentionTrace(sums={"l0": hs.sum(1)}, layers={"l0": layer}, calls={"l0": 1},
                          streams=[Stream(0, "cond", 0)], layouts=[layout], latent_hw=(4, 4), image_hw=(4, 4),
                          recorded_branches=("cond",), self_sums={} if self_sums is None else {"4x4": self_sums},
                          self_calls={} if self_sums is None else {"4x4": 1}, head_sums={"l0": hs})


def test_word_maps_refined_against_hand_computed_maps(tmp_path):
    maps = torch.zeros(2, 16)
    maps[0, 5] = 0.8  # the concentrated head
    maps[1] = torch.linspace(0.0, 0.3, 16)  # a diffuse one
    left = torch.tensor([x % 4 < 2 for x in range(16)])
    tr = hand_trace(maps, ((left[:, None] == left[None, :]).float())[None])
    plain = tr.word_maps("dog", image=0, normalize="none", upsample="nearest")[0]
    assert torch.allclose(plain.flatten(), maps.sum(0))
    # head_power 0 and propagate 0 are plain DAAM, bit for bit
    assert torch.equal(tr.word_maps("dog", image=0, head_power=0.0, propagate=0)[0], tr.word_maps("dog", image=0)[0])
    w = refine.head_weights(maps, 1.0)
    weighted = tr.word_maps("dog", image=0, normalize="none", upsample="nearest", head_power=1.0)[0]
    assert torch.allclose(weighted.flatten(), (w[:, None] * maps).sum(0))
    prop = tr.word_maps("dog", image=0, normalize="none", upsample="nearest", propagate=1)[0].flatten()
    s = maps.sum(0)
    assert torch.allclose(prop, torch.where(left, s[left].mean(), s[~left].mean()))
    both = tr.word_maps("dog", image=0, normalize="none", upsample="nearest", propagate=2, head_power=1.0)[0]
    ws = (w[:, None] * maps).sum(0)
    assert torch.allclose(both.flatten(), torch.where(left, ws[left].mean(), ws[~left].mean()))
    # the sums survive a save and a load
    save_trace(tr, tmp_path / "t")
    back = load_trace(tmp_path / "t.safetensors")
    assert torch.equal(back.self_sums["4x4"], tr.self_sums["4x4"]) and back.self_calls == {"4x4": 1}
    assert torch.equal(back.head_sums["l0"], tr.head_sums["l0"])
    assert torch.equal(back.word_maps("dog", image=0, propagate=2, head_power=1.0),
                       tr.word_maps("dog", image=0, propagate=2, head_power=1.0))


def test_refinements_without_their_sums_are_clear_errors():
    tr = hand_trace(torch.full((2, 16), 0.1))
    tr.head_sums = {}
    with pytest.raises(ValueError, match="self-attention sums"):
        tr.word_maps("dog", propagate=1)
    with pytest.raises(ValueError, match="per-head sums"):
        tr.word_maps("dog", head_power=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        tr.word_maps("dog", propagate=-1)


@pytest.mark.skipif(not shapes_model.available(), reason="no shapes model shipped")
def test_shapes_pipeline_image_bit_identical_and_self_sums_exact():
    """diffusers: the image with both refinements recorded is the untraced one bit for bit, and the self-attention
    sums are the fp64 softmax of the attn1 modules' own q and k; memory as the formulas say."""
    from daam_core import trace

    pipe = shapes_model.load_shapes_pipeline()
    prompt = "a red circle on the left and a blue square on the right"

    def draw():
        return pipe(prompt, num_inference_steps=3, guidance_scale=4.0, output_type="np",
                    generator=torch.Generator().manual_seed(3)).images[0]

    captured = {}  # resolution -> fp64 reference summed over the attn1 modules and calls
    hooks = []
    for name, m in pipe.unet.named_modules():
        if name.endswith("attn1"):
            def keep(mod, args, out, name=name, which="q"):
                captured.setdefault(name, {}).setdefault(which, []).append(out.detach().clone())
            hooks += [m.to_q.register_forward_hook(keep),
                      m.to_k.register_forward_hook(lambda mod, a, o, name=name: keep(mod, a, o, name, "k"))]
    with torch.no_grad():
        plain = draw()
        captured.clear()
        with trace(pipe, refine=RefineRecording(self_attention=True, head_sums=True)) as tc:
            refined = draw()
    for h in hooks:
        h.remove()
    assert (plain == refined).all()
    tr = tc.result()
    want = {}
    for name, qk in captured.items():
        heads = pipe.unet.get_submodule(name).heads
        for q, k in zip(qk["q"], qk["k"]):
            side = int(math.isqrt(q.shape[1]))
            p = softmax64(q, k, heads).sum(1)  # rows: uncond, cond (diffusers' CFG order)
            key = f"{side}x{side}"
            want[key] = want.get(key, 0) + p[[1, 0]]
    assert set(tr.self_sums) == set(want) == {"16x16", "8x8"}
    for key in want:
        assert_close_rel(tr.self_sums[key], want[key])
    assert tr.self_calls == {"16x16": 3 * 3, "8x8": 4 * 3}  # attn1 modules at that size x UNet calls
    for name in tr.sums:
        assert torch.allclose(tr.head_sums[name].sum(1), tr.sums[name], rtol=1e-5, atol=1e-5)
    assert sum(v.nbytes for v in tr.self_sums.values()) == refine.self_attention_bytes(2, [(16, 16), (8, 8)])
    layers = [(*tr.layers[n].hw, tr.layers[n].heads) for n in tr.sums]
    assert sum(v.nbytes for v in tr.head_sums.values()) == refine.head_sum_bytes(2, layers, tr.layout(0).length)


def two_layer_trace(fine, coarse, self_fine, self_coarse):
    """A trace over "a dog and a cat" with a 4x4 layer and a 2x2 layer: ``fine [2, 16]`` / ``coarse [2, 4]`` are the
    dog's and the cat's summed probabilities (one call each); the start token takes the rest."""
    from daam_core.hosts.diffusers.tokenizers import clip_tokenizer
    from daam_core.text.tokenize import tokenize

    tok = clip_tokenizer()
    layout = tokenize("a dog and a cat", tok, syntax="plain", chunked=False, max_length=tok.model_max_length,
                      pad_with_end=True)
    dog, cat = layout.positions("dog")[0], layout.positions("cat")[0]
    sums, layers = {}, {}
    for name, m, hw, factor in (("fine", fine, (4, 4), 1), ("coarse", coarse, (2, 2), 2)):
        s = torch.zeros(1, hw[0] * hw[1], layout.length)
        s[0, :, dog], s[0, :, cat] = m[0], m[1]
        s[0, :, 0] = 1.0 - m.sum(0)
        sums[name] = s
        layers[name] = LayerInfo(name=name, part="down", kind="cross", order=factor, factor=factor, hw=hw, heads=1)
    return AttentionTrace(sums=sums, layers=layers, calls={"fine": 1, "coarse": 1}, streams=[Stream(0, "cond", 0)],
                          layouts=[layout], latent_hw=(4, 4), image_hw=(4, 4), recorded_branches=("cond",),
                          self_sums={"4x4": self_fine[None], "2x2": self_coarse[None]},
                          self_calls={"4x4": 1, "2x2": 1})


def test_finest_propagation_sums_every_layer_at_the_finest_resolution_then_spreads_once():
    torch.manual_seed(3)
    fine, coarse = torch.rand(2, 16) * 0.3, torch.rand(2, 4) * 0.3
    left = torch.tensor([x % 4 < 2 for x in range(16)])
    self_fine = (left[:, None] == left[None, :]).float() * 2.0  # planted: each half attends to itself
    self_coarse = torch.eye(4) + 0.5  # any matrix: "finest" never uses it
    tr = two_layer_trace(fine, coarse, self_fine, self_coarse)
    got = tr.word_maps(["dog", "cat"], image=0, normalize="none", upsample="nearest", propagate=1,
                       propagate_at="finest").flatten(1)
    # the reference by hand: the 2x2 map repeated over 2x2 blocks, added to the 4x4 map, over 2 calls; then each
    # half takes its own mean (the planted self-attention)
    blocks = torch.tensor([(y // 2) * 2 + (x // 2) for y in range(4) for x in range(4)])
    summed = (fine + coarse[:, blocks]) / 2
    want = torch.stack([torch.where(left, m[left].mean(), m[~left].mean()) for m in summed])
    assert torch.allclose(got, want, atol=1e-7)
    each = tr.word_maps(["dog", "cat"], image=0, normalize="none", upsample="nearest", propagate=1).flatten(1)
    a2 = self_coarse / self_coarse.sum(-1, keepdim=True)
    want_each = torch.stack([torch.where(left, f[left].mean(), f[~left].mean()) for f in fine])
    want_each = (want_each + (coarse @ a2.t())[:, blocks]) / 2  # each resolution with its own self-attention
    assert torch.allclose(each, want_each, atol=1e-7)
    both = tr.word_maps(["dog", "cat"], image=0, normalize="none", upsample="nearest", propagate=1,
                        propagate_at="both").flatten(1)
    want_both = torch.stack([torch.where(left, m[left].mean(), m[~left].mean()) for m in want_each])
    assert torch.allclose(both, want_both, atol=1e-7)  # each resolution first, then the finest once more
    with pytest.raises(ValueError, match="propagate_at must be one of"):
        tr.word_maps("dog", propagate=1, propagate_at="coarsest")


def test_exclusive_words_keep_the_pixels_where_they_attend_most_against_their_own_mean():
    # the dog attends strongly on the left and a little on the right; the cat little overall but most on the right.
    # By raw probability the dog would take the right half too; against their own means the cat owns it.
    left = torch.tensor([x % 4 < 2 for x in range(16)])
    dog = torch.where(left, 0.6, 0.15)
    cat = torch.where(left, 0.02, 0.12)
    fine = torch.stack([dog, cat])
    coarse = torch.zeros(2, 4)
    eye = torch.eye(16)
    tr = two_layer_trace(fine, coarse, eye, torch.eye(4))
    plain = tr.word_maps(["dog", "cat"], image=0, normalize="none", upsample="nearest").double()
    rel = plain / plain.flatten(1).mean(1)[:, None, None]
    owner = rel.argmax(0)  # the reference rule, by hand: who is most above its own mean
    assert torch.equal(owner.flatten(), (~left).long())  # the planted halves
    excl = tr.word_maps(["dog", "cat"], image=0, upsample="nearest", exclusive=True)
    normal = tr.word_maps(["dog", "cat"], image=0, upsample="nearest")
    for j in range(2):
        kept = normal[j] * (owner == j)
        assert torch.allclose(excl[j], kept / kept.max())
    masks = (excl >= 0.4).float()
    assert masks[0].sum() > 0 and masks[1].sum() > 0 and (masks[0] * masks[1]).sum() == 0
    # rivals: the dog against the cat is the dog's exclusive map; "dog" alone with no rival is unchanged
    assert torch.equal(tr.word_maps("dog", image=0, upsample="nearest", rivals=["cat"])[0], excl[0])
    assert torch.equal(tr.word_maps("dog", image=0, upsample="nearest", rivals=[])[0], normal[0])
    # without exclusive the words do not compete with each other, only with the rivals
    both = tr.word_maps(["dog", "a"], image=0, upsample="nearest", rivals=["cat"])
    assert torch.equal(both[0], excl[0])
    assert torch.equal(both[1], tr.word_maps("a", image=0, upsample="nearest", rivals=["cat"])[0])
    # a word the model never attends to owns nothing (a zero map, not an error)
    none = two_layer_trace(torch.stack([dog, torch.zeros(16)]), coarse, eye, torch.eye(4))
    z = none.word_maps(["dog", "cat"], image=0, upsample="nearest", exclusive=True)
    assert torch.equal(z[1], torch.zeros(4, 4)) and torch.allclose(z[0], none.word_maps("dog", image=0,
                                                                                         upsample="nearest")[0])
    with pytest.raises(Exception, match="horse"):
        tr.word_maps("dog", rivals=["horse"])
