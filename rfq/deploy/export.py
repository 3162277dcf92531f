"""Export a quantized model at one bit config to a deploy file, and load it back.

Every conv/linear becomes a ``PackedLayer`` at its own bit-width. The BN that consumes only a
conv's output (``model.rfq_bn_after``) is folded into it: W = s q and BN(y) = g (y - mu) + beta
with g = gamma / sqrt(var + eps) give the per-row scale s g and the bias beta - g mu (+ g b for a
conv bias). The codes stay the LSQ codes, so the deployed layer computes the fake-quantized
layer's function up to float rounding. Other BNs keep their (recalibrated) statistics as plain
``nn.BatchNorm2d``. The format itself: rfq/deploy/format.py.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rfq import ops
from rfq.deploy import format as fmt
from rfq.deploy.format import DeployFormatError
from rfq.nn import (QuantConv2d, QuantLinear, SwitchableBatchNorm2d, quant_layers,
                    replace_module, set_bits)
from rfq.nn.packed import PackedLayer


def _bn_tensors(bn: nn.Module) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """(gamma, beta, running mean, running var, eps) of a BN or a SwitchableBN's selected copy."""
    if isinstance(bn, SwitchableBatchNorm2d):
        i, j = bn.wi, bn.ai
        return bn.weight[i, j], bn.bias[i, j], bn.running_mean[i, j], bn.running_var[i, j], \
            bn.eps
    return bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps


def _plain_bn(sbn: SwitchableBatchNorm2d) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(sbn.num_features, eps=sbn.eps)
    gamma, beta, mean, var, _ = _bn_tensors(sbn)
    with torch.no_grad():
        for dst, src in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var),
                            (gamma, beta, mean, var)):
            dst.copy_(src)
    return bn


def infer_arch(model: nn.Module) -> dict | None:
    """build_model's arguments for an rfq.models architecture, else None."""
    from rfq.models import MODELS

    names = {cls: name for name, cls in MODELS.items()}
    if type(model) not in names:
        return None
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
              or hasattr(m, "weight_shape") or hasattr(m, "w_bits")]
    first, last = layers[0], layers[-1]
    return {"model": names[type(model)], "in_channels": int(first.weight.shape[1]),
            "classes": int(last.weight.shape[0])}


@dataclass
class LayerSpec:
    """One layer as the file stores it, before BN folding: w = scale * q ("lsq") or
    scale * (q + 1/2) ("dorefa": 2^bits levels without zero), q the signed int8 codes [N, K]
    of ``bits``; ``scale`` one value or one per output row."""
    codes: Tensor
    bits: int
    scale: Tensor
    code: str = "lsq"
    a_bit: int | None = None
    a_signed: bool = False
    a_step: Tensor | None = None
    band_steps: Tensor | None = None  # "haar": codes are band codes [bands, ...]
    one_d: bool = False  # "haar": 1-D Haar over C_out (depthwise) instead of 2-D


def bn_after(model: nn.Module) -> dict[str, str]:
    """conv name -> the BN that consumes only its output (quantize_ records it; float models
    are traced)."""
    if hasattr(model, "rfq_bn_after"):
        return dict(model.rfq_bn_after)
    from rfq.nn.convert import _fallback_graph, _trace

    graph, _ = _trace(model)
    return (graph or _fallback_graph(model)).bn_after


@torch.no_grad()
def pack_specs(model: nn.Module, specs: dict[str, LayerSpec]) -> tuple[dict[str, Tensor], dict]:
    """(tensors, layer records) of the deploy format: each spec'd conv/linear of ``model`` with
    the BN after it folded into its scale and bias, every other tensor of ``model`` as float.
    ``model`` is not modified."""
    model = copy.deepcopy(model).cpu().float().eval()
    after = bn_after(model)
    tensors, records, folded = {}, {}, set()
    for name, spec in specs.items():
        layer = model.get_submodule(name)
        is_conv = isinstance(layer, (nn.Conv2d, QuantConv2d))
        if spec.code not in fmt.CODE_CONVENTIONS:
            raise ValueError(f"rfq.deploy: layer {name}: code {spec.code!r} is not one of "
                             f"{fmt.CODE_CONVENTIONS}")
        n = layer.weight.shape[0]
        haar = spec.code == "haar"
        codes = spec.codes.to(torch.int8) if haar else spec.codes.reshape(n, -1).to(torch.int8)
        fmt.check_codes(codes, spec.bits, f"layer {name}")
        scale, bias = spec.scale.float().reshape(-1), layer.bias
        bn_name = after.get(name) if is_conv else None
        if bn_name is not None:
            gamma, beta, mean, var, eps = _bn_tensors(model.get_submodule(bn_name))
            g = gamma.float() / torch.sqrt(var.float() + eps)
            scale = scale * g
            bias = beta.float() - g * mean.float() + (0 if bias is None else g * bias.float())
            folded.add(bn_name)
        rec = {"kind": "conv" if is_conv else "linear", "code": spec.code, "bits": spec.bits,
               "weight_shape": list(layer.weight.shape),
               "scale": "row" if scale.numel() > 1 else "tensor", "bias": bias is not None,
               "a_bit": spec.a_bit, "a_signed": spec.a_signed, "bn": bn_name}
        if is_conv:
            rec.update(stride=list(layer.stride), padding=list(layer.padding),
                       dilation=list(layer.dilation), groups=layer.groups)
        if haar:
            rec.update(codes_shape=list(codes.shape), one_d=spec.one_d)
            tensors[f"{name}.band_steps"] = spec.band_steps.detach().float().reshape(-1).clone()
        records[name] = rec
        tensors[f"{name}.codes"] = fmt.pack_fields(codes, spec.bits)
        tensors[f"{name}.scale"] = scale.clone()
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().float().clone()
        if spec.a_bit is not None:
            tensors[f"{name}.a_step"] = spec.a_step.detach().float().reshape(1).clone()
    replaced = set(records) | folded
    for name, m in list(model.named_modules()):
        if isinstance(m, SwitchableBatchNorm2d) and name not in folded:
            replace_module(model, name, _plain_bn(m))
    for key, value in model.state_dict().items():
        if not any(key.startswith(p + ".") for p in replaced) and \
                not key.endswith("_extra_state"):
            tensors[f"float.{key}"] = value.detach().clone()
    return tensors, records


@torch.no_grad()
def lsq_spec(layer) -> LayerSpec:
    """A quantized layer (rfq.nn) at its current bits: its LSQ codes, step and input step."""
    step = layer.w_steps.detach()[layer.w_index].reshape(1).float()
    codes = ops.quantize_codes(layer.weight.detach().float(), step, layer.w_bit, True)
    a_step = None if layer.a_bit is None else layer.a_steps.detach()[layer.a_index]
    return LayerSpec(codes, layer.w_bit, step, "lsq", layer.a_bit, layer.a_signed, a_step)


def layer_spec(layer) -> LayerSpec:
    """Any quantized layer at its current bits: a hot-swap layer's own spec (band codes on its
    wavelet path), else LSQ."""
    from rfq.methods.hotswap.modules import _HotSwap

    if isinstance(layer, _HotSwap):
        from rfq.deploy.methods import hotswap_spec

        return hotswap_spec(layer)
    return lsq_spec(layer)


@torch.no_grad()
def export_tensors(model: nn.Module, config=None) -> tuple[dict[str, Tensor], dict, dict]:
    """(tensors, layer records, config) of the deploy format for a quantized ``model`` at
    ``config`` (its current bits if None). The model is not modified."""
    model = copy.deepcopy(model).cpu().float().eval()
    if config is not None:
        set_bits(model, config)
    layers = quant_layers(model)
    if not layers:
        raise ValueError("rfq.deploy: the model has no quantized layer (call rfq.quantize_ first)")
    specs = {name: layer_spec(layer) for name, layer in layers}
    tensors, records = pack_specs(model, specs)
    mixed = set(getattr(model, "rfq_mixed", ()))
    used = {n: [m.w_bit, m.a_bit] for n, m in layers if n in mixed}
    return tensors, records, used


def _haar_weight(rec: dict, codes: Tensor, band_steps: Tensor) -> Tensor:
    """A "haar" layer's weight before its row scale: the inverse Haar of its scaled band codes."""
    from rfq.methods.hotswap import haar

    bands = codes.float() * band_steps.reshape(-1, *([1] * (codes.dim() - 1)))
    inverse = haar.inverse_1d if rec.get("one_d") else haar.inverse_2d
    return inverse(bands, rec["weight_shape"])


def _layer_from_file(name: str, rec: dict, tensors: dict[str, Tensor]) -> PackedLayer:
    shape = rec["weight_shape"]
    # weight rows [N, K] (convs flattened), or a Haar layer's band codes of their own shape
    codes_shape = rec.get("codes_shape") or [shape[0], math.prod(shape[1:])]
    codes = fmt.unpack_fields(tensors[f"{name}.codes"], rec["bits"], 1,
                              math.prod(codes_shape)).reshape(codes_shape)
    fmt.check_codes(codes, rec["bits"], f"layer {name}")
    conv = {key: tuple(rec[key]) if key != "groups" else rec[key]
            for key in ("stride", "padding", "dilation", "groups")} if rec["kind"] == "conv" \
        else {}
    if rec["code"] == "haar":
        dense = _haar_weight(rec, codes, tensors[f"{name}.band_steps"])
        scale = tensors[f"{name}.scale"]
        dense = dense * scale.reshape(-1, *([1] * (dense.dim() - 1)))
        return PackedLayer.from_dense(rec["kind"], dense, codes, rec["bits"],
                                      tensors.get(f"{name}.bias"), rec.get("a_bit"),
                                      rec.get("a_signed", False), tensors.get(f"{name}.a_step"),
                                      bn_name=rec.get("bn"), **conv)
    return PackedLayer(rec["kind"], codes, rec["bits"], shape, tensors[f"{name}.scale"],
                       tensors.get(f"{name}.bias"), rec.get("a_bit"), rec.get("a_signed", False),
                       tensors.get(f"{name}.a_step"), bn_name=rec.get("bn"), code=rec["code"],
                       **conv)


def _layer_matches(module: nn.Module, rec: dict) -> str:
    """Why ``module`` (float or quantized) cannot hold the layer ``rec``, or ''."""
    is_conv = isinstance(module, (nn.Conv2d, QuantConv2d))
    is_linear = isinstance(module, (nn.Linear, QuantLinear))
    if rec["kind"] == "conv" and not is_conv or rec["kind"] == "linear" and not is_linear:
        return f"is a {type(module).__name__}, the file has a {rec['kind']}"
    if list(module.weight.shape) != rec["weight_shape"]:
        return f"weight {list(module.weight.shape)} vs the file's {rec['weight_shape']}"
    if is_conv and (list(module.stride), list(module.padding), list(module.dilation),
                    module.groups) != (rec["stride"], rec["padding"], rec["dilation"],
                                       rec["groups"]):
        return "stride/padding/dilation/groups differ"
    return ""


def assemble(skeleton: nn.Module, records: dict, tensors: dict[str, Tensor],
             source="the file") -> nn.Module:
    """A deployed model: ``skeleton`` (a float or quantized model of the same architecture,
    copied, never modified) with the packed layers in, folded BNs out, and every other tensor
    loaded. Everything is checked before anything is built."""
    modules = dict(skeleton.named_modules())
    problems = []
    for name, rec in records.items():
        if name not in modules:
            problems.append(f"layer {name} is not in the model")
            continue
        why = _layer_matches(modules[name], rec)
        if why:
            problems.append(f"layer {name}: {why}")
        bn = rec.get("bn")
        if bn is not None and not isinstance(modules.get(bn),
                                             (nn.BatchNorm2d, SwitchableBatchNorm2d)):
            problems.append(f"layer {name}: folded BN {bn} is not a BatchNorm2d of the model")
    if problems:
        raise DeployFormatError(f"{source} does not match the model "
                                f"{type(skeleton).__name__}: " + "; ".join(problems[:5])
                                + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""))
    built = {name: _layer_from_file(name, rec, tensors) for name, rec in records.items()}
    model = copy.deepcopy(skeleton).cpu()
    for name, layer in built.items():
        replace_module(model, name, layer)
        if records[name].get("bn") is not None:
            replace_module(model, records[name]["bn"], nn.Identity())
    for name, m in list(model.named_modules()):
        if isinstance(m, SwitchableBatchNorm2d):
            replace_module(model, name, nn.BatchNorm2d(m.num_features, eps=m.eps))
    leftovers = [n for n, m in model.named_modules() if hasattr(m, "w_bits")]
    if leftovers:
        raise DeployFormatError(f"{source} has no packed weights for the model's quantized "
                                f"layers {leftovers[:5]}")
    packed_prefixes = tuple(n + "." for n in built)
    want = {k for k in model.state_dict() if not k.startswith(packed_prefixes)}
    have = {k[len("float."):] for k in tensors if k.startswith("float.")}
    if want != have:
        missing, extra = sorted(want - have), sorted(have - want)
        raise DeployFormatError(f"{source} does not match the model {type(skeleton).__name__}: "
                                f"missing tensors {missing[:5]}, unexpected {extra[:5]}")
    model.load_state_dict({k: tensors["float." + k] for k in have}, strict=False)
    return model.eval()


DENSE_POLICIES = ("auto", "all", "none")


@torch.no_grad()
def keep_dense_weights(model: nn.Module, policy: str = "auto", input_shape=None) -> nn.Module:
    """Which packed convs keep an fp32 copy of their weight (``PackedLayer.keep_dense``):
    "none" (the least memory: convs dequantize on every call that runs dense), "all" (the
    fastest at every batch size: few output positions read the packed codes, the rest run
    dense), or "auto": the convs that run dense already at batch 1 for ``input_shape``
    [C, H, W], all convs when the input shape is unknown (the least memory at batch 1 with no
    per-call dequantization there; larger batches dequantize in the other convs)."""
    if policy not in DENSE_POLICIES:
        raise ValueError(f"dense must be one of {DENSE_POLICIES}, got {policy!r}")
    convs = [m for m in model.modules() if isinstance(m, PackedLayer) and m.is_conv]
    if policy == "auto" and input_shape is not None:
        out_hw = {}
        hooks = [m.register_forward_hook(
            lambda mod, _, y: out_hw.__setitem__(mod, tuple(y.shape[-2:]))) for m in convs]
        try:
            model(torch.zeros(1, *input_shape))
        finally:
            for h in hooks:
                h.remove()
        for m in convs:
            m.keep_dense(not ops.conv_reads_packed(1, out_hw[m], m.groups))
    else:
        for m in convs:
            m.keep_dense(policy != "none")
    return model


def to_packed(model: nn.Module, config=None, dense: str = "all", input_shape=None) -> nn.Module:
    """A deployed copy of a quantized model at ``config`` (its current bits if None): the same
    modules ``load`` builds from a file, in eval mode (``dense``: see keep_dense_weights)."""
    tensors, records, _ = export_tensors(model, config)
    return keep_dense_weights(assemble(model, records, tensors, "the export"), dense,
                              input_shape)


def export(model: nn.Module, path: str | os.PathLike, config=None, arch: dict | None = None,
           extra: dict | None = None) -> Path:
    """Write ``model`` (quantized, e.g. by rfq.quantize_) at ``config`` to a deploy file.
    ``arch`` (build_model's arguments) lets ``load`` rebuild the model from the file alone; it
    is inferred for rfq.models architectures. ``extra``: more JSON metadata (provenance)."""
    arch = arch if arch is not None else infer_arch(model)
    tensors, records, config_used = export_tensors(model, config)
    meta = {"arch": arch, "config": config_used, "layers": records}
    if extra:
        meta["extra"] = extra
    return fmt.write(path, tensors, meta)


def export_specs(model: nn.Module, specs: dict[str, LayerSpec], path: str | os.PathLike,
                 arch: dict | None = None, extra: dict | None = None,
                 config: dict | None = None) -> Path:
    """Write a model whose layers a method quantized itself (``specs``: its codes, scales and
    conventions per layer; e.g. DF-MPC) to a deploy file; BNs fold as in ``export``."""
    arch = arch if arch is not None else infer_arch(model)
    tensors, records = pack_specs(model, specs)
    meta = {"arch": arch, "config": config or {}, "layers": records}
    if extra:
        meta["extra"] = extra
    return fmt.write(path, tensors, meta)


def load(path: str | os.PathLike, model: nn.Module | None = None,
         dense: str = "auto") -> nn.Module:
    """The deployed model of a file (an nn.Module in eval mode, on the CPU). Its architecture
    comes from the file (rfq.models); for other architectures pass ``model``: a float (or
    quantized) instance of it, which is copied, not modified. ``dense``: which convs keep an
    fp32 weight copy (keep_dense_weights; "auto" uses the file's input shape)."""
    if dense not in DENSE_POLICIES:
        raise ValueError(f"dense must be one of {DENSE_POLICIES}, got {dense!r}")
    tensors, meta = fmt.read(path)
    if model is None:
        from rfq.models import MODELS, build_model

        arch = meta["arch"]
        if not isinstance(arch, dict) or arch.get("model") not in MODELS:
            raise DeployFormatError(
                f"{path}: its architecture {arch!r} is not an rfq.models one; pass "
                f"rfq.deploy.load(path, model=<a float instance of the architecture>)")
        model = build_model(arch["model"], arch["in_channels"], arch["classes"])
    deployed = assemble(model, meta["layers"], tensors, str(path))
    arch = meta["arch"] if isinstance(meta["arch"], dict) else {}
    return keep_dense_weights(deployed, dense, arch.get("input_shape"))


def file_sizes(path: str | os.PathLike) -> dict:
    """Bytes of the file and its parts: packed weight codes, their ideal size at each layer's
    own bits (params * bits / 8), scales/biases/steps, other float tensors, and the fp32 size
    of the same model (every weight at 4 bytes, the folded BNs included)."""
    tensors, meta = fmt.read(path)
    codes = sum(t.numel() for k, t in tensors.items() if k.endswith(".codes"))
    ideal = fp32_weights = folded_bn = 0
    for rec in meta["layers"].values():
        numel = math.prod(rec["weight_shape"])
        ideal += numel * rec["bits"] / 8
        fp32_weights += numel * 4
        if rec["bn"] is not None:  # gamma, beta, mean, var (+ the counter); no conv bias here
            folded_bn += 4 * 4 * rec["weight_shape"][0] + 8
        elif rec["bias"]:
            fp32_weights += 4 * rec["weight_shape"][0]
    other = sum(t.numel() * t.element_size() for k, t in tensors.items()
                if k.startswith("float."))
    per_layer = sum(t.numel() * t.element_size() for k, t in tensors.items()
                    if not k.startswith("float.") and not k.endswith(".codes"))
    return {"file": Path(path).stat().st_size, "codes": codes, "codes_ideal": ideal,
            "scales_biases_steps": per_layer, "other_float": other,
            "fp32": fp32_weights + folded_bn + other}


__all__ = ["export", "export_specs", "LayerSpec", "layer_spec", "lsq_spec", "pack_specs",
           "bn_after", "load", "to_packed", "export_tensors", "assemble", "file_sizes",
           "infer_arch", "keep_dense_weights", "DeployFormatError"]
