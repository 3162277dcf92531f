"""The LSQ straight-through range mask, shared by the autograd of ``rfq.packed_linear`` and of
``rfq_triton.packed_linear`` (a leaf module: the Triton ops import it while ``rfq.ops`` loads)."""

from __future__ import annotations

from torch import Tensor

from rfq.ops.layout import qrange


def input_range_mask(x: Tensor, step: Tensor, bits: int, signed: bool) -> Tensor:
    """1 where qn <= x/step <= qp (inclusive, on the unrounded ratio), else 0, as fp32."""
    qn, qp = qrange(bits, signed)
    v = x.float() / step.reshape(())
    return ((v >= qn) & (v <= qp)).float()
