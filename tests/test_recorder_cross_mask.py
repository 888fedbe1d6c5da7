"""A cross-attention call whose text keys carry the host's padding mask (LTXV): the recorded sums and per-head sums
are the masked softmax, checked against fp64 references; a mask that fits no call is an error naming it."""

import math

import pytest
import torch

from daam_core.engine.recorder import AttentionRecorder
from daam_core.engine.refine import RefineRecording, RefineSums
from daam_core.hosts.contract import cfg_rows, cfg_streams


def masked_softmax64(q, k, heads, mask):
    """Per-head probabilities ``[B, H, N, T]`` of ``q [B, N, H*d]`` over ``k [B, T, H*d]`` plus ``mask [B, T]``
    (additive) in float64."""
    b, n, c = q.shape
    d = c // heads
    qh = q.double().view(b, n, heads, d).transpose(1, 2)
    kh = k.double().view(b, k.shape[1], heads, d).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d) + mask.double()[:, None, None, :], dim=-1)


@pytest.mark.parametrize("kind", ["additive", "boolean"])
def test_masked_cross_attention_sums_equal_fp64_masked_softmax(kind):
    torch.manual_seed(4)
    heads, d, t = 2, 8, 9
    rec = AttentionRecorder()
    rec.extra = RefineSums(RefineRecording(head_sums=True))
    rec.begin((8, 12), cfg_streams(2, range(2), 2), [t] * 4)
    rec.set_call(cfg_rows(2, cfg=True), progress=0.5)
    q, k = torch.randn(4, 96, heads * d), torch.randn(4, t, heads * d)
    keep = torch.ones(4, t, dtype=torch.bool)
    keep[:, 6:] = False  # padding of every row
    keep[2:, 3:] = False  # the positive rows (uncond first): a shorter prompt
    additive = (keep.float() - 1) * torch.finfo(torch.float32).max  # LTXVModel's rule
    host = additive.view(4, 1, 1, t) if kind == "additive" else keep.view(4, 1, 1, t)
    rec.record("block.0", "block", q, k, heads, mask=host)
    out = rec.finish()
    p = masked_softmax64(q, k, heads, additive)
    want = torch.zeros(4, heads, 96, t, dtype=torch.float64)
    for row, stream in enumerate(cfg_rows(2, cfg=True)):
        want[stream] = p[row]
    err = (out.sums["block.0"].double() - want.sum(1)).abs().max().item()
    assert err <= 1e-5
    assert (out.sums["block.0"][:, :, 6:] == 0).all() and (out.sums["block.0"][:2, :, 3:] == 0).all()
    torch.testing.assert_close(out.extras["head_sums"]["block.0"].double(), want, atol=1e-5, rtol=0)
    unmasked = masked_softmax64(q, k, heads, torch.zeros(4, t)).sum(1)
    assert (unmasked - p.sum(1)).abs().max() > 0.1  # the mask is what makes them equal


def test_a_mask_that_fits_no_call_is_an_error_naming_it():
    rec = AttentionRecorder()
    rec.begin((8, 12), cfg_streams(1, range(1), 1), [9, 9])
    rec.set_call(cfg_rows(1, cfg=False), progress=0.5)
    q, k = torch.randn(1, 96, 16), torch.randn(1, 9, 16)
    with pytest.raises(ValueError, match=r"block.0: attention mask \(1, 1, 1, 7\) does not fit 96 queries over 9"):
        rec.record("block.0", "block", q, k, 2, mask=torch.zeros(1, 1, 1, 7))


@pytest.mark.parametrize("image_first", [True, False])
def test_a_joint_key_mask_of_one_row_reaches_every_query_chunk(image_first):
    """HunyuanVideo hands every joint call one ``[1, 1, L]`` additive row over the keys; with the image rows after
    the text, or cut into several chunks of queries, each chunk gets that row."""
    torch.manual_seed(5)
    heads, d, t, n = 2, 8, 7, 96
    rec = AttentionRecorder()
    rec.joint_chunk_elements = heads * t * 10  # chunks of at most 10 queries
    rec.begin((8, 12), cfg_streams(1, range(1), 1), [t, t])
    rec.set_call(cfg_rows(1, cfg=False), progress=0.5)
    q, k = torch.randn(1, t + n, heads * d), torch.randn(1, t + n, heads * d)
    text, image = ((n, n + t), (0, n)) if image_first else ((0, t), (t, t + n))
    keep = torch.ones(t + n, dtype=torch.bool)
    keep[text[1] - 2:text[1]] = False  # the text's last two tokens are padding
    row = ((keep.float() - 1) * torch.finfo(torch.float32).max).view(1, 1, t + n)
    rec.record_joint("double.0", "double", q, k, heads, text=text, image=image, mask=row)
    got = rec.finish().sums["double.0"]
    p = masked_softmax64(q, k, heads, row[0])[0].sum(0)  # [L, L]
    want = p[image[0]:image[1], text[0]:text[1]]
    assert (got[0].double() - want).abs().max().item() <= 1e-5
    assert got[0, :, t - 2:].abs().max() == 0
