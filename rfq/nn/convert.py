"""``rfq.quantize_(model, config)``: swap a float model's convs/linears for weight-coupled ones,
torchao-style, in place; and ``set_bits`` to choose a global or per-layer configuration.

Layer roles (spec method_rfq.md §1): the first conv (stem) is fixed at W8 with its input (the
image) not quantized; the last linear (FC) is fixed at W8A8; every other conv/linear is mixed,
with candidates ``bits`` (depthwise convs: ``depthwise_bits``). The BN right after a mixed conv
becomes a SwitchableBatchNorm2d indexed by that conv's (weight bit, input bit). Whether a layer's
input can be negative (signed activation quantizer) is read off the traced graph: inputs that
come from a ReLU/ReLU6 (through pooling, padding, slicing or sums of such) are unsigned.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from rfq.nn.modules import QuantConv2d, QuantLayer, QuantLinear, SwitchableBatchNorm2d

class UntraceableModelWarning(UserWarning):
    """quantize_ could not trace the model and made every input quantizer signed."""


BitPair = tuple[int, int]
BitConfig = dict[str, BitPair]


@dataclass
class QuantConfig:
    bits: tuple[int, ...] = (6, 5, 4, 3, 2)  # weight candidates of mixed layers
    act_bits: tuple[int, ...] | None = None  # input candidates; None: the same set as `bits`
    depthwise_bits: tuple[int, ...] = (6, 5, 4, 3)  # both W and A of depthwise convs
    first_bits: int = 8  # stem weight bits (its input, the image, is not quantized)
    last_bits: int = 8  # FC weight and input bits
    keep_first: bool = True  # False: the stem is a mixed layer too
    keep_last: bool = True  # False: the FC is a mixed layer too
    lsq_grad_scale: bool = False  # LSQ's 1/sqrt(p_b numel) step-gradient scale (off: RFQuant)
    signed_inputs: Sequence[str] | None = None  # layer names with signed inputs (None: traced)

    def __post_init__(self):
        for name in ("bits", "depthwise_bits") + (("act_bits",) if self.act_bits else ()):
            bits = tuple(getattr(self, name))
            if not bits or any(not isinstance(b, int) or not 1 <= b <= 8 for b in bits):
                raise ValueError(f"QuantConfig.{name} must be non-empty bit-widths in 1..8, "
                                 f"got {bits}")
            if len(set(bits)) != len(bits):
                raise ValueError(f"QuantConfig.{name} has repeated bit-widths: {bits}")
            setattr(self, name, tuple(sorted(bits, reverse=True)))
        for name in ("first_bits", "last_bits"):
            if not 1 <= getattr(self, name) <= 8:
                raise ValueError(f"QuantConfig.{name} must be in 1..8, got {getattr(self, name)}")

    @property
    def shared_sets(self) -> bool:
        return self.act_bits is None or tuple(self.act_bits) == tuple(self.bits)


@dataclass
class _Graph:
    order: list[str]  # conv/linear names in execution order
    nonneg_input: dict[str, bool]
    bn_after: dict[str, str]  # conv name -> the BN that consumes only its output


_NONNEG_FUNCS = {F.relu, torch.relu, F.relu6}
_PRESERVING_FUNCS = {F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, torch.flatten, F.pad,
                     operator.getitem, F.dropout, torch.cat}
_PRESERVING_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout,
                       nn.Identity, nn.Flatten)
_PRESERVING_METHODS = {"view", "reshape", "flatten", "contiguous", "mean", "relu"}


def _trace(model: nn.Module) -> tuple[_Graph | None, str]:
    """The traced graph, or (None, why the trace failed)."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as err:  # untraceable model: the caller falls back to module order
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    modules = dict(gm.named_modules())
    nonneg: dict[torch.fx.Node, bool] = {}

    def is_nonneg(node) -> bool:
        if not isinstance(node, torch.fx.Node):
            return isinstance(node, (int, float)) and node >= 0
        if node in nonneg:
            return nonneg[node]
        result = False
        if node.op == "call_function":
            if node.target in _NONNEG_FUNCS:
                result = True
            elif node.target in (operator.add, torch.add):
                result = all(is_nonneg(a) for a in node.args[:2])
            elif node.target in _PRESERVING_FUNCS:
                first = node.args[0]
                result = all(is_nonneg(a) for a in first) if isinstance(first, (list, tuple)) \
                    else is_nonneg(first)
        elif node.op == "call_module":
            mod = modules[node.target]
            if isinstance(mod, (nn.ReLU, nn.ReLU6)):
                result = True
            elif isinstance(mod, _PRESERVING_MODULES):
                result = is_nonneg(node.args[0])
        elif node.op == "call_method":
            if node.target == "relu":
                result = True
            elif node.target in _PRESERVING_METHODS:
                result = is_nonneg(node.args[0])
        nonneg[node] = result
        return result

    order, nonneg_input, bn_after = [], {}, {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = modules[node.target]
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            order.append(node.target)
            nonneg_input[node.target] = is_nonneg(node.args[0])
        elif isinstance(mod, nn.BatchNorm2d):
            src = node.args[0]
            if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                    and isinstance(modules[src.target], nn.Conv2d) and len(src.users) == 1):
                bn_after[src.target] = node.target
    return _Graph(order, nonneg_input, bn_after), ""


def _fallback_graph(model: nn.Module) -> _Graph:
    """Module order; a BN directly after a conv (with matching channels) is that conv's BN.
    Without a graph nothing proves an input non-negative, so every input counts as signed
    (QuantConfig.signed_inputs overrides this)."""
    order, bn_after, prev = [], {}, None
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            order.append(name)
            prev = (name, mod)
        elif isinstance(mod, nn.BatchNorm2d) and prev and isinstance(prev[1], nn.Conv2d) \
                and prev[1].out_channels == mod.num_features:
            bn_after[prev[0]] = name
            prev = None
    return _Graph(order, {n: False for n in order}, bn_after)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (dotted) of ``model`` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_(model: nn.Module, config: QuantConfig | None = None, *,
              conv_type=QuantConv2d, linear_type=QuantLinear,
              fixed_too: bool = False) -> nn.Module:
    """Swap ``model``'s Conv2d/Linear layers for weight-coupled quantized ones, in place.

    Returns the model, which also gains ``model.set_bits(config)`` (see ``set_bits``).
    Build optimizers after this call: the steps and BN copies are new parameters.
    ``conv_type`` / ``linear_type``: the mixed layers' classes (a method's subclasses of
    QuantConv2d / QuantLinear, same constructor arguments); the stem and FC stay plain unless
    ``fixed_too`` (a method that quantizes them its own way, e.g. CSQ's bit-level weights).
    """
    config = config or QuantConfig()
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        raise ValueError("quantize_: the model is already quantized")
    graph, why = _trace(model)
    if graph is None:
        graph = _fallback_graph(model)
        if config.signed_inputs is None:
            warnings.warn(
                f"rfq.quantize_: torch.fx could not trace {type(model).__name__} ({why}), so "
                f"rfq cannot see which layer inputs come from a ReLU; every input quantizer is "
                f"made signed (correct, but an unsigned input wastes one bit of its range). "
                f"Declare them with QuantConfig(signed_inputs=[names of the layers whose input "
                f"can be negative]); every other input is then unsigned.",
                UntraceableModelWarning, stacklevel=2)
    if not graph.order:
        raise ValueError("quantize_: the model has no Conv2d or Linear layer")
    modules = dict(model.named_modules())
    convs = [n for n in graph.order if isinstance(modules[n], nn.Conv2d)]
    linears = [n for n in graph.order if isinstance(modules[n], nn.Linear)]
    first = convs[0] if convs and config.keep_first else None
    last = linears[-1] if linears and config.keep_last else None
    signed_names = set(config.signed_inputs or ())
    unknown = signed_names - set(graph.order)
    if unknown:
        raise ValueError(f"QuantConfig.signed_inputs names layers that are not Conv2d/Linear "
                         f"layers of this model: {sorted(unknown)}")
    mixed = []
    for name in dict.fromkeys(graph.order):  # a module called twice is quantized once
        mod = modules[name]
        if config.signed_inputs is not None:
            signed = name in signed_names
        else:
            signed = not graph.nonneg_input.get(name, True)
        cls = QuantConv2d if isinstance(mod, nn.Conv2d) else QuantLinear
        if fixed_too:
            cls = conv_type if isinstance(mod, nn.Conv2d) else linear_type
        if name == first:
            q = cls(mod, [config.first_bits], (), role="stem")
        elif name == last:
            q = cls(mod, [config.last_bits], [config.last_bits], a_signed=signed, role="fc")
        else:
            depthwise = isinstance(mod, nn.Conv2d) and mod.groups > 1 \
                and mod.in_channels == mod.groups
            w_bits = config.depthwise_bits if depthwise else config.bits
            a_bits = config.depthwise_bits if depthwise else (config.act_bits or config.bits)
            mixed_cls = conv_type if isinstance(mod, nn.Conv2d) else linear_type
            q = mixed_cls(mod, w_bits, a_bits, a_signed=signed, role="mixed",
                          lsq_grad_scale=config.lsq_grad_scale)
            mixed.append(name)
            bn_name = graph.bn_after.get(name)
            if bn_name is not None:
                sbn = SwitchableBatchNorm2d(modules[bn_name], len(w_bits), len(a_bits))
                replace_module(model, bn_name, sbn)
                q._bn_ref.append(sbn)
        q.lsq_grad_scale = config.lsq_grad_scale
        replace_module(model, name, q)
    model.rfq_mixed = mixed  # names of the mixed layers, execution order
    # conv -> the BN that consumes only its output (every role): deploy folds these
    model.rfq_bn_after = {c: b for c, b in graph.bn_after.items() if c in graph.order}
    model.set_bits = set_bits.__get__(model)
    set_bits(model, "max")
    return model


def mixed_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """(name, layer) of every mixed layer, in execution order."""
    if not hasattr(model, "rfq_mixed"):
        raise ValueError("the model is not quantized: call rfq.quantize_(model) first")
    return [(n, _submodule(model, n)) for n in model.rfq_mixed]


def _submodule(model: nn.Module, name: str) -> nn.Module:
    # a plain walk over _modules, many times cheaper than get_submodule's checks: a training
    # step resolves its layers several times
    m = model
    try:
        for part in name.split("."):
            m = m._modules[part]
    except (KeyError, AttributeError):
        return model.get_submodule(name)  # its error names the missing part
    if m is None:
        return model.get_submodule(name)
    return m


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]


ConfigLike = Union[int, str, BitPair, Mapping[str, BitPair], Sequence[BitPair]]


def resolve_config(model: nn.Module, config: ConfigLike) -> BitConfig:
    """A full per-layer {name: (w, a)} from an int (uniform W=A), a (w, a) pair, "max"/"min",
    a per-layer list in execution order, or a (possibly partial) per-layer mapping."""
    return _resolve(mixed_layers(model), config)


def _resolve(layers: list[tuple[str, QuantLayer]], config: ConfigLike) -> BitConfig:
    if isinstance(config, str):
        if config not in ("max", "min"):
            raise ValueError(f"bit config string must be 'max' or 'min', got {config!r}")
        pick = max if config == "max" else min
        return {n: (pick(m.w_bits), pick(m.a_bits) if m.a_bits else None) for n, m in layers}
    if isinstance(config, int):
        config = (config, config)
    if isinstance(config, tuple) and len(config) == 2 and all(isinstance(b, int) for b in config):
        return {n: (config[0], config[1] if m.a_bits else None) for n, m in layers}
    if isinstance(config, Mapping):
        unknown = set(config) - {n for n, _ in layers}
        if unknown:
            raise ValueError(f"bit config names unknown mixed layers: {sorted(unknown)}")
        current = {n: (m.w_bit, m.a_bit) for n, m in layers}
        current.update({n: tuple(v) for n, v in config.items()})
        return current
    config = list(config)
    if len(config) != len(layers):
        raise ValueError(f"a per-layer bit config needs {len(layers)} (w, a) pairs, "
                         f"got {len(config)}")
    return {n: tuple(v) for (n, _), v in zip(layers, config)}


def set_bits(model: nn.Module, config: ConfigLike) -> BitConfig:
    """Set every mixed layer's (weight bit, input bit). Returns the resolved config."""
    layers = mixed_layers(model)
    resolved = _resolve(layers, config)
    modules = dict(layers)
    for name, (w, a) in resolved.items():
        try:
            modules[name].set_bits(w, a)
        except ValueError as err:
            raise ValueError(f"layer {name}: {err}") from None
    return resolved


def current_config(model: nn.Module) -> BitConfig:
    return {n: (m.w_bit, m.a_bit) for n, m in mixed_layers(model)}
