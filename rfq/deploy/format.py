"""The deploy file format: one safetensors file, no pickle.

Metadata (safetensors' string map):
  format          "rfq.packed"
  format_version  "1" (a reader refuses a newer version)
  arch            JSON {"model", "in_channels", "classes"}: rfq.models.build_model's arguments
  config          JSON {mixed layer: [w, a]}: the exported bit config
  layers          JSON {layer: record}, record = {"kind": "conv"|"linear", "code": "lsq"|"dorefa",
                  "bits", "weight_shape", "scale": "tensor"|"row", "bias": bool, "a_bit",
                  "a_signed", "bn": folded BN module name or null, conv: stride, padding,
                  dilation, groups}
Tensors:
  <layer>.codes   uint8, the [N, K] integer codes (convs flattened to [C_out, C_in/g*kh*kw]) as
                  offset-binary fields u = q + offset of the bit-width's container, row-major,
                  field i of a byte in its bits [i*c, (i+1)*c) (little-endian), last byte
                  zero-filled: 1-2 bits -> 2-bit fields (offset 2), 3-4 -> 4-bit (offset 8),
                  5-8 -> int8 (u = q, two's complement). Code conventions: "lsq" w = q * scale;
                  "dorefa" w = (q + 1/2) * scale (DoReFa's n in [0, 2^k - 1] is q + 2^(k-1),
                  scale 2 max|W| / (2^k - 1)); ternary weights are "lsq" 2-bit codes -1/0/1.
  <layer>.scale   float32 [1] (one LSQ step) or [N] (the step times the folded BN's gain per row)
  <layer>.bias    float32 [N] (present when "bias" is true)
  <layer>.a_step  float32 [1]: the input's LSQ step at a_bit (present when a_bit is not null)
  <layer>.band_steps  float32 [bands] ("haar" layers: one step per Haar band; their codes are
                  the bands' codes of shape record["codes_shape"] = [bands, ...], 2-D Haar over
                  (C_out, C_in) with 4 bands or 1-D over C_out with 2, "one_d" tells which)
  float.<key>     every other parameter and buffer of the float architecture, float32

The codes are stored densely (no per-row padding) so the file is ~params * container / 8 bytes;
the loader repacks them into the kernels' row layout (rfq/ops/layout.py), which may change
without changing the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from torch import Tensor

from rfq.ops.layout import MAX_BITS, MIN_BITS, code_offset, container_bits, qrange

FORMAT = "rfq.packed"
VERSION = 1
# w = scale * q ("lsq"), w = scale * (q + 1/2) ("dorefa": 2^bits levels symmetric about 0),
# w = scale * inverse Haar(band_steps * q) ("haar": q are Haar band codes, rfq.methods.hotswap)
CODE_CONVENTIONS = ("lsq", "dorefa", "haar")


class DeployFormatError(ValueError):
    """A file that is not a readable rfq deploy file of a supported version."""


def dense_bytes(n: int, k: int, bits: int) -> int:
    """Bytes of an [N, K] code tensor at ``bits`` in the file: container fields, one byte run."""
    return -(-n * k * container_bits(bits) // 8)


def pack_fields(codes: Tensor, bits: int) -> Tensor:
    """int8 codes (any shape, read row-major) -> uint8 [dense_bytes] of container fields."""
    c = container_bits(bits)
    u = (codes.reshape(-1).to(torch.int16) + code_offset(bits)).to(torch.uint8)
    if c == 8:
        return u.clone()
    per = 8 // c
    u = torch.cat([u, u.new_zeros(-u.numel() % per)]).reshape(-1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32) * c
    return (u << shifts).sum(1).to(torch.uint8)


def unpack_fields(data: Tensor, bits: int, n: int, k: int) -> Tensor:
    """Inverse of ``pack_fields``: int8 codes [N, K]."""
    c = container_bits(bits)
    if c == 8:
        return data[: n * k].view(torch.int8).reshape(n, k).clone()
    per = 8 // c
    shifts = torch.arange(per, dtype=torch.int32) * c
    u = (data.to(torch.int32)[:, None] >> shifts) & ((1 << c) - 1)
    return (u.reshape(-1)[: n * k] - code_offset(bits)).to(torch.int8).reshape(n, k)


def check_codes(codes: Tensor, bits: int, name: str) -> None:
    lo, hi = qrange(bits, True)
    if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise DeployFormatError(f"{name}: codes outside [{lo}, {hi}] of {bits}-bit LSQ codes")
    if bits == 1 and bool((codes == 0).any()):
        raise DeployFormatError(f"{name}: 1-bit codes must be -1 or +1")


def write(path: str | os.PathLike, tensors: dict[str, Tensor], meta: dict) -> Path:
    """Write atomically (temp file + rename): a crash never leaves a half-written file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "format_version": str(VERSION)}
    metadata.update({k: json.dumps(v, sort_keys=True) for k, v in meta.items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def _header(path: Path) -> dict:
    """The safetensors JSON header, read and checked by hand so that every malformed file gets
    one clear message (the library's own errors name no file)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
        looks_safetensors = len(head) == 9 and head[8:9] == b"{" and n <= size - 8
        if not looks_safetensors and (head[:2] == b"PK" or head[:1] == b"\x80"):
            raise DeployFormatError(
                f"{path} is a pickled torch file (rfq's old `rfq export` format, or another "
                f"tool's checkpoint), not an rfq deploy file; re-export it with `python -m rfq "
                f"export ... --out model.safetensors`")
        if len(head) < 9:
            raise DeployFormatError(f"{path}: {size} bytes, too short for a safetensors file")
        if n > size - 8 or n > 100 << 20:
            raise DeployFormatError(f"{path} is not a safetensors file (or it is truncated): "
                                    f"its header claims {n} bytes, the file has {size}")
        f.seek(8)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DeployFormatError(f"{path} is not a safetensors file: bad header ({err})") \
                from None
    if not isinstance(header, dict):
        raise DeployFormatError(f"{path} is not a safetensors file: its header is not an object")
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (TypeError, KeyError, IndexError, ValueError):
        raise DeployFormatError(f"{path} is not a safetensors file: bad tensor entries") \
            from None
    if 8 + n + max(ends, default=0) > size:
        raise DeployFormatError(f"{path} is truncated: its tensors need "
                                f"{8 + n + max(ends)} bytes, the file has {size}")
    return header


def read(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """(tensors, metadata with the JSON fields decoded), checked for format and version."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DeployFormatError(f"{path} does not exist")
    header = _header(path)
    raw = header.get("__metadata__") or {}
    if raw.get("format") != FORMAT:
        raise DeployFormatError(f"{path} is a safetensors file but not an rfq deploy file "
                                f"(metadata format={raw.get('format')!r}, expected {FORMAT!r})")
    version = raw.get("format_version", "")
    if not version.isdigit() or int(version) > VERSION:
        raise DeployFormatError(f"{path} has rfq deploy format version {version!r}; this rfq "
                                f"reads versions up to {VERSION}: upgrade rfq")
    meta = {}
    for key in ("arch", "config", "layers"):
        if key not in raw:
            raise DeployFormatError(f"{path}: metadata lacks {key!r}")
        try:
            meta[key] = json.loads(raw[key])
        except json.JSONDecodeError as err:
            raise DeployFormatError(f"{path}: metadata {key!r} is not JSON ({err})") from None
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error type for malformed data
        raise DeployFormatError(f"{path}: unreadable tensors ({err})") from None
    check_layers(meta["layers"], tensors, path)
    return tensors, meta


def check_layers(layers: dict, tensors: dict[str, Tensor], path) -> None:
    """Every layer record is complete, allowed and consistent with its tensors."""
    if not isinstance(layers, dict) or not layers:
        raise DeployFormatError(f"{path}: no packed layers")
    for name, rec in layers.items():
        where = f"{path}: layer {name}"
        bits = rec.get("bits")
        if not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
            raise DeployFormatError(f"{where}: bit-width {bits!r} is not allowed "
                                    f"({MIN_BITS}..{MAX_BITS})")
        if rec.get("code") not in CODE_CONVENTIONS:
            raise DeployFormatError(f"{where}: code convention {rec.get('code')!r} is not one "
                                    f"of {CODE_CONVENTIONS}")
        if rec.get("kind") not in ("conv", "linear"):
            raise DeployFormatError(f"{where}: kind {rec.get('kind')!r} is not conv or linear")
        shape = rec.get("weight_shape")
        if not isinstance(shape, list) or len(shape) != (4 if rec["kind"] == "conv" else 2):
            raise DeployFormatError(f"{where}: bad weight_shape {shape!r}")
        n = shape[0]
        numel = math.prod(shape)
        if rec["code"] == "haar":
            cs = rec.get("codes_shape")
            if not isinstance(cs, list) or not cs or cs[0] not in (2, 4):
                raise DeployFormatError(f"{where}: a haar layer needs codes_shape [bands, ...], "
                                        f"got {cs!r}")
            numel = math.prod(cs)
        expect = {"codes": (torch.uint8, [dense_bytes(1, numel, bits)]),
                  "scale": (torch.float32, [n] if rec.get("scale") == "row" else [1])}
        if rec["code"] == "haar":
            expect["band_steps"] = (torch.float32, [rec["codes_shape"][0]])
        if rec.get("bias"):
            expect["bias"] = (torch.float32, [n])
        if rec.get("a_bit") is not None:
            expect["a_step"] = (torch.float32, [1])
        for t, (dtype, size) in expect.items():
            got = tensors.get(f"{name}.{t}")
            if got is None:
                raise DeployFormatError(f"{where}: tensor {name}.{t} is missing")
            if got.dtype != dtype or list(got.shape) != size:
                raise DeployFormatError(f"{where}: {name}.{t} is {got.dtype} {list(got.shape)}, "
                                        f"expected {dtype} {size} for {bits}-bit {shape}")


__all__ = ["FORMAT", "VERSION", "DeployFormatError", "dense_bytes", "pack_fields",
           "unpack_fields", "check_codes", "write", "read"]
