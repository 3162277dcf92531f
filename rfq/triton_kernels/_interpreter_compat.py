"""Keeps Triton's CPU interpreter (TRITON_INTERPRET=1) usable with NumPy >= 2.4.

The interpreter turns a runtime scalar into a 1-element array and converts it with int(array),
which NumPy 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"), so any
`for i in range(0, n, BLOCK)` with a runtime n fails there (triton-lang/triton#9171, fixed after
3.6 by squeezing the array). This applies the same fix, only in interpreter mode and only while
the installed Triton still has the old conversion (3.6 does; 3.9 squeezes, and is left alone).
Compiled GPU kernels are not affected.
"""

from __future__ import annotations

import os
import types


class _RecordingScope:
    """Stands in for the interpreter's patch scope: keeps what would be set, sets nothing."""

    def __init__(self) -> None:
        self.attrs: dict = {}

    def set_attr(self, obj, name, value) -> None:
        self.attrs[name] = value


def _converts_one_element_arrays(patch_lang_tensor) -> bool:
    """Whether the interpreter's tensor.__index__ takes a 1-element array (the fixed Triton)."""
    import numpy as np

    scope = _RecordingScope()
    try:
        patch_lang_tensor(type("_Probe", (), {}), scope)
        index = scope.attrs["__index__"]
    except Exception:  # an interpreter this probe does not know: keep the (harmless) fix
        return False
    probe = types.SimpleNamespace(handle=types.SimpleNamespace(data=np.array([3], np.int32)))
    try:
        return index(probe) == 3
    except TypeError:
        return False


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
    if _converts_one_element_arrays(original):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._rfq_squeezes_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor
