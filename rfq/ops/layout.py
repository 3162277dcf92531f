"""Range and layout facts of the rfq ops, stated once for Python (the oracle, the Triton checks,
the quantized modules and the deploy format import them from here). Their C++ twins live in
csrc/quant_range.h and csrc/packed_layout.h (spec ../shared/spec/kernels.md §1 and §3).

This module imports nothing from rfq and no compiled code.
"""

from __future__ import annotations

MIN_BITS, MAX_BITS = 1, 8  # every candidate bit-width lies in MIN_BITS..MAX_BITS
MAX_CANDIDATES = 8  # K: candidate bit-widths per quantizer (one step each)
CSQ_MIN_PLANES, CSQ_MAX_PLANES = 2, 8  # N: bit planes of a CSQ weight (csq_weight)

BLOCK_K = 128  # packed rows are runs of 128-element K-blocks (one g128 group each)
ROW_ALIGN = 64  # packed rows are padded to 64 bytes
GROUP_SIZES = (0, 32, 64, 128)  # 0: one per-tensor LSQ step; else group-wise scales


def check_bits(bits: int, name: str = "bits") -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be in {MIN_BITS}..{MAX_BITS}, got {bits}")


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer code range [qn, qp] of one candidate; signed 1-bit is binary {-1, +1}."""
    check_bits(bits)
    if signed and bits == 1:
        return -1, 1
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def is_binary(bits: int, signed: bool) -> bool:
    """Signed 1-bit: codes {-1, +1} by sign (no zero), not rint."""
    return signed and bits == 1


def container_bits(bits: int) -> int:
    """Storage container of a bit-width: 1-2 -> 2-bit, 3-4 -> 4-bit, 5-8 -> int8."""
    return 2 if bits <= 2 else (4 if bits <= 4 else 8)


def code_offset(bits: int) -> int:
    """Offset-binary bias of the container: stored u = q + offset (int8 stores q itself)."""
    return {2: 2, 4: 8, 8: 0}[container_bits(bits)]


def padded_k(k: int) -> int:
    return -(-k // BLOCK_K) * BLOCK_K


def packed_row_bytes(k: int, bits: int) -> int:
    """Bytes per packed row: K padded to 128-element blocks of 32, 64 or 128 bytes (2-bit,
    4-bit, int8 container), the row padded to 64 bytes."""
    raw = padded_k(k) * container_bits(bits) // 8
    return -(-raw // ROW_ALIGN) * ROW_ALIGN


__all__ = ["MIN_BITS", "MAX_BITS", "MAX_CANDIDATES", "BLOCK_K", "ROW_ALIGN", "GROUP_SIZES",
           "check_bits", "qrange", "is_binary", "container_bits", "code_offset", "padded_k",
           "packed_row_bytes"]
