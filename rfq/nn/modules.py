"""Weight-coupled quantized layers and the switchable BatchNorm (spec: method_rfq.md §1).

A ``QuantConv2d`` / ``QuantLinear`` holds one shared float weight, one LSQ step per candidate
bit for the weight (signed) and for its input (unsigned after a ReLU, signed otherwise), and the
current (weight bit, input bit). Quantization runs through ``rfq.ops.coupled_quant``: the
current candidate is a 0-dim ``sel`` buffer read by the kernel, so switching bits neither syncs
the host nor recompiles. A ``SwitchableBatchNorm2d`` stores one BN per (weight bit, input bit)
of the conv before it as stacked ``[n_w, n_a, C]`` tensors.

Host-side state (current bits, which activation steps are initialised) is plain Python, saved
through ``get_extra_state`` so checkpoints restore it.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rfq import ops
from rfq.ops.layout import qrange

MIN_STEP = 1e-6  # steps are clamped here after every update (the kernels reject s <= 0)

# The quantizer every layer calls. Only the E1b benchmark swaps in rfq.reference's plain-PyTorch
# twin (use_reference_quantizer), to time the same training step built without the fused ops.
_quantizer = [ops.coupled_quant]


# Whether an unsigned input quantizer runs fused with the op in front of it: a training-mode
# SwitchableBatchNorm2d (ops.batch_norm_quant) or a residual block's ReLU (ops.relu_quant); and
# whether a block's last switchable BN runs fused with its shortcut add (ops.batch_norm_add).
# unfused_input_quant() turns all three off (benchmarks, tests).
_fuse_input_quant = [True]


@contextlib.contextmanager
def unfused_input_quant():
    before = _fuse_input_quant[0]
    _fuse_input_quant[0] = False
    try:
        yield
    finally:
        _fuse_input_quant[0] = before


@contextlib.contextmanager
def use_reference_quantizer():
    """The plain-PyTorch quantizer and the unfused composition around it (E1b's baseline)."""
    from rfq import reference

    _quantizer[0] = reference.coupled_quant
    try:
        with unfused_input_quant():
            yield
    finally:
        _quantizer[0] = ops.coupled_quant


def weight_steps_init(weight: Tensor, bits: Sequence[int]) -> Tensor:
    """RFQuant's init: R = max(|mu - 3 sigma|, |mu + 3 sigma|), s_b = R / 2^(b-1) (nested grids)."""
    w = weight.detach().float()
    mu, sigma = w.mean(), w.std() if w.numel() > 1 else torch.zeros(())
    r = torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs()).clamp_min(MIN_STEP)
    return torch.stack([r / 2 ** (b - 1) for b in bits]).to(torch.float32)


class QuantLayer(nn.Module):
    """Shared machinery of QuantConv2d and QuantLinear; subclasses define ``compute(x, w)``."""

    def _setup(self, weight: nn.Parameter, bias, w_bits, a_bits, a_signed: bool, role: str,
               lsq_grad_scale: bool):
        self.weight, self.bias = weight, bias
        self.w_bits = [int(b) for b in w_bits]
        self.a_bits = [int(b) for b in a_bits]  # empty: the input is not quantized
        for name, bits in (("w_bits", self.w_bits), ("a_bits", self.a_bits)):
            if len(set(bits)) != len(bits) or any(not 1 <= b <= 8 for b in bits):
                raise ValueError(f"{name} must be distinct bit-widths in 1..8, got {bits}")
        if not self.w_bits:
            raise ValueError("w_bits must list at least one candidate bit-width")
        self.a_signed, self.role, self.lsq_grad_scale = a_signed, role, lsq_grad_scale
        self.w_steps = nn.Parameter(weight_steps_init(weight, self.w_bits))
        # activation steps are set from the first batch that uses each bit (a_ready)
        self.a_steps = nn.Parameter(torch.ones(max(len(self.a_bits), 1)),
                                    requires_grad=bool(self.a_bits))  # unused: no grad (DDP)
        self.register_buffer("w_sel", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("a_sel", torch.zeros((), dtype=torch.long), persistent=False)
        # which candidates took part in this optimizer step (masked update, spec §6 quirk 7)
        self.register_buffer("w_used", torch.zeros(len(self.w_bits), dtype=torch.bool),
                             persistent=False)
        self.register_buffer("a_used", torch.zeros(len(self.a_steps), dtype=torch.bool),
                             persistent=False)
        self.a_ready = [False] * len(self.a_bits)
        self._marked = None
        self.quant_enabled = True  # False: a float layer (cost probes, float baselines)
        self.weight_cache: list[Tensor] | None = None  # K quantized weights during search
        # integer_convs mode (QuantConv2d with an unsigned input): the input steps as host floats
        # and, when cached, the K weights' prepacked codes
        self.integer_input_scales: list[float] | None = None
        self.integer_weights: list[ops.PackedConvCodes] | None = None
        self._bn_ref: list = []  # the SwitchableBatchNorm2d fed by this layer, if any
        # start at the highest candidate bits
        self.w_index = self.w_bits.index(max(self.w_bits))
        self.a_index = self.a_bits.index(max(self.a_bits)) if self.a_bits else 0
        self.w_sel.fill_(self.w_index)
        self.a_sel.fill_(self.a_index)

    # -- bit selection (host side; one tiny fill per changed selector, no sync) --
    @property
    def w_bit(self) -> int:
        return self.w_bits[self.w_index]

    @property
    def a_bit(self) -> int | None:
        return self.a_bits[self.a_index] if self.a_bits else None

    def set_bits(self, w: int | None = None, a: int | None = None) -> None:
        if w is not None:
            if w not in self.w_bits:
                raise ValueError(f"weight bit-width {w} is not a candidate of this layer "
                                 f"({self.w_bits})")
            j = self.w_bits.index(w)
            if j != self.w_index:
                self.w_sel.fill_(j)
                self.w_index = j
        if a is not None and self.a_bits:
            if a not in self.a_bits:
                raise ValueError(f"activation bit-width {a} is not a candidate of this layer "
                                 f"({self.a_bits})")
            j = self.a_bits.index(a)
            if j != self.a_index:
                self.a_sel.fill_(j)
                self.a_index = j
        if self._bn_ref:
            self._bn_ref[0].select(self.w_index, self.a_index)

    # -- quantization --
    def _grad_scale(self, numel: int, bits: int, signed: bool) -> float:
        if not self.lsq_grad_scale:
            return 1.0
        return 1.0 / math.sqrt(max(qrange(bits, signed)[1], 1) * max(numel, 1))

    @torch.no_grad()
    def _init_act_step(self, x: Tensor, j: int) -> None:
        """s_b = 2 mean|x| / sqrt(p_b), averaged over ranks (spec §1), written on device."""
        qp = max(qrange(self.a_bits[j], self.a_signed)[1], 1)
        v = x.detach().float()
        # unsigned: the quantizer sees x clamped at 0 (the same as relu(x) when a ReLU before
        # this layer is skipped, see input_clamps_at_zero)
        s = 2 * (v.abs() if self.a_signed else v.clamp_min(0)).mean() / math.sqrt(qp)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(s)
            s /= torch.distributed.get_world_size()
        self.a_steps.data[j].copy_(s.clamp_min(MIN_STEP))
        self.a_ready[j] = True

    def quantized_weight(self) -> Tensor:
        if self.weight_cache is not None:
            return self.weight_cache[self.w_index]
        gs = self._grad_scale(self.weight.numel(), self.w_bit, True)
        return _quantizer[0](self.weight, self.w_steps, self.w_bits, self.w_sel, True, gs)

    def quantize_input(self, x: Tensor) -> Tensor:
        if not self.a_ready[self.a_index]:
            self._init_act_step(x, self.a_index)
        gs = self._grad_scale(x.numel(), self.a_bit, self.a_signed)
        return _quantizer[0](x, self.a_steps, self.a_bits, self.a_sel, self.a_signed, gs)

    @property
    def input_clamps_at_zero(self) -> bool:
        """True while forward quantizes the input unsigned (clamped at 0: a ReLU before this
        layer is redundant, see rfq.models.input_clamps_at_zero)."""
        return self.quant_enabled and bool(self.a_bits) and not self.a_signed

    def forward(self, x: Tensor) -> Tensor:
        if not self.quant_enabled:
            return self.compute(x, self.weight)
        if self._computes_integer():
            return self._integer_conv(x)
        if self.training and torch.is_grad_enabled():
            self._mark_used()
        if self.a_bits:
            x = self.quantize_input(x)
        return self.compute(x, self.quantized_weight())

    def forward_after_norm(self, bn: nn.Module, x: Tensor) -> Tensor:
        """``self(bn(x))``, where the caller has dropped the ReLU between them because this
        layer clamps its input at zero. A training-mode SwitchableBatchNorm2d and this layer's
        input quantizer then run as one fused op: the BN output is never written (the outputs
        and gradients are those of the composition; tests/nn/test_norm_quant.py)."""
        if self._computes_integer():
            return self._integer_conv(bn(x))
        if not self._fusable_after(bn, x):
            return self(bn(x))
        if torch.is_grad_enabled():
            self._mark_used()
        gs = self._grad_scale(x.numel(), self.a_bit, self.a_signed)
        xq = bn.forward_quantized(x, self.a_steps, self.a_bits, self.a_sel, self.a_signed, gs)
        return self.compute(xq, self.quantized_weight())

    def _fusable_after(self, bn: nn.Module, x: Tensor) -> bool:
        return (self._input_fusable() and isinstance(bn, SwitchableBatchNorm2d) and bn.training
                and not (bn._forward_hooks or bn._forward_pre_hooks)  # they want bn's output
                and self.training and x.dtype == torch.float32)

    def _input_fusable(self) -> bool:
        # not before this bit's step is initialised (from the unfused input's statistics), nor
        # for subclasses with their own forward or input quantizer (hot-swap)
        cls = type(self)
        return (_fuse_input_quant[0] and self.input_clamps_at_zero and self.a_ready[self.a_index]
                and cls.forward is QuantLayer.forward
                and cls.quantize_input is QuantLayer.quantize_input
                and not (self._forward_hooks or self._forward_pre_hooks))  # they see __call__

    def forward_after_relu(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """``(relu(s), self(relu(s)))`` for a layer that clamps its input at zero: the ReLU
        output (a residual block keeps it for its shortcut) and this layer's quantized input
        come from one fused op, which reads s once (forward and backward)."""
        if self._computes_integer():  # the unsigned codes of s are those of relu(s)
            return F.relu(s), self._integer_conv(s)
        if not self._input_fusable():
            x = F.relu(s)
            return x, self(x)
        if self.training and torch.is_grad_enabled():
            self._mark_used()
        gs = self._grad_scale(s.numel(), self.a_bit, self.a_signed)
        x, xq = ops.relu_quant(s, self.a_steps, self.a_bits, self.a_sel, gs)
        return x, self.compute(xq, self.quantized_weight())

    def _computes_integer(self) -> bool:
        return (self.integer_input_scales is not None and self.quant_enabled
                and not torch.is_grad_enabled()
                and not (self._forward_hooks or self._forward_pre_hooks))  # they see __call__

    def _integer_conv(self, x: Tensor) -> Tensor:
        """This layer on ``x`` through integer codes (integer_convs mode): the input quantizer's
        unsigned codes, then the integer convolution with the selected weight's codes."""
        j = self.a_index
        codes = ops.quantize_codes(x, self.a_steps.detach()[j], self.a_bits[j], False)
        k = self.w_index
        weight = self.integer_weights[k] if self.integer_weights is not None else \
            self._packed_weight_codes(k)  # re-quantized every call (the straightforward search)
        return ops.integer_conv2d(codes, self.integer_input_scales[j], weight)

    def _mark_used(self) -> None:
        # device-side marks (a fill on a view: no sync); reset by clear_usage() every step
        key = (self.w_index, self.a_index)
        if self._marked != key:  # one op each: the selectors hold these indices on device
            self.w_used.index_fill_(0, self.w_sel, True)
            if self.a_bits:
                self.a_used.index_fill_(0, self.a_sel, True)
            self._marked = key

    def clear_usage(self) -> None:
        self.w_used.zero_()
        self.a_used.zero_()
        self._marked = None

    @torch.no_grad()
    def fill_weight_cache(self) -> None:
        """All K quantized weights from one read (coupled_quant_multi), for inference loops."""
        multi = ops.coupled_quant_multi(self.weight.detach(), self.w_steps.detach(),
                                        self.w_bits, True)
        # each in the weight's own layout (e.g. channels_last): the conv then runs the same
        # algorithm as with coupled_quant's output, so results are bit-identical
        self.weight_cache = [torch.empty_like(self.weight).copy_(q) for q in multi]

    @torch.no_grad()
    def start_integer_convs(self, cache_weights: bool = True) -> None:
        """Enters the integer_convs mode: the input steps read once and, when
        ``cache_weights``, the K weights' int8 codes prepacked once."""
        if not isinstance(self, QuantConv2d) or not self.input_clamps_at_zero:
            raise ValueError(f"integer convolutions need a conv with an unsigned quantized "
                             f"input, got {self.extra_repr()}")
        self.integer_input_scales = [float(s) for s in self.a_steps.detach()[:len(self.a_bits)]]
        self.integer_weights = [self._packed_weight_codes(k) for k in range(len(self.w_bits))] \
            if cache_weights else None

    def stop_integer_convs(self) -> None:
        self.integer_input_scales = self.integer_weights = None

    @torch.no_grad()
    def _packed_weight_codes(self, k: int) -> ops.PackedConvCodes:
        step = self.w_steps.detach()[k]
        codes = ops.quantize_codes(self.weight.detach(), step, self.w_bits[k], True)
        return ops.pack_conv_codes(codes, float(step), self.stride, self.padding, self.dilation,
                                   self.groups, self.bias)

    def masked_entries(self) -> list[tuple[nn.Parameter, str]]:
        """(stacked per-candidate parameter, name of its usage mask) pairs for the masked
        update: entries no pass of a step used keep their values and optimizer moments."""
        entries = []
        if len(self.w_bits) > 1:
            entries.append((self.w_steps, "w_used"))
        if len(self.a_bits) > 1:
            entries.append((self.a_steps, "a_used"))
        return entries

    def clamp_steps_(self) -> None:
        with torch.no_grad():
            self.w_steps.clamp_(min=MIN_STEP)
            self.a_steps.clamp_(min=MIN_STEP)

    def get_extra_state(self):
        return {"a_ready": list(self.a_ready), "w_bit": self.w_bit, "a_bit": self.a_bit}

    def set_extra_state(self, state) -> None:
        self.a_ready = list(state["a_ready"])
        self.set_bits(state["w_bit"], state["a_bit"])

    def extra_repr(self) -> str:
        a = f"a_bits={self.a_bits} ({'signed' if self.a_signed else 'unsigned'})" \
            if self.a_bits else "input not quantized"
        return f"{self.role}, w_bits={self.w_bits}, {a}, current=W{self.w_bit}A{self.a_bit}"


class QuantConv2d(QuantLayer):
    def __init__(self, conv: nn.Conv2d, w_bits, a_bits=(), a_signed: bool = False,
                 role: str = "mixed", lsq_grad_scale: bool = False):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"QuantConv2d supports padding_mode='zeros', got {conv.padding_mode}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self._setup(conv.weight, conv.bias, w_bits, a_bits, a_signed, role, lsq_grad_scale)

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.in_channels == self.groups

    def compute(self, x: Tensor, w: Tensor) -> Tensor:
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def macs(self, out_hw: tuple[int, int]) -> int:
        kh, kw = self.kernel_size
        return kh * kw * (self.in_channels // self.groups) * self.out_channels * out_hw[0] * out_hw[1]


class QuantLinear(QuantLayer):
    def __init__(self, linear: nn.Linear, w_bits, a_bits=(), a_signed: bool = False,
                 role: str = "mixed", lsq_grad_scale: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._setup(linear.weight, linear.bias, w_bits, a_bits, a_signed, role, lsq_grad_scale)

    is_depthwise = False

    def compute(self, x: Tensor, w: Tensor) -> Tensor:
        return F.linear(x, w, self.bias)

    def macs(self, out_hw=None) -> int:
        return self.in_features * self.out_features


class FeatureMSE(torch.autograd.Function):
    """mean((student - teacher)^2) with the teacher detached, in three memory passes (difference,
    norm; one multiply back) instead of F.mse_loss's six. Its gradient keeps the features' memory
    format: F.mse_loss's comes back NCHW-contiguous for channels_last features, and batch-norm
    backward with a channels_last input and an NCHW gradient takes a much slower path."""

    @staticmethod
    def forward(ctx, student, teacher):
        diff = student - teacher
        ctx.save_for_backward(diff)
        return torch.linalg.vector_norm(diff).square() / max(diff.numel(), 1)

    @staticmethod
    def backward(ctx, grad):
        (diff,) = ctx.saved_tensors
        return diff * (grad * (2.0 / max(diff.numel(), 1))), None


class SwitchableBatchNorm2d(nn.Module):
    """One BatchNorm per (weight bit, input bit) of the conv before it, stored stacked.

    ``select(i, j)`` picks the copy (host ints). Modes: normal training (batch statistics,
    running averages of the selected copy updated), ``batch_stats_only`` (search scoring: batch
    statistics, nothing updated), and ``cumulative`` (BN recalibration: the running statistics
    become the plain average over the calibration batches).
    """

    def __init__(self, bn: nn.BatchNorm2d, n_w: int, n_a: int):
        super().__init__()
        if not bn.affine or not bn.track_running_stats:
            raise ValueError("SwitchableBatchNorm2d needs an affine BN with running statistics")
        self.num_features, self.eps = bn.num_features, bn.eps
        self.momentum = 0.1 if bn.momentum is None else bn.momentum
        grid = (n_w, n_a, 1)
        self.weight = nn.Parameter(bn.weight.detach().clone().repeat(grid))
        self.bias = nn.Parameter(bn.bias.detach().clone().repeat(grid))
        self.register_buffer("running_mean", bn.running_mean.detach().clone().repeat(grid))
        self.register_buffer("running_var", bn.running_var.detach().clone().repeat(grid))
        self.register_buffer("used", torch.zeros(n_w, n_a, dtype=torch.bool), persistent=False)
        # the selected copy as a device index too: eval reads it, so a compiled model switches
        # copies without recompiling (training indexes with the host ints: in-place updates)
        self.register_buffer("flat_sel", torch.zeros(1, dtype=torch.long), persistent=False)
        self.wi = self.ai = 0
        self.batch_stats_only = False
        self.cumulative = False
        self._seen = 0  # batches averaged in cumulative mode
        self._marked = None
        # feature matching (IDM), in training forwards: while match_keep is set, the output is
        # kept (detached) in match_kept; while match_teacher holds a tensor, match_loss is set to
        # mean((output - match_teacher)^2). With the next layer's quantizer fused in
        # (forward_quantized) both run without the unfused BN: the kept output is recomputed
        # from x and the batch statistics, the loss is batch_norm_quant_mse's
        self.match_keep = False
        self.match_kept: Tensor | None = None
        self.match_teacher: Tensor | None = None
        self.match_loss: Tensor | None = None

    def select(self, i: int, j: int) -> None:
        if (i, j) != (self.wi, self.ai):
            self.flat_sel.fill_(i * self.weight.shape[1] + j)
        self.wi, self.ai = i, j

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            pick = [t.flatten(0, 1).index_select(0, self.flat_sel).squeeze(0)
                    for t in (self.running_mean, self.running_var, self.weight, self.bias)]
            return F.batch_norm(x, *pick, False, 0.0, self.eps)
        w, b = self._selected(self.weight), self._selected(self.bias)
        if self.batch_stats_only:
            out = F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        else:
            out = F.batch_norm(x, self._selected(self.running_mean),
                               self._selected(self.running_var), w, b, True,
                               self._update_momentum(), self.eps)
        if self.match_keep:
            self.match_kept = out.detach()
        if self.match_teacher is not None:
            self.match_loss = FeatureMSE.apply(out, self.match_teacher)
        return out

    def _selected(self, t: Tensor) -> Tensor:
        """``t[wi, ai]`` as one view op: indexing with two ints is two selects, i.e. two autograd
        nodes per pass for the parameters (each costs more than the tiny copy it serves)."""
        st = t.stride()
        return t.as_strided(t.shape[2:], st[2:],
                            t.storage_offset() + self.wi * st[0] + self.ai * st[1])

    @torch.no_grad()
    def _output_from(self, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
                     var: Tensor) -> Tensor:
        """The selected copy's (weight, bias) training output for x with these batch statistics,
        x * alpha + beta per channel, in one pass (x's layout)."""
        shape = [1, -1] + [1] * (x.dim() - 2)
        alpha = weight * torch.rsqrt(var + self.eps)
        beta = bias - mean * alpha
        return torch.addcmul(beta.view(shape), x, alpha.view(shape), out=torch.empty_like(x))

    def _update_momentum(self) -> float:
        """Marks the selected copy used (while training) and gives the momentum of this batch's
        running-statistics update (cumulative mode: the plain average over the batches)."""
        i, j = self.wi, self.ai
        if torch.is_grad_enabled() and self._marked != (i, j):
            self._selected(self.used).fill_(True)
            self._marked = (i, j)
        if self.cumulative:
            self._seen += 1
            return 1.0 / self._seen
        return self.momentum

    def forward_quantized(self, x: Tensor, steps: Tensor, bits, sel: Tensor, signed: bool,
                          grad_scale: float) -> Tensor:
        """Training mode: ``coupled_quant(self(x), steps, bits, sel, signed, grad_scale)`` in
        one fused op (the BN output is not materialized); running statistics, usage marks and
        the feature-matching loss are updated as forward() does."""
        w, b = self._selected(self.weight), self._selected(self.bias)
        if self.match_teacher is not None:
            y, mean, var, self.match_loss = ops.batch_norm_quant_mse(
                x, w, b, self.eps, steps, bits, sel, self.match_teacher, signed, grad_scale)
        else:
            y, mean, var = ops.batch_norm_quant(x, w, b, self.eps, steps, bits, sel, signed,
                                                grad_scale)
        if self.match_keep:
            self.match_kept = self._output_from(x, w, b, mean, var)
        self._track(x, mean, var)
        return y

    def forward_add(self, x: Tensor, residual: Tensor) -> Tensor:
        """``self(x) + residual`` (a residual block's last BN and its shortcut). While training
        on fp32 tensors, one fused op (ops.batch_norm_add, which never writes the BN output
        alone), with the running statistics and usage marks updated as forward() does; a BN
        that keeps or compares its output (IDM) or has hooks runs unfused. Without gradients
        (the search's batch-statistics scoring) it stays F.batch_norm: the search's choices
        follow the last bits of the statistics (bench/README.md, E2), and the fused op would
        change them for no gain in time."""
        if not (_fuse_input_quant[0] and self.training and torch.is_grad_enabled()
                and x.dtype == torch.float32
                and residual.dtype == torch.float32 and residual.shape == x.shape
                and not self.match_keep and self.match_teacher is None
                and not (self._forward_hooks or self._forward_pre_hooks)):
            return self(x) + residual
        w, b = self._selected(self.weight), self._selected(self.bias)
        y, mean, var = ops.batch_norm_add(x, w, b, self.eps, residual)
        self._track(x, mean, var)
        return y

    def _track(self, x: Tensor, mean: Tensor, var: Tensor) -> None:
        """A fused op's batch statistics into the selected copy's running ones, as F.batch_norm
        updates them (nothing in batch_stats_only mode)."""
        if self.batch_stats_only:
            return
        momentum = self._update_momentum()
        n = x.numel() // x.shape[1]
        with torch.no_grad():  # as F.batch_norm: the running variance is the unbiased one
            self._selected(self.running_mean).mul_(1 - momentum).add_(mean, alpha=momentum)
            self._selected(self.running_var).mul_(1 - momentum).add_(
                var, alpha=momentum * n / (n - 1))

    def clear_usage(self) -> None:
        self.used.zero_()
        self._marked = None

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self._seen = 0

    def get_extra_state(self):
        return {"wi": self.wi, "ai": self.ai}

    def set_extra_state(self, state) -> None:
        self.wi, self.ai = state["wi"], state["ai"]
        self.flat_sel.fill_(self.wi * self.weight.shape[1] + self.ai)

    def extra_repr(self) -> str:
        n_w, n_a, c = self.weight.shape
        return f"{c}, copies={n_w}x{n_a}, eps={self.eps}, momentum={self.momentum}"
