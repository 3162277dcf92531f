"""DF-MPC's closed-form compensation and its folding (spec methods_seeds.md §A.3-A.5).

No data of any kind is read: the function takes a model and numbers, and never runs the model's
forward. Each pair's low conv is quantized low (ternary for 2 bits, DoReFa for 3..8), every other
conv and linear high; then per output channel j of the low conv

    c_j = max(0, (<a_j, b_j> + lam1 yhat_j y_j) / (|a_j|^2 + lam1 yhat_j^2 + lam2))

with a_j = (gamma_j/sigma_j) w_hat_j, b_j = (gamma_j/sigma_j) w_j and the BN offsets
y = beta - gamma mu / sigma (rule R1: the scales kept, mu_hat = mu, sigma_hat = sigma, so
yhat = y; R2 drops the scale into the BN statistics and gives the identical c). c folds into the
low conv's BN (gamma, beta <- c gamma, c beta), which is exact because ReLU(c z) = c ReLU(z);
after ReLU6/hardswish it scales the high conv's input channels before their quantization instead.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rfq import ops
from rfq.methods.dfmpc.pairing import (FOLD_BN, Pair, PairingError, check_pairs, find_pairs,
                                       weight_layers)

RULES = ("R1", "R2")


@dataclass
class LayerCodes:
    """One quantized layer as the deploy path stores it: W_hat = dequantize(codes, scale), times
    ``channel_scale`` per output row where a compensation folded into the layer itself."""
    bits: int
    kind: str  # "ternary" (codes -1/0/1, W_hat = scale codes) or "dorefa" (codes 0..2^k-1)
    codes: Tensor
    scale: Tensor
    channel_scale: Tensor | None = None

    @property
    def params(self) -> int:
        return self.codes.numel()

    def dequantize(self) -> Tensor:
        if self.kind == "ternary":
            w = ops.dequantize_ternary(self.codes, self.scale)
        else:
            w = ops.dequantize_dorefa(self.codes, self.scale, self.bits)
        if self.channel_scale is not None:
            w = w * self.channel_scale.reshape(-1, *([1] * (w.dim() - 1)))
        return w


@dataclass
class PairReport:
    low: str
    high: str
    bn: str | None
    fold: str
    c_min: float
    c_mean: float
    c_max: float
    c_zero: int  # channels switched off (c = 0)
    c: Tensor | None = None  # per channel (all ones when not compensated)


@dataclass
class Report:
    low_bits: int
    high_bits: int
    lam1: float
    lam2: float
    rule: str
    compensated: bool
    pairs: list[PairReport] = field(default_factory=list)
    layers: dict[str, LayerCodes] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def average_bits(self) -> float:
        """Weight bits per parameter over every quantized layer (ternary counts as 2)."""
        n = sum(q.params for q in self.layers.values())
        return sum(q.params * q.bits for q in self.layers.values()) / n

    @property
    def size_kib(self) -> float:
        """Quantized weights at their bit-widths (BN and biases, fp32, not counted)."""
        return sum(q.params * q.bits for q in self.layers.values()) / 8 / 1024

    def summary(self) -> dict:
        return {"low_bits": self.low_bits, "high_bits": self.high_bits, "lam1": self.lam1,
                "lam2": self.lam2, "rule": self.rule, "compensated": self.compensated,
                "average_bits": self.average_bits, "size_kib": self.size_kib,
                "seconds": self.seconds,
                "layers": {n: {"bits": q.bits, "kind": q.kind, "params": q.params}
                           for n, q in self.layers.items()},
                "pairs": [{k: v for k, v in vars(p).items() if k != "c"} for p in self.pairs]}


def quantize_weight(w: Tensor, bits: int) -> LayerCodes:
    """Ternary at 2 bits, DoReFa at 3..8 (per tensor)."""
    if bits == 2:
        codes, scale = ops.ternary_codes(w)
        return LayerCodes(bits, "ternary", codes, scale)
    codes, scale = ops.dorefa_codes(w, bits)
    return LayerCodes(bits, "dorefa", codes, scale)


def closed_form_c(a: Tensor, b: Tensor, y_hat: Tensor, y: Tensor, lam1: float,
                  lam2: float) -> Tensor:
    """argmin over c >= 0 of |c a_j - b_j|^2 + lam1 (c yhat_j - y_j)^2 + lam2 c^2, per row j of
    a, b ([C, n]); a zero denominator (nothing to match) gives c = 1."""
    num = (a * b).sum(1) + lam1 * y_hat * y
    den = (a * a).sum(1) + lam1 * y_hat * y_hat + lam2
    c = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 1.0)
    return c.clamp_min(0.0)


def _bn_terms(model: nn.Module, pair: Pair, channels: int):
    """(gamma, beta, mu, sigma) of the low conv's BN in fp64; without BN gamma = sigma = 1,
    mu = 0 and beta = the conv's bias (spec §A.5 item 3)."""
    conv = model.get_submodule(pair.low)
    if pair.bn is None:
        beta = conv.bias.double() if conv.bias is not None else torch.zeros(channels,
                                                                            dtype=torch.float64)
        one = torch.ones(channels, dtype=torch.float64)
        return one, beta, torch.zeros_like(one), one
    bn = model.get_submodule(pair.bn)
    sigma = (bn.running_var.double() + bn.eps).sqrt()
    return bn.weight.double(), bn.bias.double(), bn.running_mean.double(), sigma


def bn_gain_and_offset(gamma: Tensor, beta: Tensor, mu: Tensor, sigma: Tensor):
    """BN(z) = g z + y per channel: g = gamma / sigma, y = beta - gamma mu / sigma."""
    return gamma / sigma, beta - gamma * mu / sigma


def pair_c(w: Tensor, q: LayerCodes, gamma: Tensor, beta: Tensor, mu: Tensor, sigma: Tensor,
           lam1: float, lam2: float, rule: str = "R1") -> Tensor:
    """The compensation vector of one pair from the low conv's float weight ``w`` [C, ...], its
    quantized codes and its BN terms."""
    rows = w.double().reshape(w.shape[0], -1)
    rows_hat = q.dequantize().double().reshape(w.shape[0], -1)
    g, y = bn_gain_and_offset(gamma, beta, mu, sigma)
    if rule == "R2" and float(q.scale) > 0:
        # the quantizer's scale dropped from W_hat and moved into the BN statistics
        alpha = q.scale.double()
        sigma_hat, mu_hat = sigma / alpha, mu / alpha
        a = (gamma / sigma_hat)[:, None] * (rows_hat / alpha)
        y_hat = beta - gamma * mu_hat / sigma_hat
    else:
        a, y_hat = g[:, None] * rows_hat, y
    return closed_form_c(a, g[:, None] * rows, y_hat, y, lam1, lam2)


def _scale_input_channels(conv: nn.Conv2d, c: Tensor) -> None:
    """W[:, j] *= c_j for every input channel j (grouped convs: j's own group)."""
    w = conv.weight
    g = conv.groups
    view = w.view(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
    view.mul_(c.to(w.dtype).view(g, 1, w.shape[1], *([1] * (w.dim() - 2))))


@torch.no_grad()
def fold_c(model: nn.Module, pair: Pair, c: Tensor) -> None:
    """Scale channel j of the tensor between the pair by c_j >= 0, in place, without changing
    anything else: into the low conv's BN (gamma, beta), or its rows and bias when it has no BN
    (ReLU(c z) = c ReLU(z)); after ReLU6/hardswish into the high conv's input channels."""
    if pair.fold == FOLD_BN and pair.bn is not None:
        bn = model.get_submodule(pair.bn)
        bn.weight.mul_(c.to(bn.weight.dtype))
        bn.bias.mul_(c.to(bn.bias.dtype))
    elif pair.fold == FOLD_BN:
        conv = model.get_submodule(pair.low)
        conv.weight.mul_(c.to(conv.weight.dtype).reshape(-1, *([1] * (conv.weight.dim() - 1))))
        if conv.bias is not None:
            conv.bias.mul_(c.to(conv.bias.dtype))
    else:
        _scale_input_channels(model.get_submodule(pair.high), c)


def check_lambdas(lam1, lam2) -> None:
    for name, lam in (("lam1", lam1), ("lam2", lam2)):
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) \
                or lam < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {lam!r}")


def _check_args(model, low, high, lam1, lam2, rule) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for name, bits in (("low", low), ("high", high)):
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"{name} must be a bit-width in 2..8 (2 = ternary), got {bits!r}")
    if low > high:
        raise ValueError(f"low ({low}) must not exceed high ({high}): the pair's second layer "
                         "compensates for the first")
    check_lambdas(lam1, lam2)
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")


@torch.no_grad()
def _quantize(model, low, high, pairs, lam1, lam2, rule, compensated):
    _check_args(model, low, high, lam1, lam2, rule)
    start = time.perf_counter()
    model = copy.deepcopy(model).eval()  # the caller's model is never touched
    pairs = find_pairs(model) if pairs is None else check_pairs(model, pairs)
    if not pairs:
        raise PairingError(
            f"nothing pairable in {type(model).__name__}: no conv is followed, through only its "
            "BatchNorm, an activation and pooling, by another conv that alone consumes its output")
    report = Report(low, high, float(lam1), float(lam2), rule, compensated)
    lows = {p.low: p for p in pairs}
    for pair in pairs:  # low layers first: a FOLD_NEXT c scales its high layer before quantization
        conv = model.get_submodule(pair.low)
        w = conv.weight.detach().float().clone()  # fold_c may scale the conv's rows in place
        q = quantize_weight(w, low)
        c = None
        if compensated:
            c = pair_c(w, q, *_bn_terms(model, pair, w.shape[0]), lam1, lam2, rule).float()
            fold_c(model, pair, c)
            if pair.fold == FOLD_BN and pair.bn is None:
                q.channel_scale = c  # the rows' scale, kept beside the codes
        conv.weight.copy_(q.dequantize().to(conv.weight.dtype))
        report.layers[pair.low] = q
        stats = c if c is not None else torch.ones(w.shape[0])
        report.pairs.append(PairReport(pair.low, pair.high, pair.bn, pair.fold,
                                       float(stats.min()), float(stats.mean()),
                                       float(stats.max()), int((stats == 0).sum()), stats))
    for name, layer in weight_layers(model):
        if name in lows:
            continue
        q = quantize_weight(layer.weight.detach().float(), high)
        layer.weight.copy_(q.dequantize().to(layer.weight.dtype))
        report.layers[name] = q
    report.layers = {n: report.layers[n] for n, _ in weight_layers(model)}  # model order
    report.seconds = time.perf_counter() - start
    return model, report


def compensate(model: nn.Module, low: int = 2, high: int = 6, *, pairs=None, lam1: float = 0.5,
               lam2: float = 0.0, rule: str = "R1") -> tuple[nn.Module, Report]:
    """DF-MPC without data: a compensated copy of float ``model`` (weights replaced by their
    dequantized low/high-bit values, c folded) and its report. ``pairs``: None pairs
    automatically, else a list of (low_conv, high_conv) names, each checked."""
    return _quantize(model, low, high, pairs, lam1, lam2, rule, compensated=True)


def quantize_uncompensated(model: nn.Module, low: int = 2, high: int = 6, *,
                           pairs=None) -> tuple[nn.Module, Report]:
    """The same pairs and quantizers without compensation (c = 1): DF-MPC's baseline."""
    return _quantize(model, low, high, pairs, 0.5, 0.0, "R1", compensated=False)


__all__ = ["LayerCodes", "PairReport", "Report", "closed_form_c", "compensate", "fold_c", "pair_c",
           "quantize_uncompensated", "quantize_weight"]
