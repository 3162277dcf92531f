"""rfq: weight-coupled mixed-precision quantization on fused kernels (torch.ops.rfq.*).

The public API: ``rfq.quantize_(model, rfq.QuantConfig(...))``, ``rfq.set_bits(model, config)``
and the ops index ``rfq.ops``. The layers below: rfq.nn (quantized modules), rfq.cost (BitOps
and size), rfq.training (the shared trainer), rfq.methods.<name> (one package per method),
rfq.deploy (packed models), rfq.cli (the command line and the demo).
"""

import torch  # noqa: F401  (loads libc10/libtorch, which rfq._C links against)

try:
    from rfq import _C  # noqa: F401  (loading the library registers torch.ops.rfq.*)
except ImportError as err:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "rfq's C++ extension rfq._C is not built or does not match this torch. Build it with\n"
        "    pip install -e . --no-build-isolation\n"
        f"(original error: {err})"
    ) from err

from rfq import ops  # noqa: E402  (fake kernels, autograd, typed wrappers)
from rfq.nn import BitConfig, QuantConfig, quantize_, set_bits  # noqa: E402
from rfq import deploy  # noqa: E402  (rfq.deploy.export / load)

__all__ = ["BitConfig", "QuantConfig", "deploy", "ops", "quantize_", "set_bits"]
__version__ = "0.1.0"
