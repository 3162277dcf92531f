"""Weight-coupled quantized modules and the model converter (``rfq.quantize_``).

    modules.py  QuantConv2d / QuantLinear / SwitchableBatchNorm2d
    convert.py  quantize_, QuantConfig, set_bits and the bit-config helpers
    modes.py    temporary modes as context managers (float_layers, bn_batch_statistics,
                bn_recalibration, train_mode_without_dropout, cached_weights)
    packed.py   PackedLayer: a layer frozen at one bit-width, its weight packed
"""

from rfq.nn.convert import (BitConfig, QuantConfig, UntraceableModelWarning, current_config,
                            mixed_layers, quant_layers, quantize_, replace_module,
                            resolve_config, set_bits)
from rfq.nn.modules import QuantConv2d, QuantLayer, QuantLinear, SwitchableBatchNorm2d

__all__ = ["BitConfig", "QuantConfig", "QuantConv2d", "QuantLayer", "QuantLinear",
           "SwitchableBatchNorm2d", "UntraceableModelWarning", "current_config", "mixed_layers",
           "quant_layers", "quantize_", "replace_module", "resolve_config", "set_bits"]
