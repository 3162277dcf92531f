"""Quantized modules, the converter, set_bits and the BitOps/size cost model."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rfq import reference as ref
from rfq.cost import CostModel, parse_budget
from rfq.models import build_model
from rfq.nn.modes import float_layers
from rfq.nn import (QuantConfig, QuantConv2d, SwitchableBatchNorm2d, current_config,
                    mixed_layers, quant_layers, quantize_, set_bits)


def bn_copies(model):
    return sum(m.weight.shape[0] * m.weight.shape[1] for m in model.modules()
               if isinstance(m, SwitchableBatchNorm2d))


@pytest.mark.parametrize("name,channels,mixed,copies,signed", [
    ("resnet20", 1, 18, 450, 0),  # spec §9: L = 18 mixed convs, 450 BN copies
    ("resnet18", 3, 19, 475, 0),  # spec §1: ResNet18 475 copies
    ("mobilenetv2", 3, 51, 1122, 17),  # 1122 copies; expansion inputs + last 1x1 are signed
])
def test_quantize_roles_and_bn_grid(name, channels, mixed, copies, signed):
    model = quantize_(build_model(name, channels, 10))
    layers = mixed_layers(model)
    assert len(layers) == mixed
    assert bn_copies(model) == copies
    assert sum(m.a_signed for _, m in layers) == signed
    roles = {m.role for _, m in quant_layers(model)}
    assert roles == {"stem", "mixed", "fc"}
    stem = [m for _, m in quant_layers(model) if m.role == "stem"][0]
    fc = [m for _, m in quant_layers(model) if m.role == "fc"][0]
    assert stem.w_bits == [8] and stem.a_bits == []  # the image is not quantized
    assert fc.w_bits == [8] and fc.a_bits == [8] and not fc.a_signed
    for _, m in layers:
        expect = [6, 5, 4, 3] if m.is_depthwise else [6, 5, 4, 3, 2]
        assert m.w_bits == expect and m.a_bits == expect


def test_mobilenet_signed_inputs_are_block_inputs():
    model = quantize_(build_model("mobilenetv2", 3, 10))
    signed = {n for n, m in mixed_layers(model) if m.a_signed}
    # the expansion conv of every block after the first reads the previous block's linear
    # projection output; so does the last 1x1 conv
    assert signed == {f"blocks.{i}.conv.0.0" for i in range(1, 17)} | {"last.0"}


def test_quantized_conv_matches_reference_composition():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True)
    q = QuantConv2d(conv, [6, 4, 2], [6, 4, 2], a_signed=False)
    x = torch.rand(2, 4, 5, 5)
    for w_bit, a_bit in [(6, 6), (4, 2), (2, 6)]:
        q.set_bits(w_bit, a_bit)
        y = q(x)
        s_a = q.a_steps.detach()[q.a_index]
        s_w = q.w_steps.detach()[q.w_index]
        xq = ref.lsq_fake_quant(x, s_a, a_bit, signed=False)
        wq = ref.lsq_fake_quant(conv.weight.detach(), s_w, w_bit, signed=True)
        torch.testing.assert_close(y, F.conv2d(xq, wq, conv.bias, 1, 1), rtol=0, atol=0)


def test_step_initialisation_rules():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    q = QuantConv2d(conv, [6, 5, 4, 3, 2], [6, 5, 4, 3, 2])
    w = conv.weight.detach()
    r = max(abs(w.mean() - 3 * w.std()), abs(w.mean() + 3 * w.std()))
    torch.testing.assert_close(q.w_steps.detach(), torch.stack([r / 2 ** (b - 1)
                                                                for b in [6, 5, 4, 3, 2]]))
    x = torch.rand(2, 3, 6, 6) * 3
    q.set_bits(4, 3)
    assert q.a_ready == [False] * 5
    q(x)
    expect = 2 * x.abs().mean() / math.sqrt(2**3 - 1)
    torch.testing.assert_close(q.a_steps.detach()[3], expect)
    assert q.a_ready == [False, False, False, True, False]


@pytest.mark.parametrize("bits", [(6, 6), (3, 2), (2, 5)])
def test_relu_before_an_unsigned_quantizer_is_folded_exactly(monkeypatch, bits):
    """ResNet blocks skip the ReLU in front of conv2 while conv2 quantizes its input unsigned:
    the same outputs, losses and gradients (weights, BN, steps) as with the ReLU, and the same
    activation-step initialisation (from relu(x) statistics)."""
    import rfq.models

    def run(fold):
        monkeypatch.setattr(rfq.models, "input_clamps_at_zero",
                            (lambda layer: bool(getattr(layer, "input_clamps_at_zero", False)))
                            if fold else (lambda layer: False))
        torch.manual_seed(0)
        model = quantize_(build_model("resnet20", 1, 10))
        set_bits(model, bits)
        x = torch.randn(4, 1, 12, 12)
        loss = F.cross_entropy(model(x), torch.tensor([1, 2, 3, 4]))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}, model

    loss_f, grads_f, model = run(True)
    loss_r, grads_r, _ = run(False)
    assert all(m.input_clamps_at_zero for n, m in mixed_layers(model) if n.endswith("conv2"))
    torch.testing.assert_close(loss_f, loss_r, rtol=0, atol=0)
    assert grads_f.keys() == grads_r.keys()
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_r[name], rtol=1e-6, atol=1e-7,
                                   msg=name)
    # a float model (quantization off) keeps its ReLU
    with float_layers(model):
        assert not any(m.input_clamps_at_zero for _, m in quant_layers(model))


def test_switchable_bn_uses_and_updates_only_the_selected_copy():
    bn = nn.BatchNorm2d(3)
    sbn = SwitchableBatchNorm2d(bn, 2, 3)
    with torch.no_grad():
        sbn.weight[1, 2].copy_(torch.tensor([2.0, 3.0, 4.0]))
    sbn.select(1, 2)
    x = torch.randn(4, 3, 2, 2) + 5
    y = sbn(x)
    w, b = (t.detach()[1, 2].clone().requires_grad_() for t in (sbn.weight, sbn.bias))
    expect = F.batch_norm(x, None, None, w, b, True, 0.1, bn.eps)
    torch.testing.assert_close(y, expect)
    g = torch.randn_like(y)
    y.backward(g)
    expect.backward(g)
    for stacked, alone in ((sbn.weight, w), (sbn.bias, b)):  # only the selected copy's gradient
        others = torch.ones(2, 3, dtype=torch.bool)
        others[1, 2] = False
        assert torch.equal(stacked.grad[1, 2], alone.grad)
        assert not stacked.grad[others].any()
    moved = (sbn.running_mean != 0).any(-1)
    assert moved.tolist() == [[False, False, False], [False, False, True]]
    assert sbn.used.tolist() == [[False, False, False], [False, False, True]]
    sbn.eval()
    y = sbn(x)
    torch.testing.assert_close(y, F.batch_norm(x, sbn.running_mean[1, 2], sbn.running_var[1, 2],
                                               sbn.weight[1, 2], sbn.bias[1, 2], False, 0.0,
                                               bn.eps))


def test_set_bits_forms_and_errors():
    model = quantize_(build_model("smallcnn"))
    names = [n for n, _ in mixed_layers(model)]
    assert set(set_bits(model, 4).values()) == {(4, 4)}
    assert set(set_bits(model, (3, 5)).values()) == {(3, 5)}
    set_bits(model, {names[0]: (2, 6)})
    assert current_config(model) == {names[0]: (2, 6), names[1]: (3, 5)}
    set_bits(model, [(6, 2), (5, 3)])
    assert current_config(model) == {names[0]: (6, 2), names[1]: (5, 3)}
    assert model.set_bits("min") == {n: (2, 2) for n in names}
    # the BN copy follows the conv's (w, a) candidate indices
    bn = mixed_layers(model)[0][1]._bn_ref[0]
    set_bits(model, {names[0]: (5, 3)})
    assert (bn.wi, bn.ai) == (1, 3)
    with pytest.raises(ValueError, match="weight bit-width 7 is not a candidate"):
        set_bits(model, 7)
    with pytest.raises(ValueError, match="unknown mixed layers"):
        set_bits(model, {"nope": (4, 4)})
    with pytest.raises(ValueError, match="needs 2"):
        set_bits(model, [(4, 4)])
    with pytest.raises(ValueError, match="'max' or 'min'"):
        set_bits(model, "all")


def test_mixed_layers_follow_module_replacement():
    # the layers are looked up by name on every call: a layer replaced after quantize_ is the
    # one returned, and a name that no longer resolves is an error naming the missing part
    model = quantize_(build_model("resnet20"))
    names = [n for n, _ in mixed_layers(model)]
    assert [m for _, m in mixed_layers(model)] == [model.get_submodule(n) for n in names]
    blocks = model.blocks
    old = blocks[1].conv1
    blocks[1].conv1 = torch.nn.Identity()
    assert dict(mixed_layers(model))["blocks.1.conv1"] is blocks[1].conv1
    blocks[1].conv1 = old
    del blocks[1].conv1
    with pytest.raises(AttributeError, match="conv1"):
        mixed_layers(model)


def test_config_validation():
    with pytest.raises(ValueError, match="bits must be non-empty bit-widths in 1..8"):
        QuantConfig(bits=(9, 4))
    with pytest.raises(ValueError, match="repeated"):
        QuantConfig(bits=(4, 4))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(quantize_(build_model("smallcnn")))


def test_bitops_of_a_hand_computed_model():
    model = quantize_(build_model("smallcnn", 1, 10, ))
    costs = CostModel(model, (1, 8, 8))
    # stem 3x3 1->16 at 8x8, body1 3x3 16->32 at 8x8, body2 3x3 32->32 stride 2 at 4x4, FC 32->10
    stem, body1, body2, fc = 9 * 16 * 64, 9 * 16 * 32 * 64, 9 * 32 * 32 * 16, 32 * 10
    config = {"body1.0": (4, 3), "body2.0": (2, 6)}
    assert costs.bitops(config) == 64 * (stem + fc) + 12 * body1 + 12 * body2
    size_bits = 8 * (9 * 16 + 320) + 4 * 9 * 16 * 32 + 2 * 9 * 32 * 32
    assert costs.size_bits(config) == size_bits
    assert costs.size_mib(config) == size_bits / (8 * 2**20)


def test_resnet20_uniform_costs_match_the_spec_table():
    model = quantize_(build_model("resnet20"))
    costs = CostModel(model, (1, 28, 28))
    spec = {2: (130.1, 66.0), 3: (283.6, 98.6), 4: (498.6, 131.3), 5: (775.0, 163.9),
            6: (1112.7, 196.5)}  # method_rfq.md §5 [derived]: M BitOps, KiB
    for b, (mbitops, kib) in spec.items():
        cfg = costs.uniform(model, b)
        assert round(costs.bitops(cfg) / 1e6, 1) == mbitops
        assert round(costs.size_kib(cfg), 1) == kib


def test_parse_budget():
    assert parse_budget("498.6M", "bitops") == pytest.approx(498.6e6)
    assert parse_budget("33.9G", "bitops") == pytest.approx(33.9e9)
    assert parse_budget("131KiB", "size") == 131 * 8 * 1024
    with pytest.raises(ValueError, match="positive"):
        parse_budget("-3M", "bitops")
    with pytest.raises(ValueError, match="not a number"):
        parse_budget("lots", "bitops")
