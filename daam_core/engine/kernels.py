"""The recording kernel: head-summed image->text attention probabilities added into running fp32 sums.

Both kinds of recorded call (UNet cross-attention: softmax over the text keys; joint attention of SD3 / Flux:
``exp(s - lse)`` over the text span) come here, one way per device:

- :func:`record_triton` (CUDA; on the CPU only under ``TRITON_INTERPRET=1``, for tests): **one launch per
  recorded call**. A program owns one recorded batch row, ``BLOCK_N`` queries and ``BLOCK_T`` output tokens. For
  each selected head it computes ``s = scale * q . k`` in fp32 (``tl.dot``, IEEE for fp32 inputs, never TF32),
  adds the mask, turns it into probabilities with the normaliser (``exp(s - lse)``; the ``lse`` is the host
  kernel's, or computed by an online max / sum pass over the normaliser's keys in the same program, without V),
  sums the repeated context copies (``fold``) and the heads in registers, and adds the ``[BLOCK_N, BLOCK_T]`` tile
  into the running sum of the row's stream (``tl.atomic_add``). Nothing but the sum is written. When the
  normaliser must be computed over all ``L`` keys and the text spans several token tiles, an LSE-only launch of
  the same kernel writes ``lse`` first (into a reused buffer), so the ``L`` keys are scored once, not once a tile.
  A cross call whose keys fit one tile and need no folding (the usual UNet call) scores each head once and takes
  a plain row softmax of the tile.
- :func:`record_torch` (CPU, and any device without Triton): chunks of queries scored with ``baddbmm`` /
  ``matmul`` into reused work buffers, softmax or ``exp(s - lse)`` in place, the head sum, then per token-count
  group a plain add (consecutive streams) or ``index_add_``.

GPU timings of :func:`record_triton` are not measured yet (written without a GPU; checked on the CPU with the
Triton interpreter against the torch path and an fp64 softmax).

Shapes: ``B`` batch rows, ``H`` query heads, ``Hk`` key heads (query head ``h`` reads key head ``h // (H // Hk)``),
``N`` queries recorded, ``L`` keys, ``D`` head dim; the running sum is ``[streams, N, T_max]`` fp32.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch

try:  # optional: the torch path needs none of it
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure (missing, broken install) means "no Triton"
    triton = None
    tl = None

HAVE_TRITON = triton is not None
BLOCK_T_MAX = 128  # widest token tile (tests lower it to reach several tiles at small sizes)
INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"


@dataclass(frozen=True)
class Group:
    """Recorded rows of one prompt token count.

    Attributes
    ----------
    select : Tensor or None
        Positions of the group's rows among the recorded rows (None: all of them).
    target : Tensor long
        Stream index of each row of the group.
    span : (int, int) or None
        ``[start, stop)`` when the targets are consecutive streams (a plain add instead of ``index_add_``).
    tokens : int
        The prompt's token count ``t``.
    fold : int
        Copies of the context to sum: key column ``c * t + j`` adds into token ``j`` for ``c < fold``; keys past
        ``fold * t`` are only part of the normaliser.
    """

    select: torch.Tensor | None
    target: torch.Tensor
    span: tuple[int, int] | None
    tokens: int
    fold: int


@dataclass(frozen=True)
class Table:
    """The kernel's per-row view of a plan, int32 on the device: batch row, stream, token count, fold copies."""

    rows: torch.Tensor
    target: torch.Tensor
    tokens: torch.Tensor
    fold: torch.Tensor
    t_max: int
    fold_max: int

    @staticmethod
    def build(batch_rows, streams, tokens, folds, device) -> "Table":
        as_i32 = lambda v: torch.tensor(list(v), dtype=torch.int32, device=device)  # noqa: E731
        return Table(as_i32(batch_rows), as_i32(streams), as_i32(tokens), as_i32(folds), max(tokens), max(folds))


def usable(q: torch.Tensor, k: torch.Tensor, mode: str) -> bool:
    """Whether :func:`record_triton` runs these inputs: ``mode`` ``"auto"`` = CUDA with Triton, ``"triton"`` =
    also CPU tensors under ``TRITON_INTERPRET=1``, ``"torch"`` = never."""
    if mode == "torch" or not HAVE_TRITON or q.dtype != k.dtype:
        return False
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if q.is_cuda:
        return True
    return mode == "triton" and INTERPRET and q.device.type == "cpu"


# -- Triton ----------------------------------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _scores(qb, kb, offs_n, offs_k, n_ok, k_ok, sq_n, sq_d, sk_l, sk_d, D,
                BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        """``q[offs_n] . k[offs_k]`` over D, fp32 ``[BLOCK_N, BLOCK_T]`` (zero where out of range)."""
        s = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            qt = tl.load(qb + offs_n[:, None] * sq_n + offs_d[None, :] * sq_d,
                         mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            kt = tl.load(kb + offs_k[None, :] * sk_l + offs_d[:, None] * sk_d,
                         mask=k_ok[None, :] & d_ok[:, None], other=0.0)
            if IEEE:  # fp32 inputs (or upcast ones): exact products, fp32 sums, never TF32
                s = tl.dot(qt.to(tl.float32), kt.to(tl.float32), s, input_precision="ieee")
            else:
                s = tl.dot(qt, kt, s)
        return s

    @triton.jit
    def _logits(qb, kb, mb, offs_n, offs_k, n_ok, k_ok, scale, sq_n, sq_d, sk_l, sk_d, sm_n, sm_l, D,
                MASK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                IEEE: tl.constexpr):
        """``scale * q . k + mask``, ``-inf`` for keys out of range or masked out."""
        s = _scores(qb, kb, offs_n, offs_k, n_ok, k_ok, sq_n, sq_d, sk_l, sk_d, D,
                    BLOCK_N, BLOCK_T, BLOCK_D, IEEE) * scale
        if MASK != 0:
            m = tl.load(mb + offs_n[:, None] * sm_n + offs_k[None, :] * sm_l,
                        mask=n_ok[:, None] & k_ok[None, :], other=0)
            if MASK == 1:
                s = s + m.to(tl.float32)
            else:
                s = tl.where(m != 0, s, float("-inf"))
        return tl.where(k_ok[None, :], s, float("-inf"))

    @triton.jit
    def _text_probs(total, lse, qb, kb, mb, lb, offs_n, offs_t, n_ok, t_ok, t, fold, KEY0, scale,
                    sq_n, sq_d, sk_l, sk_d, sm_n, sm_l, D, MASK: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, LSE_ONLY: tl.constexpr):
        """``total + sum over context copies of exp(logits - lse)`` on the tile's tokens (LSE_ONLY: store lse)."""
        if LSE_ONLY:
            tl.store(lb, lse, mask=n_ok)
        else:
            keep = n_ok[:, None] & t_ok[None, :]
            for c in range(fold):  # repeated context copies land on the same tokens
                s = _logits(qb, kb, mb, offs_n, KEY0 + c * t + offs_t, n_ok, t_ok, scale, sq_n, sq_d, sk_l, sk_d,
                            sm_n, sm_l, D, MASK, BLOCK_N, BLOCK_T, BLOCK_D, IEEE)
                total += tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
        return total

    @triton.jit
    def _record_kernel(q_ptr, k_ptr, acc_ptr, lse_ptr, mask_ptr,
                       rows_ptr, tgt_ptr, tok_ptr, fold_ptr, heads_ptr,
                       sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_l, sk_d, sa_s, sa_n, sa_t,
                       sl_b, sl_h, sl_n, sm_b, sm_h, sm_n, sm_l,
                       N, D, HS, GROUP, KEY0, NK0, NK1, scale,
                       BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                       NORM: tl.constexpr, MASK: tl.constexpr, LSE_ONLY: tl.constexpr, IEEE: tl.constexpr,
                       ONE_TILE: tl.constexpr):
        """Grid ``(rows * cdiv(N, BLOCK_N), cdiv(T_max, BLOCK_T))``. NORM 0: ``lse`` given; 1: computed here over
        keys ``[NK0, NK1)``. MASK 0: none, 1: additive, 2: boolean (nonzero = attend). LSE_ONLY: write ``lse``.
        ONE_TILE (cross-attention whose keys fit one tile, no context copies): the softmax of that tile, one
        score product per head."""
        pid = tl.program_id(0)
        n_blocks = tl.cdiv(N, BLOCK_N)
        r = pid // n_blocks
        offs_n = (pid % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        row = tl.load(rows_ptr + r).to(tl.int64)
        t = tl.load(tok_ptr + r)
        fold = tl.load(fold_ptr + r)
        offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = offs_t < t
        total = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
        for i in range(HS):
            h = tl.load(heads_ptr + i).to(tl.int64)
            qb = q_ptr + row * sq_b + h * sq_h
            kb = k_ptr + row * sk_b + (h // GROUP) * sk_h
            mb = mask_ptr + row * sm_b + h * sm_h
            lb = lse_ptr + row * sl_b + h * sl_h + offs_n * sl_n
            if ONE_TILE:  # the normaliser's keys are this tile's: one product, a plain row softmax
                s = _logits(qb, kb, mb, offs_n, KEY0 + offs_t, n_ok, offs_t < NK1 - NK0, scale, sq_n, sq_d,
                            sk_l, sk_d, sm_n, sm_l, D, MASK, BLOCK_N, BLOCK_T, BLOCK_D, IEEE)
                top = tl.max(s, 1)
                e = tl.exp(s - tl.where(top == float("-inf"), 0.0, top)[:, None])
                total += tl.where(n_ok[:, None] & t_ok[None, :], e / tl.sum(e, 1)[:, None], 0.0)
            elif NORM == 1:  # online max / sum over the normaliser's keys, no V
                m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
                l_i = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for j0 in range(NK0, NK1, BLOCK_T):
                    offs_k = j0 + tl.arange(0, BLOCK_T)
                    s = _logits(qb, kb, mb, offs_n, offs_k, n_ok, offs_k < NK1, scale, sq_n, sq_d, sk_l, sk_d,
                                sm_n, sm_l, D, MASK, BLOCK_N, BLOCK_T, BLOCK_D, IEEE)
                    m_new = tl.maximum(m_i, tl.max(s, 1))
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
                    m_i = m_new
                lse = m_i + tl.log(l_i)
                total = _text_probs(total, lse, qb, kb, mb, lb, offs_n, offs_t, n_ok, t_ok, t, fold, KEY0, scale,
                                    sq_n, sq_d, sk_l, sk_d, sm_n, sm_l, D, MASK, BLOCK_N, BLOCK_T, BLOCK_D, IEEE,
                                    LSE_ONLY)
            else:
                lse = tl.load(lb, mask=n_ok, other=0.0).to(tl.float32)
                total = _text_probs(total, lse, qb, kb, mb, lb, offs_n, offs_t, n_ok, t_ok, t, fold, KEY0, scale,
                                    sq_n, sq_d, sk_l, sk_d, sm_n, sm_l, D, MASK, BLOCK_N, BLOCK_T, BLOCK_D, IEEE,
                                    LSE_ONLY)
        if not LSE_ONLY:
            tgt = tl.load(tgt_ptr + r).to(tl.int64)
            tl.atomic_add(acc_ptr + tgt * sa_s + offs_n[:, None] * sa_n + offs_t[None, :] * sa_t, total,
                          mask=n_ok[:, None] & t_ok[None, :])


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


def _strides(x: torch.Tensor | None, n: int) -> tuple[int, ...]:
    """Strides of ``x`` (0 on broadcast axes of size 1), or ``n`` zeros when absent."""
    if x is None:
        return (0,) * n
    return tuple(0 if size == 1 else st for size, st in zip(x.shape, x.stride()))


def record_triton(q: torch.Tensor, k: torch.Tensor, acc: torch.Tensor, table: Table, heads: torch.Tensor,
                  scale: float, text: tuple[int, int], *, normaliser: tuple[int, int] | None,
                  lse: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                  lse_buffer: Callable[[tuple[int, ...]], torch.Tensor] | None = None,
                  block_n: int = 64) -> None:
    """Add one call's head-summed probabilities into ``acc`` with the Triton kernel (no host synchronisation).

    Parameters
    ----------
    q : Tensor ``[B, H, N, D]``
        The recorded queries (any strides; the image queries of a joint sequence).
    k : Tensor ``[B, Hk, L, D]``
        All keys (any strides), same dtype as ``q``.
    acc : Tensor ``[streams, N, T_max]`` fp32
        The running sum (any strides).
    table : Table
        Recorded rows: batch row, target stream, token count ``t`` and context copies of each.
    heads : Tensor int32 ``[Hs]``
        Query heads to sum.
    scale : float
    text : (int, int)
        ``[start, stop)`` of the recorded keys on the key axis (copy ``c`` of row ``r`` is at
        ``start + c * t_r``).
    normaliser : (int, int) or None
        Keys of the softmax when computed here (cross-attention: the text keys; joint without ``lse``: all
        ``L``); None when ``lse`` is given.
    lse : Tensor ``[B, H, N]``, optional
        Log-sum-exp of ``scale * q . k + mask`` over all keys (fp32, any strides).
    mask : Tensor ``[B or 1, H or 1, N, L]``, optional
        Additive (float) or boolean (True = attend) mask rows of the recorded queries.
    lse_buffer : callable ``shape -> Tensor``, optional
        A reused fp32 buffer for the LSE-only pass (needed when ``normaliser`` spans several token tiles).
    """
    b, h, n, d = q.shape
    group = h // k.shape[1]
    t_max = table.t_max
    nk0, nk1 = normaliser if normaliser is not None else (0, 0)
    one_tile = (lse is None and (nk0, nk1) == tuple(text) and table.fold_max == 1
                and nk1 - nk0 <= BLOCK_T_MAX)
    block_t = _pow2(nk1 - nk0 if one_tile else t_max, 16, BLOCK_T_MAX)
    block_d = _pow2(d, 16, 64)
    block_n = _pow2(min(block_n, n), 16, block_n)
    mode = 0 if mask is None else (2 if mask.dtype == torch.bool else 1)
    m = mask.view(torch.uint8) if mode == 2 else mask
    # Triton's interpreter gets bf16 dot products wrong (3.8): there, bf16 tiles are upcast (same exact products)
    ieee = q.dtype == torch.float32 or (INTERPRET and q.dtype == torch.bfloat16)
    rows = table.rows.shape[0]
    common = dict(BLOCK_N=block_n, BLOCK_T=block_t, BLOCK_D=block_d, MASK=mode, IEEE=ieee, num_warps=4)
    norm = 0 if lse is not None else 1
    if one_tile:
        _launch(q, k, acc, lse, m, table, heads, group, text[0], nk0, nk1, scale, (rows * triton.cdiv(n, block_n), 1),
                norm=1, lse_only=False, one_tile=True, **common)
        return
    if norm == 1 and triton.cdiv(t_max, block_t) > 1 and (nk1 - nk0) > t_max:
        # several token tiles: one LSE-only pass instead of one normaliser pass per tile
        lse = lse_buffer((b, h, n)) if lse_buffer is not None else torch.empty(b, h, n, device=q.device)
        _launch(q, k, acc, lse, m, table, heads, group, text[0], nk0, nk1, scale, (rows * triton.cdiv(n, block_n), 1),
                norm=1, lse_only=True, one_tile=False, **common)
        norm = 0
    _launch(q, k, acc, lse, m, table, heads, group, text[0], nk0, nk1, scale,
            (rows * triton.cdiv(n, block_n), triton.cdiv(t_max, block_t)), norm=norm, lse_only=False, one_tile=False,
            **common)


def _launch(q, k, acc, lse, m, table, heads, group, key0, nk0, nk1, scale, grid, *, norm, lse_only, one_tile,
            **meta):
    _record_kernel[grid](
        q, k, acc, lse if lse is not None else acc, m if m is not None else acc,
        table.rows, table.target, table.tokens, table.fold, heads,
        *_strides(q, 4), *_strides(k, 4), *acc.stride(), *_strides(lse, 3), *_strides(m, 4),
        q.shape[2], q.shape[3], heads.shape[0], group, key0, nk0, nk1, float(scale),
        NORM=norm, LSE_ONLY=lse_only, ONE_TILE=one_tile, **meta)


# -- torch (CPU) -----------------------------------------------------------------------------------------------

def grouped_scores(qc: torch.Tensor, kt: torch.Tensor, out: torch.Tensor | None = None,
                   alpha: float = 1.0) -> torch.Tensor:
    """``alpha * qc @ kt``: ``qc [b, H, c, D]`` against ``kt [b, Hk, D, K]`` (grouped heads) -> ``[b, H, c, K]``.

    ``out``: a contiguous fp32 buffer of the result's size to write into.
    """
    b, h, c, d = qc.shape
    hk, width = kt.shape[1], kt.shape[-1]
    g = h // hk
    q3 = qc.reshape(b * hk, g * c, d)  # heads hk*g .. hk*g+g-1 share key head hk: stack them on the row axis
    k3 = kt.reshape(b * hk, d, width)
    if out is None:
        return torch.bmm(q3, k3).mul_(alpha).view(b, h, c, width)
    o3 = out.view(b * hk, g * c, width)
    torch.baddbmm(o3, q3, k3, beta=0.0, alpha=alpha, out=o3)
    return out.view(b, h, c, width)


def operand(x: torch.Tensor, scratch: Callable[[str, tuple], torch.Tensor], role: str) -> torch.Tensor:
    """``x [b, h, r, c]`` as fp32 whose ``[r, c]`` matrices stack into ``[b * h, r, c]`` without a copy (a matmul
    operand): ``x`` itself when it is one already, else a copy in the work buffer ``role``."""
    if (x.dtype == torch.float32 and (x.stride(-1) == 1 or x.stride(-2) == 1)
            and (x.shape[0] == 1 or x.shape[1] == 1 or x.stride(0) == x.shape[1] * x.stride(1))):
        return x
    return scratch(role, tuple(x.shape)).copy_(x)


def record_torch(q: torch.Tensor, k: torch.Tensor, scale: float, text: tuple[int, int],
                 emit: Callable[[int, int, torch.Tensor], None], scratch: Callable[[str, tuple], torch.Tensor], *,
                 lse: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                 chunk_elements: int = 1 << 23) -> None:
    """Head-summed probabilities of ``q`` over the keys ``[text)``, softmax over all keys of ``k``, chunked.

    Parameters
    ----------
    q : Tensor ``[b, H, N, D]``
        Queries, any float dtype and strides (a chunk is copied to fp32 only when it must be).
    k : Tensor ``[b, Hk, D, K]`` fp32
        The keys, transposed, each ``[D, K]`` matrix a matmul operand (:func:`operand`). With ``lse`` only the
        text keys (``K = T``), without it all ``L`` keys.
    scale : float
    text : (int, int)
        Text keys on ``k``'s last axis (``(0, K)`` with ``lse``).
    emit : callable ``(n0, n1, probs)``
        Receives ``probs [b, n1 - n0, T]`` fp32 per chunk of queries (reused memory: consume it at once).
    scratch : callable ``(role, shape) -> Tensor``
        Reused fp32 work buffers.
    lse : Tensor ``[b, H, N]``, optional
        The normaliser, log-sum-exp over all keys of ``scale * q . k + mask``.
    mask : Tensor, optional
        Additive or boolean (True = attend) mask over the columns of ``k``, broadcastable to ``[b, H, N, K]``.
    """
    b, h, n, _ = q.shape
    width = k.shape[-1]
    t0, t1 = text
    chunk = min(n, max(1, chunk_elements // max(1, b * h * width)))
    for n0 in range(0, n, chunk):
        n1 = min(n, n0 + chunk)
        c = n1 - n0
        qc = operand(q[:, :, n0:n1], scratch, "q")
        if qc.shape[1] != k.shape[1] and not qc.is_contiguous():
            qc = scratch("q", tuple(qc.shape)).copy_(qc)  # grouped heads stack on the row axis
        scores = grouped_scores(qc, k, scratch("scores", (b, h, c, width)), alpha=scale)
        if mask is not None:
            m = mask[..., n0:n1, :]
            if m.dtype == torch.bool:
                scores.masked_fill_(m.logical_not(), -math.inf)
            else:
                scores.add_(m)
        if lse is not None:
            probs = scores.sub_(lse[:, :, n0:n1, None]).exp_()
        elif (t0, t1) == (0, width):
            probs = torch.softmax(scores, dim=-1, out=scores)
        else:
            top = scores.amax(dim=-1, keepdim=True)
            scores.sub_(top).exp_()
            probs = scores[..., t0:t1].div_(scores.sum(dim=-1, keepdim=True))
        if h == 1:
            emit(n0, n1, probs[:, 0])
        else:
            emit(n0, n1, torch.sum(probs, dim=1, out=scratch("probs", (b, c, t1 - t0))))
