"""Hot-swap layers: the wavelet path at 3..1 bits (1 bit binary per band, more than 2^b
distinct values), the direct LSQ path at 4..8, the ablation, switching, bad input."""

import pytest
import torch

from rfq.methods.hotswap import HotSwapConv2d, hotswap_
from rfq.models import build_model
from rfq.nn import mixed_layers
from rfq.nn.modules import QuantConv2d


def layer(groups=1, c=6, wavelet=True):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(c, 5 if groups == 1 else c, 3, padding=1, groups=groups, bias=False)
    return HotSwapConv2d(conv, [8, 7, 6, 5, 4, 3, 2, 1], [8, 7, 6, 5, 4, 3, 2, 1],
                         wavelet=wavelet)


@pytest.mark.parametrize("groups", [1, 6])
def test_one_bit_is_binary_per_band(groups):
    m = layer(groups)
    m.set_bits(1, 1)
    bands = m.quantized_bands().detach()
    steps = m.band_steps.detach()[m.wavelet_bits.index(1)]
    for band, s in zip(bands, steps):
        assert set(band.unique().tolist()) <= {-s.item(), s.item()}
    assert len(bands) == (2 if groups > 1 else 4)


@pytest.mark.parametrize("bits", [3, 2, 1])
@pytest.mark.parametrize("groups", [1, 6])
def test_wavelet_weight_has_more_than_2_to_the_b_values(bits, groups):
    m = layer(groups)
    m.set_bits(bits, bits)
    assert m.uses_wavelet
    assert m.quantized_weight().detach().unique().numel() > 2 ** bits


@pytest.mark.parametrize("bits", [8, 5, 4])
def test_direct_path_is_the_lsq_grid(bits):
    m = layer()
    m.set_bits(bits, bits)
    assert not m.uses_wavelet
    w = m.quantized_weight().detach()
    s = m.w_steps.detach()[m.w_index]
    q = w / s
    torch.testing.assert_close(q, q.round(), rtol=0, atol=1e-4)
    assert w.unique().numel() <= 2 ** bits


def test_wavelet_off_is_the_direct_path_at_every_bit():
    m = layer(wavelet=False)
    m.set_bits(2, 2)
    assert not m.uses_wavelet and m.quantized_weight().detach().unique().numel() <= 4


def test_band_steps_learn_and_the_weight_gets_gradients():
    m = layer()
    m.set_bits(2, 2)
    m.train()
    m(torch.randn(2, 6, 5, 5)).square().sum().backward()
    g = m.band_steps.grad
    row = m.wavelet_bits.index(2)
    assert g[row].abs().sum() > 0 and g[[i for i in range(3) if i != row]].abs().sum() == 0
    assert m.weight.grad.abs().sum() > 0 and m.band_used[row] and not m.band_used[0]


def test_hotswap_model_switches_every_layer_and_keeps_stem_and_fc():
    model = hotswap_(build_model("resnet20", 1, 10)).eval()
    model.set_bits(2)
    layers = mixed_layers(model)
    assert all(type(m) is HotSwapConv2d and (m.w_bit, m.a_bit) == (2, 2) for _, m in layers)
    assert type(model.stem[0]) is QuantConv2d and model.stem[0].w_bits == [8]
    assert model.head.fc.w_bits == [8]
    with pytest.raises(ValueError, match="weight bit-width 9 is not a candidate"):
        model.set_bits(9)
    with pytest.raises(ValueError, match="hot-swap bits must be in 1..8"):
        hotswap_(build_model("resnet20", 1, 10), bits=(8, 0))


def test_a_layer_type_without_a_wavelet_rule_is_refused_whole():
    model = build_model("smallcnn", 1, 10)
    model.extra = torch.nn.ConvTranspose2d(4, 4, 2)
    with pytest.raises(ValueError, match="'extra' is a ConvTranspose2d, which has no wavelet"):
        hotswap_(model)
    assert type(model.body1[0]) is torch.nn.Conv2d  # nothing was changed


def test_switching_bits_under_compile_does_not_recompile():
    """Frozen (every bit's weight kept), in eval mode the model reads only device selectors:
    torch.compile(fullgraph=True) compiles once and matches eager at every bit."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from rfq.methods.hotswap import freeze

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = hotswap_(build_model("smallcnn", 1, 10)).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        model(x)  # input steps from this batch
        eager = {}
        for b in (8, 5, 3, 2, 1):
            model.set_bits(b)
            eager[b] = model(x)
        freeze(model)
        counter = CompileCounter()
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        for b in (8, 5, 3, 2, 1, 8):
            model.set_bits(b)
            torch.testing.assert_close(compiled(x), eager[b], rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2"])
def test_every_bit_exports_and_the_loaded_model_matches(name, tmp_path):
    """Wavelet layers store band codes, per-band steps and the convention; the model loaded from
    the file equals the fake-quantized one at that bit (per layer on the same inputs)."""
    import sys
    from pathlib import Path

    from rfq import deploy
    from rfq.deploy.methods import export_hotswap as export
    from rfq.nn import quant_layers
    from rfq.nn.packed import PackedLayer

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "deploy"))
    from deploy_cases import example_input
    from independent_reader import read_codes
    from test_export import assert_each_layer_matches

    torch.manual_seed(0)
    channels = 1 if name == "resnet20" else 3
    model = hotswap_(build_model(name, channels, 10)).eval()
    x = example_input(name, 2)
    with torch.no_grad():
        for b in (8, 3, 1):  # input steps at the bits the test exports
            model.set_bits(b)
            model(x)
    for b in (8, 3, 1):
        model.set_bits(b)
        path = export(model, b, tmp_path / f"w{b}.safetensors")
        loaded = deploy.load(path)
        haar = [m for m in loaded.modules() if isinstance(m, PackedLayer) and m.code == "haar"]
        assert (len(haar) == len(model.rfq_mixed)) == (b <= 3) and (b > 3) == (not haar)
        stored = read_codes(str(path))
        for n, m in loaded.named_modules():
            if isinstance(m, PackedLayer):
                assert torch.equal(torch.from_numpy(stored[n]), m.codes()), n
        for m in haar:
            assert m.codes().unique().numel() <= 2 ** b
            if b == 1:
                assert set(m.codes().unique().tolist()) <= {-1, 1}
        assert_each_layer_matches(model, loaded, x)
        assert len(quant_layers(model)) == sum(isinstance(m, PackedLayer)
                                               for m in loaded.modules())
