"""Which layers DF-MPC may pair (spec methods_seeds.md §A.1).

A pair (low, high) is a conv whose per-output-channel scale c can be moved past everything
between it and the next conv without changing the float function. Allowed between them, each
node the single consumer of the one before: the low conv's BatchNorm (directly after it), one
activation, and any of pooling, zero padding, dropout or identity. ReLU and the identity commute
with c >= 0, so c folds into that BatchNorm; ReLU6 and hardswish do not, so c multiplies the high
conv's input channels instead (spec: [ours]). A residual add, a concat, a flatten or a second
consumer ends the chain: the tensor is then not the high conv's alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

FOLD_BN = "bn"  # c scales the low conv's BN (or its weight rows and bias when it has no BN)
FOLD_NEXT = "next"  # c scales the high conv's input channels before its quantization

_SCALE_FREE_ACTS = (nn.ReLU,)  # act(c z) = c act(z) for c >= 0
_OTHER_ACTS = (nn.ReLU6, nn.Hardswish)
_PASS_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Identity, nn.ZeroPad2d)
_PASS_FUNCS = {F.max_pool2d, F.avg_pool2d, F.dropout}
_RELU_FUNCS = {F.relu, torch.relu}
_OTHER_ACT_FUNCS = {F.relu6, F.hardswish}


class PairingError(ValueError):
    """The model, or a given pair, cannot be paired safely."""


@dataclass(frozen=True)
class Pair:
    low: str  # the conv quantized low
    high: str  # the conv after it, quantized high, that compensates
    bn: str | None  # the low conv's BatchNorm; None: c folds into the low conv's rows and bias
    fold: str  # FOLD_BN or FOLD_NEXT


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with rfq's quantized layers and switchable BN kept as single nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from rfq.nn.modules import QuantConv2d, QuantLinear, SwitchableBatchNorm2d

        return isinstance(m, (QuantConv2d, QuantLinear, SwitchableBatchNorm2d)) \
            or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.GraphModule(model, _Tracer().trace(model))
    except Exception as err:
        raise PairingError(
            f"DF-MPC could not trace {type(model).__name__} with torch.fx "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "automatic pairing needs the graph to prove a tensor has one consumer") from None


def _kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """'conv', 'bn', 'act', 'act_other', 'pass' or 'stop' for one graph node."""
    from rfq.nn.modules import QuantConv2d, SwitchableBatchNorm2d

    if node.op == "call_module":
        mod = modules[node.target]
        if isinstance(mod, (nn.Conv2d, QuantConv2d)):
            return "conv"
        if isinstance(mod, SwitchableBatchNorm2d):
            return "bn"
        if isinstance(mod, nn.BatchNorm2d):  # foldable only with its own affine and statistics
            return "bn" if mod.affine and mod.track_running_stats else "stop"
        if isinstance(mod, _SCALE_FREE_ACTS):
            return "act"
        if isinstance(mod, _OTHER_ACTS):
            return "act_other"
        if isinstance(mod, _PASS_MODULES):
            return "pass"
    elif node.op == "call_function":
        if node.target in _RELU_FUNCS:
            return "act"
        if node.target in _OTHER_ACT_FUNCS:
            return "act_other"
        if node.target in _PASS_FUNCS:
            return "pass"
        if node.target is F.pad:  # zero padding only: c * 0 = 0
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0)
            mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
            return "pass" if mode == "constant" and not value else "stop"
    elif node.op == "call_method" and node.target == "relu":
        return "act"
    return "stop"


def _successor(node: fx.Node, modules: dict[str, nn.Module]) -> Pair | None:
    """The pair starting at conv ``node``, if the chain after it is safe."""
    bn, act, cur = None, None, node
    while True:
        if len(cur.users) != 1:
            return None
        nxt = next(iter(cur.users))
        if nxt.args[:1] != (cur,) or any(a is cur for a in list(nxt.args[1:])
                                           + list(nxt.kwargs.values())):
            return None  # the tensor is not the node's (first and only) data input
        kind = _kind(nxt, modules)
        if kind == "conv":
            fold = FOLD_NEXT if act == "act_other" else FOLD_BN
            return Pair(node.target, nxt.target, bn, fold)
        if kind == "bn" and cur is node:
            bn = nxt.target
        elif kind in ("act", "act_other") and act is None:
            act = kind
        elif kind != "pass":
            return None
        cur = nxt


def find_pairs(model: nn.Module) -> list[Pair]:
    """Greedy pairing in execution order: each unpaired conv with a safe successor pairs with it."""
    gm = _trace(model)
    modules = dict(gm.named_modules())
    paired: set[str] = set()
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or _kind(node, modules) != "conv" or node.target in paired:
            continue
        pair = _successor(node, modules)
        if pair is not None and pair.high not in paired:
            pairs.append(pair)
            paired.update((pair.low, pair.high))
    return pairs


def check_pairs(model: nn.Module, given) -> list[Pair]:
    """Explicit pairs (low, high) checked against the graph: each must be a safe chain, and no
    layer may sit in two pairs."""
    gm = _trace(model)
    modules = dict(gm.named_modules())
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    pairs, seen = [], set()
    for item in given:
        if not (isinstance(item, (tuple, list)) and len(item) == 2
                and all(isinstance(x, str) for x in item)):
            raise PairingError(f"pairs: each pair must be (low_conv_name, high_conv_name), "
                               f"got {item!r}")
        low, high = item
        for name in (low, high):
            if name not in nodes or _kind(nodes[name], modules) != "conv":
                raise PairingError(f"pairs: {name!r} is not a Conv2d of this model")
            if name in seen:
                raise PairingError(f"pairs: {name!r} is in two pairs")
        pair = _successor(nodes[low], modules)
        if pair is None or pair.high != high:
            raise PairingError(
                f"pairs: ({low!r}, {high!r}) is not a safe pair: between them only {low}'s "
                "BatchNorm, one activation and pooling/padding/dropout may sit, each the single "
                "consumer of the tensor before it")
        seen.update(item)
        pairs.append(pair)
    return pairs


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every conv and linear layer: the layers DF-MPC quantizes."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


__all__ = ["FOLD_BN", "FOLD_NEXT", "Pair", "PairingError", "check_pairs", "find_pairs",
           "weight_layers"]
