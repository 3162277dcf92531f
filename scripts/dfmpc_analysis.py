"""Why DF-MPC's compensation helps or hurts on a model: the measurements behind the README.

1. lam1 sweep: test top-1 of the compensated model for lam1 in 0.5, 5, 50, 500 (large lam1
   pulls c to 1, i.e. back to the uncompensated model);
2. the scale-dropped baseline: the low/high quantized weights without their scale (alpha, s)
   and the BN unchanged, the paper's likely "uncompensated" row ("absorbed by BN", no data to
   recalibrate it);
3. per pair whose c folds into a BN (after ReLU or nothing), on 512 test images (analysis only: the method itself reads none): the weight-space
   error |g (c w_hat - w)|^2 that c minimises, against the error of the pair's actual output
   (the low conv's BN + ReLU output) with and without c, and the low conv's input mean / std.
Usage: python scripts/dfmpc_analysis.py CHECKPOINT BITS OUT.json [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("bits", help="LOW/HIGH, e.g. 3/6")
    p.add_argument("out")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from rfq.cli.dfmpc import parse_bits
    from rfq.cli.pipeline import load_run, test_batches, write_json
    from rfq.methods.dfmpc import compensate, quantize_uncompensated
    from rfq.runtime import flush_denormals
    from rfq.training.metrics import evaluate

    low, high = parse_bits(args.bits)
    run = load_run(args.checkpoint)
    model = run.model.eval()
    result = {"checkpoint": args.checkpoint, "bits": args.bits}
    with flush_denormals():
        plain, report = quantize_uncompensated(model, low, high)
        result["uncompensated"] = evaluate(plain, test_batches(run))
        result["lam1_sweep"] = {}
        for lam1 in (0.5, 5.0, 50.0, 500.0):
            comp, _ = compensate(model, low, high, lam1=lam1)
            result["lam1_sweep"][str(lam1)] = evaluate(comp, test_batches(run))
        dropped = copy.deepcopy(plain)
        with torch.no_grad():
            for name, q in report.layers.items():
                if float(q.scale) > 0:
                    dropped.get_submodule(name).weight.div_(q.scale)
        result["scale_dropped"] = evaluate(dropped, test_batches(run))

        comp, comp_report = compensate(model, low, high)
        x, _ = next(test_batches(run, limit=512))
        inputs = {}
        hooks = [model.get_submodule(pr.low).register_forward_pre_hook(
            lambda mod, a, name=pr.low: inputs.__setitem__(name, a[0].detach()))
            for pr in comp_report.pairs]
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        pairs = []
        for pr in comp_report.pairs:
            if pr.fold != "bn":  # c sits in the next conv's weights: no BN output to compare
                continue
            bn_name = pr.bn

            def pair_out(m, name=pr.low, bn_name=bn_name):
                y = m.get_submodule(name)(inputs[name])
                return torch.relu(m.get_submodule(bn_name)(y) if bn_name else y)

            with torch.no_grad():
                ref = pair_out(model)
                err_plain = float((pair_out(plain) - ref).pow(2).mean())
                err_comp = float((pair_out(comp) - ref).pow(2).mean())
                w = model.get_submodule(pr.low).weight.double()
                w_hat = plain.get_submodule(pr.low).weight.double()
                if bn_name:
                    bn = model.get_submodule(bn_name)
                    g = (bn.weight / (bn.running_var + bn.eps).sqrt()).double()
                else:
                    g = torch.ones(w.shape[0], dtype=torch.float64)
                shape = (-1,) + (1,) * (w.dim() - 1)
                c = pr.c.double().reshape(shape)
                ws_plain = float((g.reshape(shape) * (w_hat - w)).pow(2).sum())
                ws_comp = float((g.reshape(shape) * (c * w_hat - w)).pow(2).sum())
            xin = inputs[pr.low]
            pairs.append({"low": pr.low, "c_mean": pr.c_mean, "weight_err_plain": ws_plain,
                          "weight_err_comp": ws_comp, "output_err_plain": err_plain,
                          "output_err_comp": err_comp,
                          "input_mean_over_std": float(xin.mean() / xin.std())})
        result["pairs"] = pairs
        result["pairs_output_worse"] = sum(q["output_err_comp"] > q["output_err_plain"]
                                           for q in pairs)
        result["pairs_weight_better"] = sum(q["weight_err_comp"] < q["weight_err_plain"]
                                            for q in pairs)
    write_json(Path(args.out), result)
    print(json.dumps({k: v for k, v in result.items() if k != "pairs"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
