"""TEMPORARY stand-in for ``CrossAttentionRecorder.record_joint`` until the engine's lands (branch ``joint``).

Installed only when the engine has no ``record_joint``; delete this file once it is merged.
"""

from __future__ import annotations

import math

import torch

from ...engine.recorder import CrossAttentionRecorder


def _record_joint(self, name, part, q, k, heads, *, text, image, scale=None, mask=None, skip_reshape=False):
    if not self.wants(name, part):
        return
    i0, i1 = image
    t0, t1 = text
    if self._layer(name, part, "joint", i1 - i0, heads) is None:
        return
    rows, streams = self._rows(q.device)
    if skip_reshape:
        qs, ks = q[rows], k[rows]
    else:
        b = len(streams)
        qs = q[rows].view(b, q.shape[1], heads, -1).transpose(1, 2)
        ks = k[rows].view(b, k.shape[1], -1, qs.shape[-1]).transpose(1, 2)
    if ks.shape[1] != qs.shape[1]:
        ks = ks.repeat_interleave(qs.shape[1] // ks.shape[1], dim=1)
    if self.filter.heads is not None:
        sel = self._heads(q.device)
        qs, ks = qs.index_select(1, sel), ks.index_select(1, sel)
    qi = qs[:, :, i0:i1].float()
    scores = torch.matmul(qi, ks.float().transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(qs.shape[-1]))
    if mask is not None:
        m = mask[rows] if mask.ndim == 4 and mask.shape[0] == q.shape[0] and len(streams) != q.shape[0] else mask
        m = m[..., i0:i1, :]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    probs = (scores - scores.logsumexp(-1, keepdim=True))[..., t0:t1].exp().sum(1)
    self._accumulate(name, probs, streams)
    self.calls[name] = self.calls.get(name, 0) + 1


if not hasattr(CrossAttentionRecorder, "record_joint"):
    CrossAttentionRecorder.record_joint = _record_joint
