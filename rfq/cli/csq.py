"""`rfq csq`: train a CSQ model to an average-bits budget, harden it, test it and export it
(rfq.methods.csq; CSQ, Xiao et al., DAC 2023).

    python -m rfq csq --init-from rfq/assets/resnet20-fmnist-float.pt --target-bits 3 \\
        --act-bits 4 --budget-mode size --out runs/csq

Resumable (--resume continues the training; a finished run only redoes the report). Writes to
--out: checkpoint.pt, log.csv, report.json (per-layer bits, the reached average, size, test
top-1 of the hardened model and of the deploy file, wall time, the average precision at every
epoch) and model.safetensors (the deploy file).
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path


def build_csq_config(args):
    from rfq.cli.main import merge_settings
    from rfq.methods.csq import CSQ_DEFAULTS, CsqConfig

    values = merge_settings(dict(CSQ_DEFAULTS), args, "rfq csq")
    for key in ("model", "dataset", "data_dir", "init_from", "planes", "target_bits",
                "act_bits", "act_quant", "budget_mode", "reg_strength", "rounds",
                "round_epochs", "ticket_epochs", "rewind", "zero_layers", "steps_per_epoch",
                "train_limit", "batch_size", "lr", "seed", "device"):
        v = getattr(args, key, None)
        if v is not None:
            values[key] = v
    try:
        return CsqConfig.from_dict(values)
    except (ValueError, TypeError) as err:
        raise SystemExit(f"rfq csq: bad settings: {err}") from None


def size_report(model, costs, planes: int) -> dict:
    """Per-layer precision, CSQ's size-weighted average bits and size (P_l b_l), and the
    storage the deploy file needs (signed digits: b + 1 bits for b contiguous bits on)."""
    from rfq.deploy.methods import csq_spec
    from rfq.methods.csq import csq_layers

    layers, counted, stored, params = {}, 0, 0, 0
    for name, layer in csq_layers(model):
        p = costs.layers[name].params
        b = layer.precision()
        try:
            storage = csq_spec(layer).bits
        except ValueError:  # 9-bit codes: reported, not exportable
            storage = 9
        on = [i for i in range(planes) if bool(layer.m[i] > 0)]
        layers[name] = {"bits": b, "bits_on": on, "storage_bits": storage, "params": p}
        counted += p * b
        stored += p * storage
        params += p
    return {"layers": layers, "average_bits": counted / params,
            "size_kib": counted / 8 / 1024, "storage_average_bits": stored / params,
            "storage_kib": stored / 8 / 1024, "params": params}


def cmd_csq(args) -> int:
    import torch

    from rfq import checkpoint as ckpt
    from rfq.cli.pipeline import dataset_arch, dataset_calibration_batches
    from rfq.data import eval_batches
    from rfq.deploy import file_sizes, load
    from rfq.deploy.methods import export_csq
    from rfq.methods.csq import CsqTrainer, harden
    from rfq.methods.rfq.search import recalibrate_bn
    from rfq.runtime import flush_denormals
    from rfq.training import evaluate

    cfg = build_csq_config(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        trainer = CsqTrainer(cfg, args.out, resume=args.resume,
                             progress=not args.no_progress)
    except (ckpt.CheckpointError, FileNotFoundError, ValueError) as err:
        raise SystemExit(f"rfq csq: {err}") from None
    t0 = time.perf_counter()
    trainer.run()
    if not trainer.dist.main:
        return 0
    out = Path(args.out)
    ds = trainer.ds
    model = copy.deepcopy(trainer.model)
    soft_bits = trainer.average_bits()
    precisions = harden(model, cfg.zero_layers)
    def test():
        return eval_batches(ds.test, ds, 256, trainer.device, cfg.channels_last)

    with flush_denormals():
        top1_as_trained = evaluate(model, test())
        if args.calib_images:
            recalibrate_bn(model, dataset_calibration_batches(
                ds, args.calib_images, cfg.seed + 1000, trainer.device, cfg.channels_last))
        top1 = evaluate(model, test())
    sizes = size_report(model, trainer.costs, cfg.planes)
    try:
        path = export_csq(model, out / "model.safetensors", dataset_arch(cfg.model, ds),
                          {"target_bits": cfg.target_bits, "planes": cfg.planes,
                           "budget_mode": cfg.budget_mode})
    except ValueError as err:
        print(f"rfq csq: not exported: {err}")
        path = None
    deployed, files = None, {"file": None, "fp32": None}
    if path is not None:
        with flush_denormals():
            deployed = evaluate(load(path), eval_batches(ds.test, ds, 256, "cpu",
                                                         cfg.channels_last))
        files = file_sizes(path)
    report = {
        "target_bits": cfg.target_bits, "planes": cfg.planes, "act_bits": cfg.act_bits,
        "budget_mode": cfg.budget_mode, "reg_strength": cfg.reg_strength,
        "mode_average_bits": soft_bits, "precisions": precisions, **sizes,
        "top1": top1, "top1_bn_as_trained": top1_as_trained, "calib_images": args.calib_images,
        "deploy_top1": deployed, "deploy_file_bytes": files["file"], "fp32_bytes": files["fp32"],
        "train_seconds": trainer.wall, "steps": trainer.step, "history": trainer.history,
        "config": {k: v for k, v in vars(cfg).items()},
    }
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out / "report.json")
    deploy_text = "not exported" if path is None else \
        f"the file {files['file'] / 1024:.1f} KiB, its top-1 {deployed * 100:.2f} %"
    print(f"CSQ target {cfg.target_bits:g} bits ({cfg.budget_mode}): reached "
          f"{sizes['average_bits']:.3f} bits size-weighted ({sizes['size_kib']:.1f} KiB; "
          f"stored at {sizes['storage_average_bits']:.3f} bits); test top-1 {top1 * 100:.2f} "
          f"%; {deploy_text}; trained {trainer.wall:.0f} s, this call "
          f"{time.perf_counter() - t0:.0f} s")
    print("per-layer bits: " + ", ".join(f"{n} {b}" for n, b in precisions.items()))
    trainer.close()
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("csq", help="CSQ: grow and prune bits to an average-bits budget")
    p.add_argument("--out", required=True)
    p.add_argument("--init-from", dest="init_from", help="float checkpoint to start from")
    p.add_argument("--target-bits", dest="target_bits", type=float,
                   help="average bits to reach (default 3)")
    p.add_argument("--act-bits", dest="act_bits", type=int, help="input bits (default 4)")
    p.add_argument("--act-quant", dest="act_quant", choices=["spec", "lsq"],
                   help="inputs: spec (ReLU6 max-scaled, PACT at <= 3 bits; default) or lsq "
                        "(learned steps, an ablation)")
    p.add_argument("--budget-mode", dest="budget_mode", choices=["size", "bitops", "layer"])
    p.add_argument("--planes", type=int,
                   help="N bit planes per weight, 2..8 (default 6; 8 may need 9-bit codes)")
    p.add_argument("--reg-strength", dest="reg_strength", type=float, help="lambda")
    p.add_argument("--rounds", type=int, help="soft rounds (default 1)")
    p.add_argument("--round-epochs", dest="round_epochs", type=int)
    p.add_argument("--ticket-epochs", dest="ticket_epochs", type=int)
    p.add_argument("--rewind", action="store_true", default=None,
                   help="the ticket round restarts from the weights of epoch 2 of round 0")
    p.add_argument("--zero-layers", dest="zero_layers", choices=["clamp", "prune"])
    p.add_argument("--calib-images", type=int, default=2048,
                   help="recalibrate BN of the hardened model on this many training images "
                        "(0: as trained)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--config", help="JSON or TOML file of settings")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    for flag, kind in (("--model", str), ("--dataset", str), ("--data-dir", str),
                       ("--steps-per-epoch", int), ("--train-limit", int),
                       ("--batch-size", int), ("--lr", float), ("--seed", int),
                       ("--device", str), ("--threads", int)):
        p.add_argument(flag, type=kind)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_csq)
