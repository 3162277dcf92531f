"""Module modes as context managers: set on entry, restored on exit, also when the block raises."""

import pytest
import torch
from torch import nn

from rfq.models import build_model
from rfq.nn import SwitchableBatchNorm2d, quant_layers, quantize_
from rfq.nn.modes import bn_batch_statistics, bn_recalibration, cached_weights, float_layers


def model_with_plain_bn():
    model = quantize_(build_model("smallcnn"))
    model.extra_bn = nn.BatchNorm2d(3)  # a plain BN: momentum is its mode
    return model


def snapshot(model):
    out = []
    for m in model.modules():
        if isinstance(m, SwitchableBatchNorm2d):
            out.append((m.batch_stats_only, m.cumulative))
        elif isinstance(m, nn.BatchNorm2d):
            out.append(m.momentum)
        elif hasattr(m, "quant_enabled"):
            out.append((m.quant_enabled, m.weight_cache is None))
    return out


@pytest.mark.parametrize("mode", [float_layers, bn_batch_statistics, bn_recalibration,
                                  cached_weights])
def test_modes_restore_on_exit_and_on_error(mode):
    model = model_with_plain_bn()
    before = snapshot(model)
    with mode(model):
        assert snapshot(model) != before
    assert snapshot(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with mode(model):
            raise RuntimeError("boom")
    assert snapshot(model) == before


def test_float_layers_compute_in_float():
    torch.manual_seed(0)
    model = quantize_(build_model("smallcnn")).eval()
    x = torch.randn(2, 1, 28, 28)
    with float_layers(model), torch.no_grad():
        y_float = model(x)
    # no quantizer ran: no activation step was initialised, and the output is the float model's
    assert not any(any(m.a_ready) for _, m in quant_layers(model))
    with torch.no_grad():
        y_quant = model(x)
    assert any(any(m.a_ready) for _, m in quant_layers(model))
    assert not torch.equal(y_float, y_quant)


def test_bn_batch_statistics_leaves_running_statistics():
    torch.manual_seed(0)
    model = quantize_(build_model("smallcnn")).train()
    bns = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
    before = [m.running_mean.clone() for m in bns]
    with bn_batch_statistics(model), torch.no_grad():
        model(torch.randn(4, 1, 28, 28))
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))


def test_bn_recalibration_averages_the_batches():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(2)
    model = nn.Sequential(bn).train()
    batches = [torch.randn(8, 2, 3, 3) + i for i in range(3)]
    with bn_recalibration(model), torch.no_grad():
        for x in batches:
            model(x)
    expect = torch.stack([x.mean((0, 2, 3)) for x in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, expect)


def test_train_mode_without_dropout_is_deterministic_and_restores_flags():
    from rfq.nn.modes import train_mode_without_dropout

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Dropout(0.5),
                          nn.Linear(2 * 4 * 4, 3)).eval()
    model[1].train()  # mixed flags must come back as they were
    before = [m.training for m in model.modules()]
    x = torch.randn(4, 1, 6, 6)
    with train_mode_without_dropout(model), torch.no_grad():
        assert model[1].training and not model[3].training
        a, b = model(x), model(x)
    assert torch.equal(a, b)  # dropout off; BN on batch statistics either way
    assert [m.training for m in model.modules()] == before
