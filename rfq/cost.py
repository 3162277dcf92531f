"""BitOps and model-size accounting shared by training logs, the search and the reports.

Spec method_rfq.md §5 "Cost model", with its fixes (§6 quirk 12: real, non-square maps):
- a mixed layer costs ``b_w * b_a * MACs``, MACs = k_h k_w (C_in/groups) C_out H_out W_out
  (a linear layer: in x out);
- fixed layers (the stem, whose input image is not quantized, and the FC) count at 8 x 8;
- size = sum over mixed layers of b_w * #weights, plus 8 bits per fixed-layer weight, in bits;
  BN parameters and biases are not counted.
MACs come from one probe forward at batch 1 (hooks record each layer's output size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rfq.nn import BitConfig, mixed_layers, quant_layers
from rfq.nn.modes import float_layers

FIXED_BITS = 8


@dataclass(frozen=True)
class LayerCost:
    name: str
    role: str  # "mixed", "stem" or "fc"
    macs: int
    params: int  # weight elements


class CostModel:
    """Per-layer MACs and weight counts of a quantized model for one input shape (C, H, W)."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]):
        self.layers: dict[str, LayerCost] = {}
        out_hw: dict[str, tuple[int, int] | None] = {}
        hooks = []
        for name, layer in quant_layers(model):
            def hook(mod, inputs, output, name=name):
                out_hw[name] = tuple(output.shape[-2:]) if output.dim() == 4 else None
            hooks.append(layer.register_forward_hook(hook))
        was_training = model.training
        try:
            model.eval()
            # a float probe: no activation step gets initialised
            with float_layers(model), torch.no_grad():
                param = next(model.parameters())
                model(torch.zeros((1, *input_shape), device=param.device))
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
        for name, layer in quant_layers(model):
            if name not in out_hw:
                raise ValueError(f"CostModel: layer {name} did not run in the probe forward")
            self.layers[name] = LayerCost(name, layer.role, layer.macs(out_hw[name]),
                                          layer.weight.numel())
        self.mixed = [n for n, _ in mixed_layers(model)]
        self.fixed_bitops = sum(FIXED_BITS * FIXED_BITS * c.macs
                                for c in self.layers.values() if c.role != "mixed")
        self.fixed_bits = sum(FIXED_BITS * c.params
                              for c in self.layers.values() if c.role != "mixed")

    def bitops(self, config: BitConfig) -> float:
        """Total BitOps of a full per-layer config {name: (w, a)}."""
        total = self.fixed_bitops
        for name in self.mixed:
            w, a = config[name]
            total += w * (a if a is not None else FIXED_BITS) * self.layers[name].macs
        return float(total)

    def size_bits(self, config: BitConfig) -> float:
        return float(self.fixed_bits + sum(config[n][0] * self.layers[n].params
                                           for n in self.mixed))

    def size_mib(self, config: BitConfig) -> float:
        return self.size_bits(config) / (8 * 2**20)

    def size_kib(self, config: BitConfig) -> float:
        return self.size_bits(config) / (8 * 2**10)

    def cost(self, config: BitConfig, metric: str) -> float:
        if metric == "bitops":
            return self.bitops(config)
        if metric == "size":
            return self.size_bits(config)
        raise ValueError(f"unknown cost metric {metric!r}; use 'bitops' or 'size'")

    def uniform(self, model: nn.Module, bits: int) -> BitConfig:
        """The uniform W=A=bits config (each layer's nearest candidate where it lacks bits)."""
        out = {}
        for name, layer in mixed_layers(model):
            w = min(layer.w_bits, key=lambda b: (abs(b - bits), -b))
            a = min(layer.a_bits, key=lambda b: (abs(b - bits), -b)) if layer.a_bits else None
            out[name] = (w, a)
        return out


def format_bitops(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def parse_budget(text: str | float, metric: str) -> float:
    """'498.6M', '33.9G', 1.2e8 (BitOps); '131KiB', '0.5MiB', bits as a number (size)."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        t = text.strip()
        units = {"bitops": {"G": 1e9, "M": 1e6, "K": 1e3},
                 "size": {"MIB": 8 * 2**20, "KIB": 8 * 2**10, "B": 8}}[metric]
        value = None
        for unit, scale in sorted(units.items(), key=lambda kv: -len(kv[0])):
            if t.upper().endswith(unit):
                try:
                    value = float(t[:-len(unit)]) * scale
                except ValueError:
                    value = None
                break
        if value is None:
            try:
                value = float(t)
            except ValueError:
                raise ValueError(f"budget {text!r} is not a number with an optional unit "
                                 f"({', '.join(units)})") from None
    if not value > 0:
        raise ValueError(f"budget must be positive, got {text!r}")
    return value


__all__ = ["CostModel", "LayerCost", "format_bitops", "parse_budget"]
