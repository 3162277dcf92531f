"""`rfq dfmpc`: DF-MPC on a float checkpoint, with no data, then its test accuracy beside the
float model's and the uncompensated quantized model's (the evaluation is the only step that reads
images; the compensation itself gets none).

Writes ``--out``/report.json (accuracies, bits, size, timings, per-pair c statistics) and
``--out``/model.pt: the compensated model as a float checkpoint whose weights lie on their
quantization grids (``rfq eval --checkpoint`` reads it), with each layer's integer codes and
scale beside it under ``codes``; and ``--out``/model.safetensors: the same model as a deploy file
of packed codes (``rfq.deploy.load`` runs it; ternary and DoReFa codes at their own bits).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path


def parse_bits(text: str) -> tuple[int, int]:
    """'2/6' -> (2, 6): the pairs' low bits / every other layer's bits."""
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise SystemExit(f"rfq dfmpc: --bits takes LOW/HIGH, e.g. 2/6, got {text!r}")
    low, high = (int(p) for p in parts)
    for name, b in (("low", low), ("high", high)):
        if not 2 <= b <= 8:
            raise SystemExit(f"rfq dfmpc: --bits {text}: the {name} bit-width must be in 2..8 "
                             "(2 = ternary)")
    if low > high:
        raise SystemExit(f"rfq dfmpc: --bits {text}: the low bit-width must not exceed the high")
    return low, high


def parse_pairs(text: str | None):
    """'a.conv1:a.conv2,b.conv1:b.conv2' -> [(a.conv1, a.conv2), ...]; None: automatic."""
    if not text:
        return None
    pairs = []
    for item in text.split(","):
        names = item.split(":")
        if len(names) != 2 or not all(names):
            raise SystemExit(f"rfq dfmpc: --pairs takes LOW:HIGH[,LOW:HIGH...], got {item!r}")
        pairs.append((names[0].strip(), names[1].strip()))
    return pairs


def main(args) -> int:
    from rfq import checkpoint as ckpt
    from rfq.cli.main import load_run_arg
    from rfq.cli.pipeline import run_arch, test_batches, write_json
    from rfq.deploy import file_sizes
    from rfq.deploy.methods import export_dfmpc
    from rfq.methods.dfmpc import PairingError, compensate, quantize_uncompensated
    from rfq.runtime import flush_denormals
    from rfq.training.metrics import evaluate

    low, high = parse_bits(args.bits)
    pairs = parse_pairs(args.pairs)
    run = load_run_arg(args)
    if run.costs is not None:
        raise SystemExit(f"rfq dfmpc: {run.path} holds a {run.cfg.mode} model; DF-MPC starts "
                         "from a float model (a float run's checkpoint or the shipped one)")
    try:
        model, report = compensate(run.model, low, high, pairs=pairs, lam1=args.lam1,
                                   lam2=args.lam2, rule=args.rule)
        plain, _ = quantize_uncompensated(run.model, low, high, pairs=pairs)
    except (PairingError, ValueError) as err:
        raise SystemExit(f"rfq dfmpc: {err}") from None
    print(f"DF-MPC {low}/{high} on {run.cfg.model}: {len(report.pairs)} pairs, average "
          f"{report.average_bits:.2f} weight bits, {report.size_kib:.1f} KiB, compensation "
          f"{report.seconds:.3f} s (no data)")

    result = {"checkpoint": str(run.path), "model": run.cfg.model, "dataset": run.cfg.dataset,
              "bits": f"{low}/{high}", **report.summary()}
    float_params = sum(q.params for q in report.layers.values())
    result["float_kib"] = float_params * 4 / 1024
    if not args.no_eval:
        start = time.perf_counter()
        with flush_denormals():
            for key, m in (("fp", run.model), ("uncompensated", plain), ("dfmpc", model)):
                result[key] = evaluate(m, test_batches(run))
        result["eval_seconds"] = time.perf_counter() - start
        print(f"test top-1: float {result['fp'] * 100:.2f} %, uncompensated "
              f"{result['uncompensated'] * 100:.2f} %, DF-MPC {result['dfmpc'] * 100:.2f} %")
    out = Path(args.out)
    codes = {n: {"bits": q.bits, "kind": q.kind, "codes": q.codes, "scale": q.scale,
                 "channel_scale": q.channel_scale} for n, q in report.layers.items()}
    ckpt.save_atomic({"kind": "float", "config": asdict(run.cfg),
                      "model": model.state_dict(), "codes": codes,
                      "dfmpc": {k: v for k, v in result.items() if k != "layers"}},
                     out / "model.pt")
    packed = export_dfmpc(model, report, out / "model.safetensors", run_arch(run),
                          {"checkpoint": str(run.path), "dataset": run.cfg.dataset})
    sizes = file_sizes(packed)
    result["deploy_file_kib"] = sizes["file"] / 1024
    write_json(out / "report.json", result)
    print(f"wrote {out / 'report.json'}, {out / 'model.pt'} and the deploy file {packed} "
          f"({sizes['file'] / 1024:.1f} KiB; fp32 {sizes['fp32'] / 1024:.1f} KiB)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("dfmpc", help="DF-MPC: data-free low/high compensation of a float model")
    p.add_argument("--checkpoint", required=True,
                   help="float checkpoint (a float run's folder or file, or the shipped one)")
    p.add_argument("--bits", default="2/6", help="LOW/HIGH, e.g. 2/6 (2 = ternary; default 2/6)")
    p.add_argument("--out", required=True, help="folder for report.json and model.pt")
    p.add_argument("--pairs", help="explicit pairs LOW:HIGH[,LOW:HIGH...] (default: automatic)")
    p.add_argument("--lam1", type=float, default=0.5, help="offset weight (default 0.5)")
    p.add_argument("--lam2", type=float, default=0.0, help="penalty on c^2 (default 0)")
    p.add_argument("--rule", choices=["R1", "R2"], default="R1")
    p.add_argument("--no-eval", action="store_true", help="skip the test-set evaluation")
    p.add_argument("--data-dir")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=main)
