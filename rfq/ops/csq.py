"""Typed wrapper of the CSQ op (spec ../shared/spec/methods_seeds.md §C.1): a bit-level weight
built from per-weight digit logits and per-layer bit-selection logits in one fused pass."""

from __future__ import annotations

import torch
from torch import Tensor

_ops = torch.ops.rfq


def csq_weight(p: Tensor, q: Tensor, m: Tensor, scale: Tensor, beta: Tensor) -> Tensor:
    """w = scale / (2^N - 1) * sum_i g(beta m_i) (g(beta p_i) - g(beta q_i)) 2^(N-1-i).

    ``p``, ``q``: [N, *shape] digit logits (plane i: the i-th most significant bit; p for the
    positive digit, q for the negative one), N in 2..8; ``m``: [N] bit-selection logits;
    ``scale``, ``beta``: one value each (device tensors: changing beta neither syncs nor
    recompiles). All fp32 or all fp64. Returns [*shape]. Differentiable in p, q, m and scale
    (one fused backward pass, ``csq_weight_backward``); beta gets no gradient.
    """
    return _ops.csq_weight.default(p, q, m, scale, beta)


__all__ = ["csq_weight"]
