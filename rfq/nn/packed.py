"""Packed inference layers: a conv or linear frozen at one bit-width, its weight held as packed
integer codes and run through ``rfq.ops.packed_conv2d`` / ``packed_linear``; its input keeps its
LSQ fake quantization at the exported bits, fused into the packed kernels where they run."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rfq import ops
from rfq.ops.layout import BLOCK_K, code_offset


class PackedLayer(nn.Module):
    """One deployed layer. ``scale`` is one LSQ step (per-tensor) or one value per output row
    (the step times a folded BatchNorm's gain); ``bias`` includes the folded BN's offset."""

    def __init__(self, kind: str, codes: Tensor, bits: int, weight_shape, scale: Tensor,
                 bias: Tensor | None = None, a_bit: int | None = None, a_signed: bool = False,
                 a_step: Tensor | None = None, stride=1, padding=0, dilation=1, groups=1,
                 bn_name: str | None = None, code: str = "lsq"):
        super().__init__()
        if kind not in ("conv", "linear"):
            raise ValueError(f"PackedLayer kind must be 'conv' or 'linear', got {kind!r}")
        self.is_conv = kind == "conv"
        self.w_bit, self.a_bit, self.a_signed = int(bits), a_bit, bool(a_signed)
        self.weight_shape = tuple(int(d) for d in weight_shape)
        if code not in ("lsq", "dorefa"):
            raise ValueError(f"PackedLayer code must be 'lsq' or 'dorefa', got {code!r}")
        self.code = code
        n, k = codes.shape
        scale_groups = -(-k // BLOCK_K)
        zeros = None
        if scale.numel() == 1 and code == "lsq":
            self.group_size, scales = 0, scale.reshape(1).float()
        else:  # per-row values as one g128 scale group per 128 inputs (the kernels' layout)
            self.group_size = BLOCK_K
            scales = scale.float().reshape(-1, 1).expand(n, scale_groups).contiguous()
        if code == "dorefa":  # w = (q + 1/2) s = (u - z) s with u = q + offset: z = offset - 1/2
            zeros = torch.full((n, scale_groups), code_offset(int(bits)) - 0.5)
        self.register_buffer("packed", ops.pack_weight(codes, self.w_bit))
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.register_buffer("bias", None if bias is None else bias.float().clone())
        self._a_bits = [a_bit]
        if a_bit is not None:
            self.register_buffer("a_step", a_step.float().reshape(1).clone())
            self.register_buffer("a_sel", torch.zeros((), dtype=torch.long), persistent=False)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.bn_name = bn_name  # the BN folded into scale and bias (name in the float model)
        # fp32 copy of the weight for convs that run dense (see keep_dense); None: dequantize
        # per call there
        self.register_buffer("dense", None, persistent=False)

    @classmethod
    def from_dense(cls, kind: str, dense: Tensor, band_codes: Tensor, bits: int,
                   bias: Tensor | None = None, a_bit: int | None = None, a_signed: bool = False,
                   a_step: Tensor | None = None, stride=1, padding=0, dilation=1, groups=1,
                   bn_name: str | None = None) -> "PackedLayer":
        """A layer whose weight is not on one integer grid (hot-swap's Haar layers): it keeps
        its band codes packed (what the file stores) and runs from ``dense``, the weight they
        reconstruct, on every call."""
        rows = band_codes.reshape(band_codes.shape[0] * band_codes.shape[1], -1)
        layer = cls(kind, rows, bits, tuple(rows.shape), torch.ones(1), bias, a_bit, a_signed,
                    a_step, stride, padding, dilation, groups, bn_name)
        layer.code, layer.codes_shape = "haar", tuple(band_codes.shape)
        layer.weight_shape = tuple(dense.shape)
        layer.dense = dense.detach().float().contiguous()
        return layer

    @torch.no_grad()
    def keep_dense(self, keep: bool = True) -> None:
        """Keep a dequantized fp32 copy of this conv's weight for the calls that run dense
        (grouped convs, many output positions: compute-bound), trading its fp32 bytes for the
        per-call dequantization there. Calls with few output positions still read the packed
        codes."""
        if self.code == "haar":  # its only weight is the dense one
            return
        self.dense = self.dequantized_weight().contiguous() if keep and self.is_conv else None

    @property
    def input_clamps_at_zero(self) -> bool:
        """An unsigned input quantizer clamps at 0 itself (a ReLU before it can be skipped)."""
        return self.a_bit is not None and not self.a_signed

    def codes(self) -> Tensor:
        """The integer codes [N, K] (convs flattened); a Haar layer's band codes."""
        if self.code == "haar":
            rows = self.codes_shape[0] * self.codes_shape[1]
            flat = ops.unpack_weight(self.packed, self.w_bit, (rows, math.prod(self.codes_shape[2:])))
            return flat.reshape(self.codes_shape)
        n = self.weight_shape[0]
        return ops.unpack_weight(self.packed, self.w_bit, (n, self.packed_k()))

    def packed_k(self) -> int:
        return math.prod(self.weight_shape[1:])

    def dequantized_weight(self) -> Tensor:
        """fp32 weight of the logical shape (the folded BN gain included)."""
        if self.code == "haar":
            return self.dense
        w = ops.dequantize_weight(self.packed, self.scales, self.w_bit,
                                  (self.weight_shape[0], self.packed_k()), self.group_size,
                                  self.zeros)
        return w.reshape(self.weight_shape)

    def reads_packed(self, x: Tensor) -> bool:
        """Whether a call on ``x`` runs from the packed codes (else from a dense weight)."""
        if self.code == "haar":
            return False
        if not self.is_conv:
            return True
        kh, kw = self.weight_shape[2:]
        h = (x.shape[-2] + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) \
            // self.stride[0] + 1
        w = (x.shape[-1] + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) \
            // self.stride[1] + 1
        return ops.conv_reads_packed(x.shape[0], (h, w), self.groups)

    def forward(self, x: Tensor) -> Tensor:
        packed = self.reads_packed(x)
        quant = (None, 8, False)
        if self.a_bit is not None:
            if packed:  # the packed kernels quantize the input themselves: one call, not two
                quant = (self.a_step, self.a_bit, self.a_signed)
            else:
                x = ops.coupled_quant(x, self.a_step, self._a_bits, self.a_sel, self.a_signed)
        if self.dense is not None and not packed:
            w = self.dense if self.dense.dtype == x.dtype else self.dense.to(x.dtype)
            if not self.is_conv:
                return F.linear(x, w, self.bias)
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation,
                            self.groups)
        if self.is_conv:
            return ops.packed_conv2d(x.contiguous(), self.packed, self.scales, self.w_bit,
                                     self.weight_shape, self.group_size, self.zeros, self.bias,
                                     self.stride, self.padding, self.dilation, self.groups,
                                     *quant)
        return ops.packed_linear(x, self.packed, self.scales, self.w_bit, self.group_size,
                                 self.zeros, self.bias, *quant)

    def extra_repr(self) -> str:
        a = "input not quantized" if self.a_bit is None else \
            f"A{self.a_bit} ({'signed' if self.a_signed else 'unsigned'})"
        kind = "conv" if self.is_conv else "linear"
        return f"{kind} {list(self.weight_shape)}, W{self.w_bit} {self.code}, {a}, " \
               f"{'per-row' if self.group_size else 'per-tensor'} scale"
