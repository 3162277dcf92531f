"""quantize_ on a model torch.fx cannot trace: signed input quantizers with a warning that says
why and how to declare signedness; never silent clipping of negative activations."""

import warnings

import pytest
import torch
from torch import nn

import rfq
from rfq.nn import QuantConfig, UntraceableModelWarning, mixed_layers, quantize_


class Untraceable(nn.Module):
    """Data-dependent control flow: symbolic tracing fails. conv2 reads conv1's raw (signed)
    output, conv3 a ReLU's."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv1(self.stem(x))
        if h.sum() > 0:  # not traceable
            h = h * 1.0
        h = torch.relu(self.conv3(torch.relu(self.conv2(h))))
        return self.fc(h.mean((2, 3)))


def test_untraceable_model_gets_signed_inputs_and_a_warning():
    with pytest.warns(UntraceableModelWarning, match="signed_inputs") as record:
        model = quantize_(Untraceable())
    message = str(record[0].message)
    assert "Untraceable" in message and "could not trace" in message
    layers = dict(mixed_layers(model))
    assert set(layers) == {"conv1", "conv2", "conv3"}
    assert all(m.a_signed for m in layers.values())


def test_untraceable_model_keeps_negative_activations():
    torch.manual_seed(0)
    with pytest.warns(UntraceableModelWarning):
        model = quantize_(Untraceable())
    model.set_bits(6)
    conv2 = dict(mixed_layers(model))["conv2"]
    x = torch.randn(2, 4, 5, 5)  # half of it negative
    q = conv2.quantize_input(x)
    assert (q < 0).float().mean() > 0.3  # an unsigned quantizer would clip all of them to 0
    assert torch.all((q - x).abs() <= conv2.a_steps.detach()[conv2.a_index] / 2 + 1e-6)


def test_declared_signedness_is_used_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntraceableModelWarning)
        model = quantize_(Untraceable(), QuantConfig(signed_inputs=["conv2"]))
    signed = {n: m.a_signed for n, m in mixed_layers(model)}
    assert signed == {"conv1": False, "conv2": True, "conv3": False}


def test_signed_inputs_naming_unknown_layers_is_an_error():
    with pytest.raises(ValueError, match=r"signed_inputs.*\['conv9'\]"):
        quantize_(Untraceable(), QuantConfig(signed_inputs=["conv9"]))


def test_traceable_model_does_not_warn():
    from rfq.models import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("error", UntraceableModelWarning)
        rfq.quantize_(build_model("smallcnn"))


def test_public_api_at_the_top_level():
    assert rfq.quantize_ is quantize_
    assert rfq.set_bits is rfq.nn.set_bits and rfq.QuantConfig is QuantConfig
    assert rfq.ops.coupled_quant is rfq.ops.lsq.coupled_quant
