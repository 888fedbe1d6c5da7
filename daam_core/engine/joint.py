"""Joint attention (SD3 MMDiT, Flux): the image queries' probabilities over the text keys, exactly.

In a joint-attention block the text and image tokens form one sequence of ``L`` positions and every query
attends over all of them. What DAAM needs is the ``[N_img, T]`` slice of the ``[L, L]`` probabilities, with the
softmax normaliser taken over **all** ``L`` keys (image keys and mask included), summed over heads. The only
global quantity is each image query's log-sum-exp over the ``L`` keys:

    P[n, t] = exp(s * q_n . k_t + mask[n, t] - lse_n),   lse_n = log sum_j exp(s * q_n . k_j + mask[n, j])

Ways to get ``lse`` without an ``[L, L]`` tensor:

- :func:`attention_with_lse`: the host's attention *is* PyTorch SDPA. The fused kernels that also return ``lse``
  (:data:`CANDIDATES`: the CPU flash kernel; on CUDA cuDNN, flash, memory-efficient) are each compared bit for
  bit with the host's call once per input signature; the one that matched serves that signature afterwards, so
  the host's output never changes, and none is used where none matched.
- Hosts on other attention code (xformers, sage, ComfyUI's split / sub-quadratic functions, another override):
  on CUDA the recording kernel computes ``lse`` itself, an online max / sum pass over the keys without V
  (:mod:`daam_core.engine.kernels`); on the CPU :func:`image_lse` (the flash kernel on the image queries with
  zero values, only its log-sum-exp used) or, failing that, the chunked torch path of the recorder, which scores
  a chunk of image queries against all keys and normalises it in place.

Shapes: ``B`` batch rows, ``H`` query heads, ``Hk`` key heads (``H`` a multiple of ``Hk``: grouped-query heads,
query head ``h`` uses key head ``h // (H // Hk)`` as ``repeat_interleave`` / SDPA ``enable_gqa``), ``D`` head dim.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .kernels import record_torch

DEFAULT_CHUNK_ELEMENTS = 1 << 23  # fp32 scores per chunk (32 MiB)


def heads_first(x: torch.Tensor, heads: int | None = None, head_dim: int | None = None) -> torch.Tensor:
    """Queries or keys as ``[B, H, L, D]``.

    A 4-D ``x`` is taken as ``[B, H, L, D]`` already; a 3-D one is ``[B, L, H * D]`` (the usual layout of attention
    functions) and is viewed with ``heads`` heads, or with as many heads of ``head_dim`` as its width holds.
    """
    if x.ndim == 4:
        if heads is not None and x.shape[1] != heads:
            raise ValueError(f"expected [B, {heads} heads, L, D], got shape {tuple(x.shape)}")
        return x
    b, n, c = x.shape if x.ndim == 3 else (0, 0, 0)
    h = heads if heads is not None else (c // head_dim if head_dim else 0)
    if x.ndim != 3 or not h or c % h:
        raise ValueError(f"expected [B, L, heads * D] ({heads or '?'} heads) or [B, H, L, D], got shape "
                         f"{tuple(x.shape)}")
    return x.view(b, n, h, c // h).transpose(1, 2)


def mask_4d(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A host mask as ``[B or 1, H or 1, L_q, L_k]`` (ComfyUI's rule: a 2-D mask is ``[L_q, L_k]``, a 3-D one
    ``[B, L_q, L_k]``)."""
    if mask is None:
        return None
    if mask.ndim == 2:
        return mask[None, None]
    if mask.ndim == 3:
        return mask[:, None]
    if mask.ndim == 4:
        return mask
    raise ValueError(f"attention mask must have 2, 3 or 4 dimensions, got shape {tuple(mask.shape)}")


def workspace_bytes(rows: int, heads: int, kv_heads: int, n_img: int, length: int, text: int, dim: int,
                    dtype: torch.dtype, with_lse: bool, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                    lse_kernel: bool = False, threads: int | None = None) -> int:
    """Upper bound of the extra memory one recorded call of the torch path allocates (bytes).

    The recorder keeps these work buffers from call to call (until ``finish``), so a call of a shape seen before
    allocates none of it again. ``chunk`` queries are processed at once,
    ``chunk = max(1, chunk_elements // (rows * heads * keys))`` with ``keys = text`` when the log-sum-exp is known (given, or from :func:`image_lse`: ``lse_kernel``), else
    ``length``. Terms (fp32 = 4 bytes, ``e`` = bytes of ``dtype``):

    - scores of a chunk, ``rows * heads * chunk * keys``, and the same again for temporaries of the in-place
      normalisation (mask fill, exponent) - ``2x``;
    - the head-summed chunk ``rows * chunk * text``;
    - fp32 copies of the keys used, ``rows * kv_heads * keys * dim`` when the input is not fp32, and of the query
      chunk ``rows * heads * chunk * dim`` (grouped heads or non-fp32 input);
    - the chunk's log-sum-exp / normaliser ``rows * heads * chunk`` twice;
    - with ``lse_kernel``: the kernel's (unused) output ``rows * heads * n_img * dim * e``, its log-sum-exp
      ``rows * heads * n_img * 4`` and its per-thread blocks (at most 2 MiB a thread).

    Independent of ``length ** 2``: no ``[L, L]`` tensor exists.
    """
    keys = text if (with_lse or lse_kernel) else length
    chunk = min(n_img, max(1, chunk_elements // max(1, rows * heads * keys)))
    f32 = 4
    total = 2 * rows * heads * chunk * keys * f32
    total += rows * chunk * text * f32
    total += rows * heads * chunk * dim * f32
    if dtype != torch.float32:
        total += rows * kv_heads * keys * dim * f32
    total += 2 * rows * heads * chunk * f32
    if lse_kernel and not with_lse:
        e = torch.empty((), dtype=dtype).element_size()
        total += rows * heads * n_img * (dim * e + f32)
        total += (threads or torch.get_num_threads()) * (2 << 20)
    return total


def joint_text_probs(q_img: torch.Tensor, k: torch.Tensor, text: tuple[int, int], scale: float,
                     emit: Callable[[int, int, torch.Tensor], None], *, mask: torch.Tensor | None = None,
                     lse: torch.Tensor | None = None, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> None:
    """Head-summed probabilities of image queries over the text keys, softmax over all keys, chunked (torch).

    Parameters
    ----------
    q_img : Tensor ``[b, H, N, D]``
        The image queries (any float dtype; computed in fp32).
    k : Tensor ``[b, Hk, L, D]``
        All keys of the joint sequence.
    text : (int, int)
        ``[start, stop)`` of the text keys on the key axis, ``T = stop - start``.
    scale : float
        Softmax scale of the scores.
    emit : callable ``(n0, n1, probs)``
        Receives, per chunk of image queries ``[n0, n1)``, ``probs [b, n1 - n0, T]`` float32 (summed over the
        ``H`` heads). The tensor is reused memory: consume it before returning.
    mask : Tensor, optional
        Additive float or boolean (True = attend) mask rows of the image queries, broadcastable to
        ``[b, H, N, L]``.
    lse : Tensor ``[b, H, N]``, optional
        Log-sum-exp of ``scale * q . k + mask`` over all ``L`` keys; when given only the text keys are scored.
    chunk_elements : int
        Scores computed at once (sets the chunk size; see :func:`workspace_bytes`).

    The recorder's own path is :func:`daam_core.engine.kernels.record_torch` with reused buffers; this is it with
    fresh ones.
    """
    if q_img.shape[1] % k.shape[1]:
        raise ValueError(f"{q_img.shape[1]} query heads are not a multiple of {k.shape[1]} key heads")
    t0, t1 = text
    if lse is not None:
        k, mask, text = k[:, :, t0:t1], (None if mask is None else mask[..., t0:t1]), (0, t1 - t0)
    record_torch(q_img, k.float().transpose(-1, -2).contiguous(), scale, text, emit,
                 lambda role, shape: torch.empty(shape), lse=lse, mask=mask, chunk_elements=chunk_elements)


def image_lse(q_img: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None
              ) -> torch.Tensor | None:
    """Log-sum-exp ``[b, H, N]`` of the image queries over all keys from the CPU flash kernel, or None.

    For a host whose attention gives no log-sum-exp (ComfyUI's sub-quadratic function, xformers...): the kernel
    runs on the image queries only, with all-zero values (a stride-0 view, nothing allocated for them), and only
    its log-sum-exp is used, so its output need not equal anything. Its meaning is checked once per input
    signature against a direct computation on a few rows. None (compute it chunked) off the CPU, for boolean
    masks, a mask of another dtype, or when the kernel refuses the inputs.
    """
    if q_img.device.type != "cpu" or q_img.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if mask is not None and mask.dtype != q_img.dtype:
        return None
    if k.dtype != q_img.dtype or q_img.shape[1] % k.shape[1] or q_img.requires_grad:
        return None
    zeros = q_img.new_zeros(()).expand(k.shape)
    key = ("image_lse",) + _signature(q_img, k, zeros, mask, scale)
    verdict = _verdicts.get(key)
    if verdict is False:
        return None
    try:
        _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_img, k, zeros, 0.0, False, attn_mask=mask, scale=scale)
    except (RuntimeError, NotImplementedError, TypeError):
        _verdicts[key] = False
        return None
    if verdict is None:
        _verdicts[key] = _lse_check(q_img, k, mask, scale, lse)
        if not _verdicts[key]:
            return None
    return lse


# -- fused kernels that return the log-sum-exp -----------------------------------------------------------------

_verdicts: dict[tuple, bool] = {}


def _signature(q, k, v, mask, scale) -> tuple:
    m = None if mask is None else (tuple(mask.shape), mask.dtype, tuple(mask.stride()))
    return (q.device, q.dtype, tuple(q.shape), tuple(k.shape), tuple(v.shape), tuple(q.stride()),
            tuple(k.stride()), tuple(v.stride()), m, scale, torch.__version__)


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask.logical_not(), -math.inf)


def _cpu_flash(q, k, v, mask, scale):
    if q.shape[1] % k.shape[1]:
        return None  # the CPU kernel divides the head counts: an uneven ratio would crash the process
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                      scale=scale)[:2]


def _cudnn(q, k, v, mask, scale):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, mask, True, 0.0, False, False,
                                                              scale=scale)[:2]


def _flash(q, k, v, mask, scale):
    if mask is not None:
        return None  # no bias input
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]


def _efficient(q, k, v, mask, scale):
    if mask is not None:
        mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, mask, True, 0.0, False, scale=scale)[:2]


# Fused kernels that also return the log-sum-exp, per device type, in the order they are asked. Which one SDPA
# dispatches to depends on the GPU, dtype, shapes, torch version and user settings: it is never guessed, each is
# compared with the host's own output (cuDNN is SDPA's choice for bf16 / fp16 on Hopper with torch 2.11).
CANDIDATES: dict[str, tuple[tuple[str, Callable], ...]] = {
    "cpu": (("flash_cpu", _cpu_flash),),
    "cuda": (("cudnn", _cudnn), ("flash", _flash), ("efficient", _efficient)),
}

_BY_NAME = {name: fn for device in CANDIDATES.values() for name, fn in device}
_chosen: dict[tuple, str | None] = {}  # signature -> the candidate proven equal to the host, None: none is


def lse_layout(lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor | None:
    """A kernel's log-sum-exp as ``[B, H, L]`` fp32 (a view where possible), or None for an unknown layout.

    Layouts seen: ``[B, H, L]`` (CPU flash), ``[B, H, L, 1]`` (cuDNN), ``[B, H, L_padded]`` (flash /
    memory-efficient pad the query axis to their block size).
    """
    b, h, length = q.shape[0], q.shape[1], q.shape[2]
    if lse.ndim == 4 and lse.shape[-1] == 1:
        lse = lse[..., 0]
    if lse.ndim != 3 or tuple(lse.shape[:2]) != (b, h) or lse.shape[2] < length:
        return None
    lse = lse[..., :length]
    return lse if lse.dtype == torch.float32 else lse.float()


def _run(name: str, q, k, v, mask, scale):
    """Output and ``[B, H, L]`` log-sum-exp of candidate ``name``, or None when it refuses the inputs."""
    try:
        res = _BY_NAME[name](q, k, v, mask, scale)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return None
    if res is None:
        return None
    lse = lse_layout(res[1], q)
    return None if lse is None else (res[0], lse)


def _takes(q, k, v, mask) -> bool:
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or q.requires_grad:
        return False
    if (q.ndim != 4 or k.ndim != 4 or v.ndim != 4 or k.shape[1] != v.shape[1] or q.shape[1] % k.shape[1]
            or k.dtype != q.dtype or v.dtype != q.dtype):
        return False
    if q.device.type != "cpu" and k.shape[1] != q.shape[1]:
        return False  # grouped heads: the host's SDPA repeats them its own way
    return mask is None or mask.dtype == q.dtype


def fused_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                        mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Output ``[B, H, L, D]`` and log-sum-exp ``[B, H, L]`` (fp32) of the first fused kernel of this device that
    takes the inputs (the one proven equal to the host for this signature, when known).

    q, k, v: ``[B, H, L, D]`` (k, v may have fewer heads). Returns None when no such kernel takes these inputs.
    The output is not proven equal to SDPA's: use :func:`attention_with_lse`.
    """
    m = _float_mask(mask, q.dtype)
    if not _takes(q, k, v, m):
        return None
    chosen = _chosen.get(_signature(q, k, v, mask, scale))
    names = [chosen] if chosen else [n for n, _ in CANDIDATES.get(q.device.type, ())]
    for name in names:
        res = _run(name, q, k, v, m, scale)
        if res is not None:
            return res
    return None


def _lse_check(q, k, mask, scale, lse, rows: int = 64) -> bool:
    """The kernel's log-sum-exp agrees with one computed here on a few query rows (same meaning: natural log
    of the sum over all keys of ``exp(scale * q . k + mask)``)."""
    qs = q[:, :, :rows].float()
    s = torch.matmul(qs, k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1).transpose(-1, -2)) * scale
    if mask is not None:
        m = mask[..., :rows, :]
        s = s.masked_fill(m.logical_not(), -math.inf) if m.dtype == torch.bool else s + m.float()
    ref = s.logsumexp(-1)
    tol = 1e-4 if q.dtype == torch.float32 else 2e-2
    finite = torch.isfinite(ref)
    return bool(torch.equal(finite, torch.isfinite(lse[:, :, :rows]))
                and torch.allclose(lse[:, :, :rows][finite], ref[finite], atol=tol, rtol=0))


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, reference: Callable[[], torch.Tensor], *,
                       finish: Callable[[torch.Tensor], torch.Tensor] | None = None, scale: float | None = None,
                       mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The host's attention output, bit for bit, and the log-sum-exp when a fused kernel provides it.

    Parameters
    ----------
    q, k, v : Tensor ``[B, H, L, D]``
        As the host's SDPA call receives them (k, v may have fewer heads).
    reference : callable
        Runs the host's own attention on these inputs and returns its output (in the host's format).
    finish : callable, optional
        Turns the kernel's ``[B, H, L, D]`` output into the host's format (e.g. ``[B, L, H * D]``); default none.
    scale : float, optional
        The scale the host passes to SDPA (None: ``D ** -0.5``).
    mask : Tensor, optional
        The mask the host passes to SDPA, ``[B or 1, H or 1, L, L]``.

    Returns
    -------
    (Tensor, Tensor or None)
        The output (the host's own values) and ``lse [B, H, L]`` fp32, or None when no verified kernel applies.

    Notes
    -----
    Ask, don't guess: the first call of each input signature (device, dtype, shapes, strides, mask, scale, torch
    version) runs ``reference()`` and then each of the device's :data:`CANDIDATES` until one's output is
    ``torch.equal`` to it (and its log-sum-exp agrees with a direct one on a few rows); that kernel alone serves
    the signature afterwards (``reference`` is not called). With none, ``reference()`` is called every time and
    no kernel runs. One host synchronisation per new signature, none after.
    """
    finish = finish or (lambda t: t)
    key = _signature(q, k, v, mask, scale)
    if key in _verdicts:  # asked before (clearing _verdicts makes every signature be asked again)
        name = _chosen.get(key)
        if name is None:
            return reference(), None
        res = _run(name, q, k, v, _float_mask(mask, q.dtype), scale)
        if res is not None:
            return finish(res[0]), res[1]
        return reference(), None  # cannot happen for one signature; stay correct if it does
    host = reference()
    m = _float_mask(mask, q.dtype)
    chosen, lse = None, None
    if _takes(q, k, v, m):
        s = scale if scale is not None else q.shape[-1] ** -0.5
        for name, _ in CANDIDATES.get(q.device.type, ()):
            res = _run(name, q, k, v, m, scale)
            if res is None:
                continue
            out = finish(res[0])
            if (out.shape == host.shape and out.dtype == host.dtype and torch.equal(out, host)
                    and _lse_check(q, k, mask, s, res[1])):
                chosen, lse = name, res[1]
                break
    _chosen[key] = chosen
    _verdicts[key] = chosen is not None
    return host, lse
