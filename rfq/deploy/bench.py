"""Measure a deployed model against the fp32 model of the same architecture, in the same run.

The fp32 baseline (``float_twin``) is the float architecture as users run it (eager PyTorch,
BatchNorm as a separate op, ReLU after it) holding the deployed weights dequantized; a second
baseline folds the BN into the conv (the fastest plain fp32 form). Both models run under
``torch.inference_mode()``, as deployment does, with denormals flushed and freed memory kept
in the process (rfq.runtime). A ratio is fp32 time / deployed time (> 1: the
deployed model is faster), taken per round from interleaved medians; the median and range over
rounds are reported.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch import nn

from rfq.nn import replace_module
from rfq.nn.packed import PackedLayer


@torch.no_grad()
def float_twin(deployed: nn.Module, skeleton: nn.Module, fold_bn: bool = False) -> nn.Module:
    """The fp32 model of ``deployed``'s architecture: ``skeleton`` (a float instance, copied)
    with every packed weight dequantized. Unless ``fold_bn``, a folded BN is restored as an
    identity-statistics BN holding the bias, so the twin runs conv -> BN -> ReLU like the
    original float model."""
    twin = copy.deepcopy(skeleton).float().eval()
    modules = dict(twin.named_modules())
    for name, layer in deployed.named_modules():
        if not isinstance(layer, PackedLayer):
            continue
        mod = modules[name]
        mod.weight.copy_(layer.dequantized_weight())
        bias = None if layer.bias is None else layer.bias.clone()
        if layer.bn_name is None:
            if bias is not None:
                mod.bias.copy_(bias)
            continue
        if fold_bn:
            mod.bias = nn.Parameter(bias)
            replace_module(twin, layer.bn_name, nn.Identity())
        else:
            bn = modules[layer.bn_name]
            bn.weight.fill_(1.0)
            bn.bias.copy_(bias)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
    for name, m in deployed.named_modules():  # the deployed model's other tensors
        if isinstance(m, nn.BatchNorm2d):
            modules[name].load_state_dict(m.state_dict())
    return twin


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer a model holds at run time (dense copies included)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


class _UnquantizedInput(PackedLayer):
    """A packed layer with its input quantizer switched off that still reports an input clamped
    at zero, so the ReLU its quantizer replaced stays skipped: the same ops but the quantizer."""

    @property
    def input_clamps_at_zero(self) -> bool:
        return True


def without_act_quant(deployed: nn.Module) -> nn.Module:
    """A copy of ``deployed`` whose inputs are not fake-quantized and which otherwise runs the
    same ops (a ReLU the quantizer replaced stays skipped, so its outputs are not meaningful):
    the time difference is what the input quantization costs."""
    model = copy.deepcopy(deployed)
    for m in model.modules():
        if isinstance(m, PackedLayer):
            if m.input_clamps_at_zero:
                m.__class__ = _UnquantizedInput
            m.a_bit = None
    return model


def _median_ms(model: nn.Module, x: torch.Tensor, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@torch.inference_mode()
def compare(models: dict[str, nn.Module], x: torch.Tensor, rounds: int = 3, reps: int = 20,
            warmup: int = 3) -> dict[str, list[float]]:
    """{name: [median ms of each round]}, the models interleaved within every round."""
    for m in models.values():
        for _ in range(warmup):
            m(x)
    out = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            out[k].append(_median_ms(m, x, reps))
    return out


def ratio(base: list[float], new: list[float]) -> tuple[float, float, float]:
    """(median, min, max) over rounds of base / new."""
    r = [b / n for b, n in zip(base, new)]
    return statistics.median(r), min(r), max(r)


def _layer_inputs(deployed: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: input} of every packed layer in one forward of ``x``."""
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: inputs.__setitem__(n, a[0]))
             for n, m in deployed.named_modules() if isinstance(m, PackedLayer)]
    try:
        deployed(x)
    finally:
        for h in hooks:
            h.remove()
    return inputs


@torch.inference_mode()
def input_quant_cost(deployed: nn.Module, x: torch.Tensor, rounds: int = 3,
                     reps: int = 200) -> dict:
    """What the input fake quantization costs in a forward: ``deployed`` against
    ``without_act_quant(deployed)`` (the same ops without the quantizers), called alternately;
    per round the median of the pairs' differences over the median forward (drift cancels within
    a pair). Also how many quantizers run fused into a packed call and how many separately."""
    plain = without_act_quant(deployed)
    fused = separate = 0
    for name, x_in in _layer_inputs(deployed, x).items():
        layer = deployed.get_submodule(name)
        if layer.a_bit is not None:
            fused += layer.reads_packed(x_in)
            separate += not layer.reads_packed(x_in)
    for _ in range(3):
        deployed(x)
        plain(x)
    shares = []
    for _ in range(rounds):
        diffs, forward = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            deployed(x)
            t1 = time.perf_counter()
            plain(x)
            t2 = time.perf_counter()
            diffs.append((t1 - t0) - (t2 - t1))
            forward.append(t1 - t0)
        shares.append(statistics.median(diffs) / statistics.median(forward))
    return {"share": (statistics.median(shares), min(shares), max(shares)),
            "fused": fused, "separate": separate}


@torch.inference_mode()
def per_layer(deployed: nn.Module, twin: nn.Module, x: torch.Tensor, reps: int = 20) -> list:
    """Per packed layer on its real input: (name, description, deployed ms, fp32 ms of the conv
    plus its BN), from one forward's captured inputs."""
    inputs = _layer_inputs(deployed, x)
    modules = dict(twin.named_modules())
    rows = []
    for name, layer in deployed.named_modules():
        if name not in inputs:
            continue
        xi = inputs[name]
        conv = modules[name]
        bn = modules[layer.bn_name] if layer.bn_name else nn.Identity()
        fp32 = nn.Sequential(conv, bn)
        for _ in range(3):
            layer(xi)
            fp32(xi)
        t_dep = _median_ms(layer, xi, reps)
        t_fp32 = _median_ms(fp32, xi, reps)
        path = "packed" if layer.reads_packed(xi) else (
            "dense" if layer.dense is not None else "dequantize per call")
        rows.append((name, f"{list(layer.weight_shape)} W{layer.w_bit} {path}", t_dep, t_fp32))
    return rows


def bench_file(path, batches=(1, 64), rounds: int = 3, reps: int = 20, dense: str = "auto",
               layers: bool = False) -> dict:
    """Sizes and speed of a deploy file against its fp32 twin (and the BN-folded twin), plus
    the deployed model without input fake quantization, per batch size; ``layers``: the
    per-layer times at the first batch size."""
    from rfq.deploy.export import file_sizes, load
    from rfq.models import build_model
    from rfq.deploy import format as fmt
    from rfq.runtime import flush_denormals, retain_freed_memory

    retain_freed_memory()  # else glibc returns each call's freed outputs to the OS (page faults)
    _, meta = fmt.read(path)
    arch = meta["arch"] or {}
    if "input_shape" not in arch:
        raise ValueError(f"{path} records no input shape: export it with rfq export (which "
                         f"takes it from the dataset) or pass arch['input_shape'] to export")
    deployed = load(path, dense=dense)
    skeleton = build_model(arch["model"], arch["in_channels"], arch["classes"])
    models = {"fp32": float_twin(deployed, skeleton),
              "fp32, BN folded": float_twin(deployed, skeleton, fold_bn=True),
              "deployed": deployed}
    gen = torch.Generator().manual_seed(0)
    report = {"file": str(path), "dense": dense, "threads": torch.get_num_threads(),
              "sizes": file_sizes(path), "batches": {},
              "resident": {k: resident_bytes(models[k]) for k in ("fp32", "deployed")}}
    with flush_denormals():
        for b in batches:
            x = torch.randn(b, *arch["input_shape"], generator=gen)
            times = compare(models, x, rounds, reps if b < 16 else max(3, reps // 4))
            report["batches"][b] = {
                "ms": {k: statistics.median(v) for k, v in times.items()},
                "speedup": ratio(times["fp32"], times["deployed"]),
                "speedup_vs_folded": ratio(times["fp32, BN folded"], times["deployed"]),
                "act_quant_cost": input_quant_cost(deployed, x, rounds,
                                                   10 * reps if b < 16 else max(3, reps // 4))}
        if layers:
            x = torch.randn(batches[0], *arch["input_shape"], generator=gen)
            report["layers"] = per_layer(deployed, models["fp32"], x, reps)
    return report


def format_report(report: dict) -> str:
    s = report["sizes"]
    lines = [f"{report['file']}: {s['file'] / 1024:.1f} KiB on disk (packed codes "
             f"{s['codes'] / 1024:.1f} KiB, {s['codes_ideal'] / 1024:.1f} KiB at each layer's own "
             f"bits); fp32 weights {s['fp32'] / 1024:.1f} KiB: {s['fp32'] / s['file']:.2f}x "
             f"smaller",
             f"weights held at run time: deployed {report['resident']['deployed'] / 1024:.1f} KiB "
             f"(packed codes + dense copies, dense={report['dense']}), fp32 "
             f"{report['resident']['fp32'] / 1024:.1f} KiB",
             f"speed on {report['threads']} threads, torch.inference_mode, dense={report['dense']}"
             f" (fp32 ms / deployed ms, median of rounds [min-max]):",
             "| batch | fp32 ms | fp32 BN-folded ms | deployed ms | speedup vs fp32 "
             "| vs BN-folded fp32 | input fake quantization: share of the forward "
             "| quantizers fused / separate |",
             "|---|---|---|---|---|---|---|"]
    for b, r in report["batches"].items():
        ms, (m, lo, hi), (mf, lof, hif) = r["ms"], r["speedup"], r["speedup_vs_folded"]
        q = r["act_quant_cost"]
        lines.append(f"| {b} | {ms['fp32']:.2f} | {ms['fp32, BN folded']:.2f} | "
                     f"{ms['deployed']:.2f} | {m:.2f}x [{lo:.2f}-{hi:.2f}] | "
                     f"{mf:.2f}x [{lof:.2f}-{hif:.2f}] | {q['share'][0] * 100:.1f} % "
                     f"[{q['share'][1] * 100:.1f}-{q['share'][2] * 100:.1f}] | "
                     f"{q['fused']} / {q['separate']} |")
    if report.get("layers"):
        lines += ["", "| layer | weight, bits, path | deployed ms | fp32 conv+BN ms |",
                  "|---|---|---|---|"]
        lines += [f"| {n} | {d} | {a:.3f} | {f:.3f} |" for n, d, a, f in report["layers"]]
    return "\n".join(lines)


__all__ = ["float_twin", "resident_bytes", "without_act_quant", "compare", "input_quant_cost", "ratio", "per_layer", "bench_file", "format_report"]
