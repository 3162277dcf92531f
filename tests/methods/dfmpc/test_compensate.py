"""DF-MPC's closed form, folding and procedure on constructed cases where the answer is known."""

import inspect

import pytest
import torch
from scipy.optimize import minimize_scalar
from torch import nn

from rfq.methods.dfmpc import (FOLD_BN, FOLD_NEXT, Pair, PairingError, closed_form_c,
                               compensate, find_pairs, quantize_uncompensated, quantize_weight)
from rfq.methods.dfmpc.compensate import fold_c, pair_c
from rfq.models import build_model

from dfmpc_cases import PairNet, randomize_bn, scaled_after_act


# ---- the closed form ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_closed_form_is_the_numerical_argmin(seed):
    g = torch.Generator().manual_seed(seed)
    c_n, n = 5, 40
    a = torch.randn(c_n, n, generator=g, dtype=torch.float64)
    b = a * (0.5 + torch.rand(c_n, 1, generator=g, dtype=torch.float64)) \
        + 0.3 * torch.randn(c_n, n, generator=g, dtype=torch.float64)
    b[0] = -a[0]  # a channel whose best unconstrained c is negative: clipped at 0
    y_hat = torch.randn(c_n, generator=g, dtype=torch.float64)
    y = torch.randn(c_n, generator=g, dtype=torch.float64)
    lam1, lam2 = 0.5, 0.3 * seed
    c = closed_form_c(a, b, y_hat, y, lam1, lam2)
    for j in range(c_n):
        def loss(cj):
            return float(((cj * a[j] - b[j]) ** 2).sum() + lam1 * (cj * y_hat[j] - y[j]) ** 2
                         + lam2 * cj ** 2)
        best = minimize_scalar(loss, bounds=(0, 100), method="bounded",
                               options={"xatol": 1e-10}).x
        assert abs(float(c[j]) - best) < 1e-6
    assert float(c[0]) == 0.0


def test_zero_denominator_gives_one():
    a = torch.zeros(2, 3, dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    assert closed_form_c(a, a, zero, zero, 0.5, 0.0).tolist() == [1.0, 1.0]


def bn_terms(c_n, seed):
    g = torch.Generator().manual_seed(seed)
    gamma = (0.5 + torch.rand(c_n, generator=g)).double()
    beta = torch.randn(c_n, generator=g).double()
    mu = torch.randn(c_n, generator=g).double()
    sigma = (0.5 + torch.rand(c_n, generator=g)).double()
    return gamma, beta, mu, sigma


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_rules_r1_and_r2_give_the_identical_c(bits):
    w = torch.randn(12, 4, 3, 3)
    q = quantize_weight(w, bits)
    terms = bn_terms(12, bits)
    c1 = pair_c(w, q, *terms, 0.5, 0.1, "R1")
    c2 = pair_c(w, q, *terms, 0.5, 0.1, "R2")
    assert torch.allclose(c1, c2, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(c1, torch.ones_like(c1))  # a real compensation, not the default


def test_exact_weights_and_no_penalty_give_c_of_one():
    """w_hat = w (a weight already on the DoReFa grid) and lam2 = 0: nothing to compensate."""
    w = quantize_weight(torch.randn(10, 3, 3, 3), 4).dequantize()
    q = quantize_weight(w, 4)
    assert torch.equal(q.dequantize(), w)
    c = pair_c(w, q, *bn_terms(10, 0), 0.5, 0.0)
    assert torch.allclose(c, torch.ones_like(c), rtol=0, atol=1e-12)


# ---- folding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["bn-relu", "bn-relu-pool", "nobn-relu-bias", "relu6-next",
                                  "hardswish-next-depthwise", "relu6-next-grouped"])
def test_folding_c_leaves_the_float_function_unchanged(case):
    """Folding c equals multiplying channel j after the activation by c_j (in float)."""
    kw = {"bn-relu": {}, "bn-relu-pool": {"pool": True},
          "nobn-relu-bias": {"bn": False, "bias": True},
          "relu6-next": {"act": nn.ReLU6},
          "hardswish-next-depthwise": {"act": nn.Hardswish, "groups": 8},
          "relu6-next-grouped": {"act": nn.ReLU6, "groups": 2}}[case]
    torch.manual_seed(0)
    model = randomize_bn(PairNet(**kw))
    (pair,) = find_pairs(model)
    assert (pair.low, pair.high) == ("conv1", "conv2")
    assert pair.fold == (FOLD_NEXT if "next" in case else FOLD_BN)
    assert pair.bn == (None if "nobn" in case else "bn1")
    c = 0.2 + 1.6 * torch.rand(8)
    c[3] = 0.0
    x = torch.randn(4, 3, 10, 10)
    import copy
    folded = copy.deepcopy(model)
    fold_c(folded, pair, c)
    expected = scaled_after_act(copy.deepcopy(model), c)(x)
    assert torch.allclose(folded(x), expected, rtol=1e-5, atol=1e-6)


def test_compensated_model_is_the_quantized_model_with_c_after_the_relu():
    torch.manual_seed(1)
    model = randomize_bn(PairNet())
    comp, report = compensate(model, 2, 6)
    plain, _ = quantize_uncompensated(model, 2, 6)
    c = report.pairs[0].c
    x = torch.randn(3, 3, 10, 10)
    assert torch.allclose(comp(x), scaled_after_act(plain, c)(x), rtol=1e-5, atol=1e-6)
    assert report.layers["conv1"].kind == "ternary" and report.layers["conv1"].bits == 2
    assert all(report.layers[n].kind == "dorefa" and report.layers[n].bits == 6
               for n in ("conv2", "fc"))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("low", [2, 3])
def test_compensation_lowers_the_pairs_error_on_gaussian_inputs(seed, low):
    """A conv-BN-ReLU-conv-BN pair with BN statistics of Gaussian inputs: the compensated 2/6
    (and 3/6) pair's output is closer to the float pair's than the uncompensated one."""
    torch.manual_seed(seed)
    pair = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32),
                         nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, bias=False),
                         nn.BatchNorm2d(32))
    for m in pair.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    pair.train()
    with torch.no_grad():
        for _ in range(5):
            pair(torch.randn(64, 16, 12, 12))
    pair.eval()
    x = torch.randn(64, 16, 12, 12)
    with torch.no_grad():
        ref = pair(x)
        err_comp = (compensate(pair, low, 6)[0](x) - ref).pow(2).mean()
        err_plain = (quantize_uncompensated(pair, low, 6)[0](x) - ref).pow(2).mean()
    assert err_comp < err_plain


# ---- no data, no side effects, bad input -------------------------------------------------------


def test_no_data_is_read():
    """compensate takes no data argument and never runs any module on a tensor (torch.fx's
    tracing runs forwards on symbolic proxies only, which carry no values)."""
    params = set(inspect.signature(compensate).parameters)
    assert params == {"model", "low", "high", "pairs", "lam1", "lam2", "rule"}
    model = randomize_bn(build_model("resnet20"))

    def refuse(mod, args):
        if any(isinstance(a, torch.Tensor) for a in args):
            raise AssertionError(f"{type(mod).__name__}.forward ran on a tensor")

    for m in model.modules():
        m.register_forward_pre_hook(refuse)
    comp, report = compensate(model, 2, 6)
    assert len(report.pairs) == 9


def test_the_callers_model_is_never_modified():
    model = randomize_bn(build_model("resnet20"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    comp, _ = compensate(model, 2, 6)
    with pytest.raises(ValueError):
        compensate(model, 7, 6)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(comp.blocks[0].conv1.weight, model.blocks[0].conv1.weight)


def test_report_counts_bits_and_size():
    model = randomize_bn(build_model("resnet20"))
    _, report = compensate(model, 2, 6)
    params = {n: m.weight.numel() for n, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))}
    low = {f"blocks.{i}.conv1" for i in range(9)}
    bits = sum(p * (2 if n in low else 6) for n, p in params.items())
    assert report.size_kib == bits / 8 / 1024
    assert report.average_bits == bits / sum(params.values())
    assert list(report.layers) == list(params)
    summary = report.summary()
    assert summary["layers"]["blocks.0.conv1"] == {"bits": 2, "kind": "ternary",
                                                   "params": params["blocks.0.conv1"]}
    assert "c" not in summary["pairs"][0]


@pytest.mark.parametrize("kwargs, match", [
    ({"low": 1}, r"low must be a bit-width in 2..8"),
    ({"high": 9}, r"high must be a bit-width in 2..8"),
    ({"low": 6, "high": 4}, r"low \(6\) must not exceed high \(4\)"),
    ({"low": 2.0}, r"low must be a bit-width"),
    ({"lam1": -1.0}, r"lam1 must be a finite number >= 0"),
    ({"lam2": float("nan")}, r"lam2 must be a finite number >= 0"),
    ({"rule": "R3"}, r"rule must be one of"),
])
def test_bad_arguments_are_named(kwargs, match):
    model = randomize_bn(PairNet())
    args = {"low": 2, "high": 6, **kwargs}
    with pytest.raises(ValueError, match=match):
        compensate(model, args.pop("low"), args.pop("high"), **args)


def test_nothing_pairable_is_an_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(2))
    with pytest.raises(PairingError, match="nothing pairable in Sequential"):
        compensate(model, 2, 6)


def test_equal_bits_are_allowed():
    """6/6, as the paper runs MobileNetV2: the compensation still corrects the low layer."""
    model = randomize_bn(build_model("mobilenetv2"))
    _, report = compensate(model, 6, 6)
    assert {q.bits for q in report.layers.values()} == {6}
    assert any(p.fold == FOLD_NEXT for p in report.pairs)
    assert Pair  # the pair type is public
