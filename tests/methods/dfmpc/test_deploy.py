"""A DF-MPC model through the deploy path: the file holds each layer's ternary / DoReFa codes
exactly (read back by the independent reader), and the model loaded from it computes the
compensated model's function (weights only: no quantizer downstream, so up to float rounding)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rfq import deploy
from rfq.deploy.methods import export_dfmpc as export
from rfq.methods.dfmpc import compensate
from rfq.models import build_model
from rfq.nn.packed import PackedLayer

from dfmpc_cases import randomize_bn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy"))
from independent_reader import read_codes  # noqa: E402


@pytest.mark.parametrize("name,low,high", [("resnet20", 2, 6), ("resnet20", 3, 6),
                                           ("mobilenetv2", 3, 6), ("mobilenetv2", 4, 8)])
def test_compensated_model_runs_from_its_codes(name, low, high, tmp_path):
    torch.manual_seed(0)
    channels = 1 if name == "resnet20" else 3
    model = randomize_bn(build_model(name, channels, 10))
    compensated, report = compensate(model, low, high)
    path = export(compensated, report, tmp_path / "m.safetensors")
    loaded = deploy.load(path)
    x = torch.randn(4, channels, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = compensated(x)
        torch.testing.assert_close(loaded(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    stored = read_codes(str(path))
    for layer, q in report.layers.items():
        want = q.codes.reshape(q.codes.shape[0], -1).numpy().astype(np.int16)
        if q.kind == "dorefa":  # DoReFa's n in [0, 2^k - 1], stored as q = n - 2^(k-1)
            want = want - (1 << (q.bits - 1))
        assert np.array_equal(stored[layer].astype(np.int16), want), layer
    kinds = {m.code for m in loaded.modules() if isinstance(m, PackedLayer)}
    assert kinds == ({"lsq", "dorefa"} if low == 2 else {"dorefa"})
    sizes = deploy.file_sizes(path)
    assert sizes["codes_ideal"] == sum(q.params * q.bits / 8 for q in report.layers.values())
