"""An rfq deploy file read with numpy and safetensors only (no rfq, no torch): the format as
README's "Deploy file format" states it, so the tests prove a third party can read the codes."""

import json

import numpy as np
from safetensors import safe_open


def container_bits(bits: int) -> int:
    return 2 if bits <= 2 else (4 if bits <= 4 else 8)


def read_codes(path: str) -> dict[str, np.ndarray]:
    """{layer: int8 codes [N, K]} of every packed layer."""
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
        assert meta["format"] == "rfq.packed", meta.get("format")
        layers = json.loads(meta["layers"])
        out = {}
        for name, rec in layers.items():
            # weight rows [N, K], or a Haar layer's band codes of their own shape
            shape = rec.get("codes_shape") or [rec["weight_shape"][0],
                                              int(np.prod(rec["weight_shape"][1:]))]
            count = int(np.prod(shape))
            c = container_bits(rec["bits"])
            data = f.get_tensor(f"{name}.codes")
            if c == 8:
                out[name] = data[:count].view(np.int8).reshape(shape)
                continue
            per = 8 // c
            fields = (data[:, None] >> (np.arange(per, dtype=np.uint8) * c)) & ((1 << c) - 1)
            offset = {2: 2, 4: 8}[c]
            out[name] = (fields.reshape(-1)[:count].astype(np.int16) - offset) \
                .astype(np.int8).reshape(shape)
        return out


def read_layer(path: str, name: str) -> dict:
    """One layer's record and float tensors (scale, bias, a_step)."""
    with safe_open(path, framework="numpy") as f:
        rec = json.loads(f.metadata()["layers"])[name]
        tensors = {t: f.get_tensor(f"{name}.{t}") for t in ("scale", "bias", "a_step")
                   if f"{name}.{t}" in f.keys()}
    return {"record": rec, **tensors}
