"""Packed inference layers: a quantized layer frozen at one bit-width, its weight stored as packed
integer codes and run through ``rfq.ops.packed_conv2d`` / ``packed_linear``."""

from __future__ import annotations

import torch
from torch import nn

from rfq import ops
from rfq.nn.modules import QuantConv2d, QuantLayer


class PackedLayer(nn.Module):
    """A frozen QuantConv2d/QuantLinear at one bit-width, its weight packed."""

    def __init__(self, layer: QuantLayer):
        super().__init__()
        self.is_conv = isinstance(layer, QuantConv2d)
        self.w_bit, self.a_bit, self.a_signed = layer.w_bit, layer.a_bit, layer.a_signed
        step = layer.w_steps.detach()[layer.w_index].reshape(1).float()
        codes = ops.quantize_codes(layer.weight.detach().float(), step, self.w_bit, True)
        self.weight_shape = tuple(layer.weight.shape)
        self.register_buffer("packed", ops.pack_weight(codes.reshape(codes.shape[0], -1),
                                                       self.w_bit))
        self.register_buffer("scale", step)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        if self.a_bit is not None:
            self.register_buffer("a_step", layer.a_steps.detach()[layer.a_index].reshape(1).clone())
            self.register_buffer("a_sel", torch.zeros((), dtype=torch.long))
        if self.is_conv:
            self.stride, self.padding = layer.stride, layer.padding
            self.dilation, self.groups = layer.dilation, layer.groups

    def forward(self, x):
        if self.a_bit is not None:
            x = ops.coupled_quant(x, self.a_step, [self.a_bit], self.a_sel, self.a_signed)
        if self.is_conv:
            return ops.packed_conv2d(x.contiguous(), self.packed, self.scale, self.w_bit,
                                     self.weight_shape, 0, None, self.bias, self.stride,
                                     self.padding, self.dilation, self.groups)
        return ops.packed_linear(x, self.packed, self.scale, self.w_bit, 0, None, self.bias)

    def packed_bytes(self) -> int:
        return self.packed.numel() + 4
