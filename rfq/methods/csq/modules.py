"""CSQ layers (spec methods_seeds.md §C.1, §C.4): every conv/linear, stem and FC included, holds
its weight as N bit planes of per-weight digit logits p, q [N, *weight shape], per-layer
bit-selection logits m [N] and a scale s, and builds

    W = s / (2^N - 1) * sum_i g(beta m_i) (g(beta p_i) - g(beta q_i)) 2^(N-1-i)

through the fused ``rfq.ops.csq_weight`` (no straight-through estimator on weights). Bit i of a
layer is on iff m_i > 0; its precision is the number of bits on.

Gate modes: ``soft`` (training), ``ticket`` (the masks frozen at 1[m > 0], the digits still
relaxed) and ``hard`` (the exported model: W = s n / (2^N - 1) with the integer codes n of
``hard_codes``). Inputs: ReLU6 and a max-scaled quantizer (fixed step 6 / q_p) at a > 3 bits,
a learned clip (PACT, initialised to 10) at a <= 3 bits; the stem's input, the image, is not
quantized. Both run through the shared LSQ activation path, which computes exactly
clamp(round(x / s), 0, q_p) s: ReLU6 then the max-scaled quantizer when s = 6 / q_p.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor, nn

from rfq import ops
from rfq.nn import QuantConfig, quantize_
from rfq.nn.modules import MIN_STEP, QuantConv2d, QuantLinear
from rfq.ops.layout import CSQ_MAX_PLANES, CSQ_MIN_PLANES, MAX_BITS, MIN_BITS, qrange

KAPPA = 1.0  # |digit logit| at init: g(0) = 1/2 would make a zero digit ambiguous [ours]
M_INIT = 1.0  # selection logits start on [ours]
RELU6_MAX = 6.0
PACT_MAX_BITS = 3  # inputs at <= 3 bits learn their clip (PACT), above: ReLU6, max-scaled
PACT_CLIP_INIT = 10.0
ONE_BIT_LOGIT = 1e-3  # a layer's last gate on is held at least here (keep_one_bit)
TICKET_LOGIT = 1e4  # |m| in ticket mode: g(beta * 1e4) is exactly 0 or 1 for every beta >= 1
GATE_MODES = ("soft", "ticket", "hard")
# inputs: "spec" is §C.4 (ReLU6 + max-scaled, PACT at <= 3 bits); "lsq" the main method's learned
# LSQ steps (an ablation of the input quantizer) [ours]
ACT_QUANTIZERS = ("spec", "lsq")

# The weight builder every CSQ layer calls. Only the benchmarks swap in the eager composition
# (use_composed_weight), to time the same training step built the official code's way.
_weight_op = [ops.csq_weight]


@contextlib.contextmanager
def use_composed_weight():
    from rfq import reference

    _weight_op[0] = reference.csq_weight_composed
    try:
        yield
    finally:
        _weight_op[0] = ops.csq_weight


def check_planes(planes: int) -> None:
    if not isinstance(planes, int) or not CSQ_MIN_PLANES <= planes <= CSQ_MAX_PLANES:
        raise ValueError(f"planes (N) must be an integer in {CSQ_MIN_PLANES}..{CSQ_MAX_PLANES}, "
                         f"got {planes!r}")


@torch.no_grad()
def digit_logits(weight: Tensor, planes: int) -> tuple[Tensor, Tensor, Tensor]:
    """(p, q, s): s = max|W|; the binary digits of round(|W| / s (2^N - 1)) as +-KAPPA logits,
    in p for positive weights and in q for negative ones (spec §C.1 "Initialisation")."""
    w = weight.detach().float()
    s = w.abs().max().clamp_min(MIN_STEP)
    levels = (1 << planes) - 1
    n = torch.round(w.abs() / s * levels).to(torch.int32)
    shifts = torch.arange(planes - 1, -1, -1, dtype=torch.int32).view(-1, *[1] * w.dim())
    digit = ((n.unsqueeze(0) >> shifts) & 1).bool()
    on = torch.tensor(KAPPA)
    p = torch.where(digit & (w > 0), on, -on)
    q = torch.where(digit & (w < 0), on, -on)
    return p.contiguous(), q.contiguous(), s


class _Csq:
    """The bit-level weight, mixed into QuantConv2d / QuantLinear (the float ``weight`` stays,
    frozen, as the layer's shape and its float twin for cost probes)."""

    def _setup_csq(self, planes: int, act_bits: int, act_quant: str = "spec") -> None:
        check_planes(planes)
        if not MIN_BITS <= act_bits <= MAX_BITS:
            raise ValueError(f"act_bits must be in {MIN_BITS}..{MAX_BITS}, got {act_bits}")
        if act_quant not in ACT_QUANTIZERS:
            raise ValueError(f"act_quant must be one of {ACT_QUANTIZERS}, got {act_quant!r}")
        self.planes = planes
        p, q, s = digit_logits(self.weight, planes)
        self.p, self.q = nn.Parameter(p), nn.Parameter(q)
        self.m = nn.Parameter(torch.full((planes,), M_INIT))
        self.scale = nn.Parameter(s.reshape(()))
        self.weight.requires_grad_(False)
        self.w_steps.requires_grad_(False)
        # the temperature, a device value every step reads; persistent: a resumed run goes on
        # with the temperature of its epoch
        self.register_buffer("beta", torch.ones(()))
        self.gate_mode = "soft"
        self.keep_one_bit = True  # the trainer's zero_layers="prune" turns it off
        if self.a_bits:  # one fixed input bit-width; its step per §C.4 (or LSQ's)
            self.a_bits = [act_bits]
            if act_quant == "lsq":  # learned like the main method's, set from the first batch
                self.a_ready = [False]
                self.a_steps.requires_grad_(True)
                return
            self.a_ready = [True]
            qp = qrange(act_bits, self.a_signed)[1]
            learned = act_bits <= PACT_MAX_BITS
            with torch.no_grad():
                self.a_steps.data = torch.tensor([(PACT_CLIP_INIT if learned else RELU6_MAX)
                                                  / qp])
            self.a_steps.requires_grad_(learned)

    # -- gates --
    def set_gate_mode(self, mode: str) -> None:
        if mode not in GATE_MODES:
            raise ValueError(f"gate mode must be one of {GATE_MODES}, got {mode!r}")
        self.gate_mode = mode
        self.m.requires_grad_(mode == "soft")

    def selection_logits(self) -> Tensor:
        if self.gate_mode == "soft":
            return self.m
        return torch.where(self.m.detach() > 0, TICKET_LOGIT, -TICKET_LOGIT)

    def bits_on(self) -> Tensor:
        """1[m_i > 0] as a float [N] device tensor (no host read)."""
        return (self.m.detach() > 0).float()

    def precision(self) -> int:
        """Bits on (a host read)."""
        return int((self.m.detach() > 0).sum())

    @torch.no_grad()
    def hard_codes(self) -> Tensor:
        """n = sum_i 1[m_i > 0] (1[p_i > 0] - 1[q_i > 0]) 2^(N-1-i) as int32, |n| <= 2^N - 1."""
        place = (1 << torch.arange(self.planes - 1, -1, -1, device=self.m.device)).to(torch.int32)
        place = place * (self.m.detach() > 0).to(torch.int32)
        digits = (self.p.detach() > 0).to(torch.int32) - (self.q.detach() > 0).to(torch.int32)
        return torch.tensordot(place, digits, dims=([0], [0]))

    def hard_weight(self) -> Tensor:
        return self.hard_codes().float() * (self.scale.detach() / ((1 << self.planes) - 1))

    def quantized_weight(self) -> Tensor:
        if self.gate_mode == "hard":
            return self.hard_weight().to(memory_format=torch.contiguous_format)
        return _weight_op[0](self.p, self.q, self.selection_logits(), self.scale, self.beta)

    def clamp_steps_(self) -> None:
        super().clamp_steps_()
        with torch.no_grad():
            self.scale.clamp_(min=MIN_STEP)
            if self.keep_one_bit and self.gate_mode == "soft":
                # the layer's best gate stays on (device-side: no host read), so the network
                # never trains around a zero layer that export would have to bring back
                best = self.m.argmax().view(1)
                top = self.m.index_select(0, best)
                self.m.index_copy_(0, best, torch.where(top > 0, top, ONE_BIT_LOGIT))

    def get_extra_state(self):
        return {**super().get_extra_state(), "gate_mode": self.gate_mode}

    def set_extra_state(self, state) -> None:
        super().set_extra_state(state)
        self.set_gate_mode(state.get("gate_mode", "soft"))

    def extra_repr(self) -> str:
        a = f"input {self.a_bits[0]} bits" if self.a_bits else "input not quantized"
        return f"{self.role}, CSQ N={self.planes} planes, {a}, gates {self.gate_mode}"


class CsqConv2d(_Csq, QuantConv2d):
    def __init__(self, conv: nn.Conv2d, w_bits, a_bits=(), a_signed: bool = False,
                 role: str = "mixed", lsq_grad_scale: bool = False, planes: int = 6,
                 act_bits: int = 4, act_quant: str = "spec"):
        super().__init__(conv, [planes], a_bits, a_signed, role, lsq_grad_scale)
        self._setup_csq(planes, act_bits, act_quant)


class CsqLinear(_Csq, QuantLinear):
    def __init__(self, linear: nn.Linear, w_bits, a_bits=(), a_signed: bool = False,
                 role: str = "mixed", lsq_grad_scale: bool = False, planes: int = 6,
                 act_bits: int = 4, act_quant: str = "spec"):
        super().__init__(linear, [planes], a_bits, a_signed, role, lsq_grad_scale)
        self._setup_csq(planes, act_bits, act_quant)


def csq_layers(model: nn.Module) -> list[tuple[str, _Csq]]:
    """(name, layer) of every CSQ layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _Csq)]


def csq_(model: nn.Module, planes: int = 6, act_bits: int = 4,
         act_quant: str = "spec") -> nn.Module:
    """Every Conv2d/Linear of ``model`` (stem and FC too) as a CSQ layer of ``planes`` bit
    planes, inputs quantized at ``act_bits`` (the image excepted) by ``act_quant``'s rule, in
    place."""
    check_planes(planes)
    if act_quant not in ACT_QUANTIZERS:
        raise ValueError(f"act_quant must be one of {ACT_QUANTIZERS}, got {act_quant!r}")
    if not isinstance(act_bits, int) or not MIN_BITS <= act_bits <= MAX_BITS:
        raise ValueError(f"act_bits must be an integer in {MIN_BITS}..{MAX_BITS}, got "
                         f"{act_bits!r}")
    config = QuantConfig(bits=(planes,), act_bits=(act_bits,), depthwise_bits=(planes,),
                         first_bits=planes, last_bits=planes)
    quantize_(model, config, fixed_too=True,
              conv_type=functools.partial(CsqConv2d, planes=planes, act_bits=act_bits,
                                          act_quant=act_quant),
              linear_type=functools.partial(CsqLinear, planes=planes, act_bits=act_bits,
                                            act_quant=act_quant))
    return model


def set_temperature(model: nn.Module, beta: float) -> None:
    for _, layer in csq_layers(model):
        layer.beta.fill_(beta)


def set_gate_mode(model: nn.Module, mode: str) -> None:
    for _, layer in csq_layers(model):
        layer.set_gate_mode(mode)


def layer_precisions(model: nn.Module) -> dict[str, int]:
    return {name: layer.precision() for name, layer in csq_layers(model)}


__all__ = ["ACT_QUANTIZERS", "CsqConv2d", "CsqLinear", "GATE_MODES", "KAPPA", "M_INIT",
           "check_planes", "csq_", "csq_layers", "digit_logits", "layer_precisions",
           "set_gate_mode", "set_temperature", "use_composed_weight"]
