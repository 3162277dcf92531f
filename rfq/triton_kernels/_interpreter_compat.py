"""Keeps Triton's CPU interpreter (TRITON_INTERPRET=1) usable with NumPy >= 2.4.

The interpreter turns a runtime scalar into a 1-element array and converts it with int(array),
which NumPy 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"), so any
`for i in range(0, n, BLOCK)` with a runtime n fails there (triton-lang/triton#9171, fixed after
3.6 by squeezing the array). This applies the same fix, only in interpreter mode and only while
the installed Triton still has the old conversion. Compiled GPU kernels are not affected.
"""

from __future__ import annotations

import os


def apply() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
        return
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - a Triton without the interpreter module
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_rfq_squeezes_index", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._rfq_squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
