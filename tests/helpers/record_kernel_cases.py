"""Cases for the Triton recording kernel, run in a process of their own under ``TRITON_INTERPRET=1`` (Triton's
interpreter must be chosen before ``triton`` is imported; it runs the kernel on CPU tensors with numpy).

Each case records the same calls with ``kernel="triton"`` and ``kernel="torch"`` and computes an independent fp64
reference (softmax over all keys of ``scale * q . k + mask``, image rows, text columns, summed over the recorded
heads, context copies folded onto the prompt's tokens). Prints one JSON object: case -> errors.
"""

from __future__ import annotations

import json
import math
import os
import sys

import torch

from daam_core.engine import kernels
from daam_core.engine.geometry import PatchGrid
from daam_core.engine.recorder import AttentionRecorder, RecordFilter, Stream

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def reference(q, k, text, image, scale, mask, heads, rows, streams, tokens, n_streams):
    """fp64 sums ``[streams, N, T_max]``: q ``[B, H, L, D]``, k ``[B, Hk, L, D]``, mask broadcastable to
    ``[B, H, L, L]`` (additive or boolean); ``rows[i]`` is stream ``streams[i]``'s batch row."""
    q, k = q.double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.double()
    p = s.softmax(-1)[:, :, image[0]:image[1], text[0]:text[1]]
    p = p[:, list(heads)].sum(1)  # [B, N, T_call]
    t_call = text[1] - text[0]
    out = torch.zeros(n_streams, image[1] - image[0], max(tokens), dtype=torch.float64)
    for r, st in zip(rows, streams):
        t = tokens[st]
        fold = t_call // t if t_call % t == 0 else 1
        for c in range(fold):
            out[st, :, :t] += p[r, :, c * t:(c + 1) * t]
    return out


def errors(got, ref):
    """Largest elementwise relative error (denominator floored at 1e-6 of the largest value) and largest
    absolute one."""
    got, ref = got.double(), ref.double()
    floor = 1e-6 * ref.abs().max().item()
    rel = ((got - ref).abs() / ref.abs().clamp_min(floor)).max().item()
    return {"rel": rel, "abs": (got - ref).abs().max().item()}


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    return x


def run(kind, kernel, calls, n_streams, tokens, filt, grid, device="cpu"):
    rec = AttentionRecorder(filt)
    rec.kernel = kernel
    rec.joint_lse_kernel = False
    rec.begin(grid, [Stream(i, "cond", i) for i in range(n_streams)], tokens)
    allocs = []
    for rows_of_call, args, kw in calls:
        rec.set_call(rows_of_call, 0.5)
        (rec.record if kind == "cross" else rec.record_joint)(*_to(args, device), **_to(kw, device))
        allocs.append(rec.scratch_allocations)
    return rec.finish().sums["x"].cpu(), allocs


def cross_case(dtype, heads_sel=None, fold=False, cut=False, skip_row=False, steps=2, t=5, uniform=False):
    """Three rows: prompts of ``t``, ``2 t``, ``t`` tokens, keys ``2 t`` long (the short contexts repeated, as
    ComfyUI batches them) or ``2 t + 3`` (``cut``: extra keys, normaliser only); ``uniform``: three prompts of
    ``t`` tokens, keys ``t`` long (the kernel's one-tile softmax)."""
    g = torch.Generator().manual_seed(1)
    b, h, d, n = 3, 4, 8, 24
    tokens = [t, t, t] if uniform else [t, 2 * t, t]
    t_call = t if uniform else (2 * t + 3 if cut else 2 * t)
    rows = [2, None, 0] if skip_row else [2, 1, 0]  # batch row i -> stream rows[i]
    calls, refs = [], 0
    for _ in range(steps):
        q = torch.randn(b, n, h * d, generator=g).to(dtype)
        k = torch.randn(b, t_call, h * d, generator=g).to(dtype)
        if fold:  # rows of 5-token prompts repeat their context to 10
            k[0, t:2 * t] = k[0, :t]
        calls.append((rows, ("x", "down", q, k, h), {"scale": 0.3}))
        qh = q.view(b, n, h, d).transpose(1, 2)
        kh = k.view(b, t_call, h, d).transpose(1, 2)
        rec_rows = [i for i, s in enumerate(rows) if s is not None]
        refs = refs + reference(qh, kh, (0, t_call), (0, n), 0.3, None, heads_sel or range(h), rec_rows,
                                [rows[i] for i in rec_rows], tokens, 3)
    filt = RecordFilter(heads=tuple(heads_sel)) if heads_sel else None
    return calls, refs, 3, tokens, filt, (4, 6)


def joint_case(dtype, order="text_first", mask_kind=None, gqa=False, heads_sel=None, given_lse=False,
               skip_row=False, steps=2, t=9):
    """Two rows, ``t`` text and 12 image tokens and 3 extra ones (reference latents) in one sequence."""
    g = torch.Generator().manual_seed(2)
    b, h, d, n, extra = 2, 6, 16, 12, 3
    hk = 2 if gqa else h
    length = t + n + extra
    text, image = ((0, t), (t, t + n)) if order == "text_first" else ((n, n + t), (0, n))
    rows = [1, None] if skip_row else [1, 0]
    calls, refs = [], 0
    for _ in range(steps):
        q = (torch.randn(b, h, length, d, generator=g)).to(dtype)
        k = (torch.randn(b, hk, length, d, generator=g) * 1.5).to(dtype)
        mask = None
        if mask_kind == "additive":
            mask = (torch.randn(b, 1, length, length, generator=g) * 2).to(dtype)
            mask[..., 4] = -math.inf
        elif mask_kind == "bool":
            mask = torch.rand(length, length, generator=g) > 0.3
            mask |= torch.eye(length, dtype=torch.bool)
        m4 = None if mask is None else (mask[None, None] if mask.ndim == 2 else mask)
        lse = None
        if given_lse:
            s = q.double() @ k.double().repeat_interleave(h // hk, 1).transpose(-1, -2) * 0.2
            if m4 is not None:
                s = s.masked_fill(~m4, -math.inf) if m4.dtype == torch.bool else s + m4.double()
            lse = s.logsumexp(-1).float()
        calls.append((rows, ("x", "double", q, k, h), dict(text=text, image=image, scale=0.2, mask=mask, lse=lse)))
        rec_rows = [i for i, s in enumerate(rows) if s is not None]
        refs = refs + reference(q, k, text, image, 0.2, m4, heads_sel or range(h), rec_rows,
                                [rows[i] for i in rec_rows], [t, t], 2)
    filt = RecordFilter(heads=tuple(heads_sel)) if heads_sel else None
    return calls, refs, 2, [t, t], filt, PatchGrid((6, 8), 2)


def cases():
    for name, dt in DTYPES.items():
        yield f"cross-{name}", "cross", cross_case(dt)
        yield f"cross-heads-rows-{name}", "cross", cross_case(dt, heads_sel=(1, 3), skip_row=True)
        yield f"cross-fold-{name}", "cross", cross_case(dt, fold=True)
        yield f"cross-one-tile-{name}", "cross", cross_case(dt, uniform=True, t=7)
        yield f"cross-one-tile-heads-rows-{name}", "cross", cross_case(dt, uniform=True, t=7, heads_sel=(3, 0),
                                                                       skip_row=True)
        yield f"cross-cut-{name}", "cross", cross_case(dt, cut=True)
        yield f"joint-{name}", "joint", joint_case(dt)
        yield f"joint-image-first-additive-mask-{name}", "joint", joint_case(dt, "image_first", "additive")
        yield f"joint-gqa-heads-bool-mask-rows-{name}", "joint", joint_case(dt, mask_kind="bool", gqa=True,
                                                                            heads_sel=(0, 4, 5), skip_row=True)
        yield f"joint-given-lse-{name}", "joint", joint_case(dt, mask_kind="additive", given_lse=True, gqa=True)
    kernels.BLOCK_T_MAX = 16  # token tiles of 16: several tiles at small sizes (joint: the LSE-only pass)
    yield "joint-lse-pass-several-tiles-fp32", "joint", joint_case(torch.float32, mask_kind="additive", gqa=True,
                                                                   t=37)
    yield "cross-several-tiles-fp32", "cross", cross_case(torch.float32, fold=True, cut=True, t=18)
    yield "cross-several-tiles-heads-rows-bf16", "cross", cross_case(torch.bfloat16, heads_sel=(0, 2),
                                                                     skip_row=True, t=18)


def compare(device="cpu"):
    """Every case on ``device`` (CPU: the interpreter, ``kernel="triton"``; CUDA: the compiled kernel); the
    module's token tile width is restored afterwards."""
    torch.manual_seed(0)
    out = {}
    width = kernels.BLOCK_T_MAX
    try:
        for name, kind, (calls, ref, n_streams, tokens, filt, grid) in cases():
            tri, allocs = run(kind, "triton" if device == "cpu" else "auto", calls, n_streams, tokens, filt, grid,
                              device)
            tor, _ = run(kind, "torch", calls, n_streams, tokens, filt, grid, device)
            out[name] = {"triton_vs_fp64": errors(tri, ref), "torch_vs_fp64": errors(tor, ref),
                         "triton_vs_torch": errors(tri, tor), "scratch_allocations": allocs,
                         "ref_max": ref.abs().max().item()}
    finally:
        kernels.BLOCK_T_MAX = width
    return out


def main():
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (or call compare('cuda'))"
    print(json.dumps(compare("cpu")))


if __name__ == "__main__":
    sys.exit(main())
