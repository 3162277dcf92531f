"""rfq: weight-coupled mixed-precision quantization on fused kernels (torch.ops.rfq.*)."""

import torch  # noqa: F401  (loads libc10/libtorch, which rfq._C links against)

try:
    from rfq import _C  # noqa: F401  (loading the library registers torch.ops.rfq.*)
except ImportError as err:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "rfq's C++ extension rfq._C is not built or does not match this torch. Build it with\n"
        "    pip install -e . --no-build-isolation\n"
        f"(original error: {err})"
    ) from err

from rfq import ops  # noqa: E402,F401  (fake kernels, autograd, typed wrappers)

__all__ = ["ops"]
__version__ = "0.1.0"
