"""Weight-coupled quantized modules and the model converter (``rfq.quantize_``)."""

from rfq.nn.convert import (BitConfig, QuantConfig, current_config, mixed_layers, quant_layers,
                            quantize_, resolve_config, set_bits)
from rfq.nn.modules import QuantConv2d, QuantLayer, QuantLinear, SwitchableBatchNorm2d

__all__ = ["BitConfig", "QuantConfig", "QuantConv2d", "QuantLayer", "QuantLinear",
           "SwitchableBatchNorm2d", "current_config", "mixed_layers", "quant_layers",
           "quantize_", "resolve_config", "set_bits"]
