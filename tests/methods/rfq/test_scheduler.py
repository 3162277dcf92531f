"""The bit-width scheduler on constructed weights: events, ratios, and which bits it freezes."""

import math

import pytest
import torch
from torch import nn

from rfq.nn import QuantConfig, mixed_layers, quantize_
from rfq.methods.rfq.scheduler import BitWidthScheduler


class Chain(nn.Module):
    """stem -> four mixed 1x1 convs -> GAP -> FC."""

    def __init__(self, layers=4):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 1)
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())
                                    for _ in range(layers)])
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.body(self.stem(x).relu()).mean((2, 3)))


def constructed_model(turbulent_share):
    """Layer l's weights sit at v = w/s_b with a chosen share in the outer rounding band at
    every candidate b (the steps nest exactly, so v scales by 2 per bit)."""
    model = quantize_(Chain(len(turbulent_share)), QuantConfig(bits=(4, 3, 2)))
    for (_, layer), share in zip(mixed_layers(model), turbulent_share):
        n = layer.weight.numel()  # 16
        k = round(share * n)
        # at b = 2 (step 1): 0.45 is in the outer band (> 0.375), 0.0 is not; at b = 3, 4 the
        # values double / quadruple: 0.9 -> |v - rint v| = 0.1, 1.8 -> 0.2: not turbulent
        v = torch.tensor([0.45] * k + [0.0] * (n - k))
        with torch.no_grad():
            layer.w_steps.copy_(torch.tensor([0.25, 0.5, 1.0]))
            layer.weight.copy_(v.reshape(layer.weight.shape))
    return model


def test_event_epochs_and_ratio_match_the_spec():
    model = quantize_(Chain(1))
    s = BitWidthScheduler(model, epochs=150, freeze_start=5, p_early=2, p_late=15)
    events = [e for e in range(150) if s.is_event(e)]
    assert events == list(range(7, 108, 2)) + [119, 134, 149]  # spec §3 for E = 150
    assert s.ratio(7) == pytest.approx(0.50, abs=5e-3)
    assert s.ratio(107) == pytest.approx(0.27, abs=5e-3)
    assert s.ratio(149) == pytest.approx(0.20, abs=5e-3)
    scaled = BitWidthScheduler(model, epochs=40, freeze_start=2, p_early=2,
                               p_late=math.ceil(40 / 10))
    assert [e for e in range(40) if scaled.is_event(e)] == list(range(3, 28, 2)) + [31, 35, 39]


def test_turbulence_is_the_mean_share_over_bits():
    model = constructed_model([0.5, 0.25, 0.0, 1.0])
    s = BitWidthScheduler(model, epochs=10, freeze_start=0)
    scores = s.turbulence(model)
    # only the 2-bit grid sees the values in its outer band: T = mean(share_2 / 2, 0, 0)
    expect = [0.5 / 2 / 3, 0.25 / 2 / 3, 0.0, 1.0 / 2 / 3]
    assert list(scores.values()) == pytest.approx(expect)


def test_freezes_the_lowest_bit_of_the_most_turbulent_layers_then_restores():
    model = constructed_model([0.5, 0.25, 0.125, 1.0])
    names = [n for n, _ in mixed_layers(model)]
    s = BitWidthScheduler(model, epochs=10, freeze_start=0, ratio_max=0.5, ratio_min=0.5)
    assert s.is_event(1)
    frozen = s.step(model, 1)  # K = floor(0.5 * 4) = 2: layers 3 and 0 are the most turbulent
    assert frozen == [names[0], names[3]]
    assert s.w_sets[names[0]] == [4, 3] and s.a_sets[names[0]] == [4, 3]  # shared W/A sets
    assert s.w_sets[names[1]] == [4, 3, 2]
    # next event: the frozen layers are scored without bit 2 (turbulence 0), so layers 1 and 2
    # are the top K and lose bit 2; the previously frozen ones get their full sets back
    assert s.step(model, 3) == [names[1], names[2]]
    assert s.w_sets[names[0]] == [4, 3, 2] and s.w_sets[names[3]] == [4, 3, 2]
    assert s.frozen_layers() == [names[1], names[2]]


def test_a_top_layer_already_frozen_keeps_its_set_and_counts_towards_k():
    model = constructed_model([1.0, 0.0, 0.0])
    names = [n for n, _ in mixed_layers(model)]
    s = BitWidthScheduler(model, epochs=10, freeze_start=0, ratio_max=0.34, ratio_min=0.34)
    assert s.step(model, 1) == [names[0]]  # K = 1
    with torch.no_grad():  # make layer 0 turbulent at 3 bits too: it stays the top layer
        mixed_layers(model)[0][1].w_steps.copy_(torch.tensor([0.25, 0.9, 1.0]))
    assert s.step(model, 3) == []
    assert s.w_sets[names[0]] == [4, 3]  # not restored, not shrunk further
    assert s.w_sets[names[1]] == [4, 3, 2]


def test_split_sets_drop_the_bit_from_weights_only():
    model = constructed_model([1.0, 0.0])
    s = BitWidthScheduler(model, epochs=10, freeze_start=0, ratio_max=0.5, ratio_min=0.5,
                          shared_sets=False)
    name = mixed_layers(model)[0][0]
    assert s.step(model, 1) == [name]
    assert s.w_sets[name] == [4, 3] and s.a_sets[name] == [4, 3, 2]


def test_non_event_epochs_change_nothing_and_state_round_trips():
    model = constructed_model([1.0, 0.5])
    s = BitWidthScheduler(model, epochs=10, freeze_start=3)
    assert s.step(model, 2) == []  # before the freeze start
    assert s.step(model, 4) == []  # (4 + 1) % 2 != 0
    s.step(model, 5)
    t = BitWidthScheduler(model, epochs=10, freeze_start=3)
    t.load_state_dict(s.state_dict())
    assert t.w_sets == s.w_sets and t.history == s.history
    with pytest.raises(ValueError, match="ratio_min <= ratio_max"):
        BitWidthScheduler(model, epochs=10, ratio_max=0.1, ratio_min=0.3)
