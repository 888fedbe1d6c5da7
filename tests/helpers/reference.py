"""Explicit attention reference for the tests: softmax(Q K^T / sqrt(d)) in float64, summed over heads."""

from __future__ import annotations

import math

import torch


def head_summed_probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """``q`` [B, N, C], ``k`` [B, T, C] (projected) -> probabilities summed over heads, [B, N, T] float64."""
    b, n, _ = q.shape
    qh = q.double().view(b, n, heads, -1).transpose(1, 2)
    kh = k.double().view(b, k.shape[1], heads, -1).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]), -1).sum(1)
