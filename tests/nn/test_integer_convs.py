"""The integer_convs mode: every conv after a ReLU computes its no-grad forwards from integer
codes (ops.integer_conv2d); each entry point (forward, after a BN, after a ReLU) gives the
integer convolution of the codes the float path would quantize, grad-enabled forwards and every
other layer keep the float path, and the cached and re-quantized weights agree bit for bit."""

import pytest
import torch
import torch.nn.functional as F

from rfq import ops
from rfq.methods.rfq import initialize_activation_steps
from rfq.models import build_model
from rfq.nn import QuantConv2d, SwitchableBatchNorm2d, mixed_layers, quantize_, set_bits
from rfq.nn.modes import bn_batch_statistics, integer_convs

pytestmark = pytest.mark.skipif(not ops.integer_conv_fast("cpu"),
                                reason="no integer convolution on this CPU (x86 oneDNN, VNNI)")


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = quantize_(build_model("resnet20", 1, 10)).to(memory_format=torch.channels_last)
    x = torch.randn(8, 1, 12, 12).contiguous(memory_format=torch.channels_last)
    initialize_activation_steps(model, x)
    return model.train(), x


def unsigned_convs(model):
    return [(n, m) for n, m in mixed_layers(model)
            if isinstance(m, QuantConv2d) and m.input_clamps_at_zero]


def float_forward(layer, x):
    """The layer's float path: fake-quantized input and weight, float convolution."""
    xq = ops.coupled_quant(x, layer.a_steps, layer.a_bits, layer.a_sel, False)
    return layer.compute(xq, layer.quantized_weight())


def integer_forward(layer, x):
    """The integer convolution of the codes the float path quantizes, from scratch."""
    j, k = layer.a_index, layer.w_index
    codes = ops.quantize_codes(x, layer.a_steps.detach()[j], layer.a_bit, False)
    w_codes = ops.quantize_codes(layer.weight.detach(), layer.w_steps.detach()[k], layer.w_bit,
                                 True)
    packed = ops.pack_conv_codes(w_codes, float(layer.w_steps.detach()[k]), layer.stride, layer.padding,
                                 layer.dilation, layer.groups, layer.bias)
    return ops.integer_conv2d(codes, float(layer.a_steps.detach()[j]), packed)


def test_the_mode_takes_exactly_the_convs_after_a_relu(resnet):
    model, _ = resnet
    convs = unsigned_convs(model)
    assert len(convs) == 18  # the stem (signed input) and the classifier keep the float path
    with integer_convs(model):
        entered = {n for n, m in mixed_layers(model) if m.integer_input_scales is not None}
        assert entered == {n for n, _ in convs}
        assert all(len(m.integer_weights) == len(m.w_bits) for _, m in convs)
    assert all(m.integer_input_scales is None and m.integer_weights is None
               for _, m in mixed_layers(model))
    with pytest.raises(RuntimeError, match="boom"), integer_convs(model):
        raise RuntimeError("boom")
    assert all(m.integer_input_scales is None for _, m in mixed_layers(model))


@pytest.mark.parametrize("bits", [(5, 5), (2, 4), (6, 2)])
def test_each_layer_computes_the_integer_convolution_of_its_codes(resnet, bits):
    model, x = resnet
    set_bits(model, bits)
    _, layer = unsigned_convs(model)[7]
    g = torch.Generator().manual_seed(bits[0])
    h = torch.randn(4, layer.in_channels, 7, 7, generator=g).contiguous(
        memory_format=torch.channels_last)
    with torch.no_grad():
        before = float_forward(layer, h)
        with integer_convs(model):
            y = layer(h)
        after = layer(h)
    assert torch.equal(y, integer_forward(layer, h))
    assert torch.equal(after, before)  # the float path is back after the mode
    # the float path agrees to fp32 rounding (the magnitude sum bounds it)
    xq = ops.coupled_quant(h, layer.a_steps, layer.a_bits, layer.a_sel, False)
    magnitude = F.conv2d(xq.abs(), layer.quantized_weight().abs(), None, layer.stride,
                         layer.padding)
    assert ((y - before).abs() <= 1e-6 * magnitude + 1e-12).all()


def test_after_a_bn_and_after_a_relu_are_the_composition(resnet):
    model, _ = resnet
    set_bits(model, (4, 3))
    _, layer = unsigned_convs(model)[4]
    bn = SwitchableBatchNorm2d(torch.nn.BatchNorm2d(layer.in_channels), 1, 1)
    s = torch.randn(4, layer.in_channels, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), integer_convs(model), bn_batch_statistics(bn):
        assert torch.equal(layer.forward_after_norm(bn, s), layer(bn(s)))
        r, y = layer.forward_after_relu(s)
        assert torch.equal(r, F.relu(s)) and torch.equal(y, layer(F.relu(s)))
        assert torch.equal(y, integer_forward(layer, F.relu(s)))


def test_grad_enabled_forwards_keep_the_float_path(resnet):
    model, x = resnet
    set_bits(model, (3, 3))
    with integer_convs(model):
        y = model(x)  # training forward: autograd needs the float path
        y.sum().backward()
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(y.detach(), expected)
    model.zero_grad(set_to_none=True)


def test_cached_and_requantized_weights_agree(resnet):
    model, x = resnet
    outs = []
    for cache in (True, False):
        with torch.no_grad(), integer_convs(model, cache_weights=cache), \
                bn_batch_statistics(model):
            outs.append([model(x) for bits in [(6, 6), (2, 5), (4, 2)]
                         if set_bits(model, bits) is None])
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_subclasses_with_their_own_weight_and_hooked_layers_keep_the_float_path(resnet):
    """A subclass's own weight (CSQ's bit planes, hot-swap's wavelets) or forward is not what
    the mode would pack; a layer with hooks must see its own __call__."""
    import copy

    class OwnWeight(QuantConv2d):
        def quantized_weight(self):
            return super().quantized_weight()

    model = copy.deepcopy(resnet[0])
    (_, first), (_, second) = unsigned_convs(model)[:2]
    first.__class__ = OwnWeight
    h = torch.randn(2, second.in_channels, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = float_forward(second, h)
        with integer_convs(model):
            assert first.integer_input_scales is None
            assert second.integer_input_scales is not None
            handle = second.register_forward_hook(lambda *args: None)
            hooked = second(h)
            handle.remove()
            unhooked = second(h)
    assert torch.equal(hooked, expected)
    assert torch.equal(unhooked, integer_forward(second, h))
