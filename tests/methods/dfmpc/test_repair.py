"""DF-MPC as a zero-data repair of a mixed config of a weight-coupled model."""

import copy

import pytest
import torch

from rfq import QuantConfig, quantize_
from rfq import reference as ref
from rfq.methods.dfmpc.repair import repair_config
from rfq.models import build_model

from dfmpc_cases import PairNet, randomize_bn


def coupled_pairnet(seed=0):
    torch.manual_seed(seed)
    model = quantize_(randomize_bn(PairNet()), QuantConfig(keep_first=False))
    for m in model.modules():
        if hasattr(m, "a_ready"):
            m.a_steps.data.fill_(0.05)
            m.a_ready = [True] * len(m.a_ready)
    # distinct statistics per BN copy, as after training
    with torch.no_grad():
        bn = model.bn1
        bn.running_var.mul_(0.5 + torch.rand_like(bn.running_var))
    return model.eval()


def same_tensors(a, b):
    return all(torch.equal(v, b[k]) for k, v in a.items() if isinstance(v, torch.Tensor))


def lsq_weight(layer):
    step = layer.w_steps.detach()[layer.w_index]
    return ref.quantize_codes(layer.weight.detach(), step, layer.w_bit).float() * step


def test_repair_folds_the_closed_form_into_the_selected_copy_only():
    model = coupled_pairnet()
    config = {"conv1": (2, 6), "conv2": (6, 6)}
    repaired, report = repair_config(model, config)
    assert [(r["low"], r["high"], r["bits"]) for r in report] == [("conv1", "conv2", [2, 6])]
    base = copy.deepcopy(model)
    base.set_bits(config)
    bn, new = base.bn1, repaired.bn1
    i, j = bn.wi, bn.ai
    # the oracle: c from the reference LSQ quantizer and the selected copy's BN terms
    w = base.conv1.weight.detach().double().reshape(8, -1)
    w_hat = lsq_weight(base.conv1).double().reshape(8, -1)
    sigma = (bn.running_var[i, j].double() + bn.eps).sqrt()
    g = bn.weight[i, j].double() / sigma
    y = bn.bias[i, j].double() - bn.weight[i, j].double() * bn.running_mean[i, j].double() / sigma
    a, b = g[:, None] * w_hat, g[:, None] * w
    c = ((a * b).sum(1) + 0.5 * y * y) / ((a * a).sum(1) + 0.5 * y * y)
    c = c.clamp_min(0).float()
    assert torch.allclose(new.weight[i, j], bn.weight[i, j] * c, rtol=1e-6)
    assert torch.allclose(new.bias[i, j], bn.bias[i, j] * c, rtol=1e-6, atol=1e-7)
    others = torch.ones_like(bn.weight[..., 0], dtype=torch.bool)
    others[i, j] = False
    assert torch.equal(new.weight[others], bn.weight[others])
    assert torch.equal(new.bias[others], bn.bias[others])
    assert not torch.allclose(c, torch.ones_like(c))


def test_repaired_model_is_the_model_with_c_after_the_relu():
    """With the high conv's input quantizer off, the fold is exact."""
    model = coupled_pairnet(1)
    config = {"conv1": (3, 5), "conv2": (5, 5)}
    repaired, report = repair_config(model, config)
    base = copy.deepcopy(model)
    base.set_bits(config)
    for m in (base, repaired):
        m.conv2.a_bits = []  # skip conv2's input quantizer
    bn = base.bn1
    i, j = bn.wi, bn.ai
    c = repaired.bn1.weight[i, j] / bn.weight[i, j]
    base.act.register_forward_hook(lambda mod, inp, out: out * c.view(1, -1, 1, 1))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(repaired(x), base(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", [{"conv1": (4, 6), "conv2": (4, 6)},
                                    {"conv1": (5, 6), "conv2": (3, 6)}])
def test_pairs_not_low_to_high_are_left_alone(config):
    model = coupled_pairnet()
    repaired, report = repair_config(model, config)
    assert report == []
    assert same_tensors(model.state_dict(), repaired.state_dict())


def test_resnet20_repair_touches_only_blocks_with_a_rise_and_not_the_caller():
    model = quantize_(build_model("resnet20")).eval()
    before = copy.deepcopy(model.state_dict())
    config = {n: (6, 6) for n in model.rfq_mixed}
    config["blocks.4.conv1"] = (2, 6)
    config["blocks.7.conv1"] = (3, 6)
    config["blocks.7.conv2"] = (3, 6)  # equal bits: no repair
    _, report = repair_config(model, config)
    assert [r["low"] for r in report] == ["blocks.4.conv1"]
    assert same_tensors(before, model.state_dict())


def test_bad_lambdas_are_named():
    with pytest.raises(ValueError, match="lam2 must be a finite number >= 0"):
        repair_config(coupled_pairnet(), lam2=-0.1)
