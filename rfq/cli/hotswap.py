"""`rfq hotswap train | eval`: one model trained once that switches every layer between 8 and 1
bits at run time (rfq.methods.hotswap; inspired by One Model for All, arXiv 2105.01353).

    python -m rfq hotswap train --init-from rfq/assets/resnet20-fmnist-float.pt --out runs/hotswap
    python -m rfq hotswap eval --checkpoint runs/hotswap --bits 8,6,4,3,2,1
    python -m rfq hotswap export --checkpoint runs/hotswap --bits 2 --out runs/hs-w2.safetensors

``train`` is ``rfq train --profile hotswap`` (every setting of it can be given with --set);
``eval`` reports the test top-1 at each bit-width with the BN copies as trained (no
recalibration: the hot swap's claim), or recalibrated with --calib-images.
"""

from __future__ import annotations

import argparse


def _bits_list(text: str) -> list[int]:
    try:
        bits = [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated bit-widths, got {text!r}")
    return bits


def cmd_train(args) -> int:
    from rfq.cli.main import cmd_train as train

    args.profile, args.mode, args.bits, args.lsq_bits, args.lsq_config = \
        "hotswap", None, None, None, None
    args.n_random, args.tensorboard, args.dataset = None, None, None
    if args.no_wavelet:
        args.set = list(args.set or []) + ["wavelet=False"]
    return train(args)


def load_hotswap(args):
    from rfq.cli.main import load_run_arg

    run = load_run_arg(args)
    if run.cfg.mode != "hotswap":
        raise SystemExit(f"rfq hotswap {args.hotswap_command}: {run.path} holds a "
                         f"{run.cfg.mode} run, not a hot-swap one (train it with rfq hotswap "
                         f"train)")
    return run


def cmd_eval(args) -> int:
    from rfq.cli.pipeline import calibration_batches, evaluate_config, write_json

    run = load_hotswap(args)
    bad = [b for b in args.bits if b not in run.cfg.bits]
    if bad:
        raise SystemExit(f"rfq hotswap eval: --bits {bad} are not bit-widths of this model "
                         f"(it switches among {sorted(run.cfg.bits, reverse=True)})")
    calib = calibration_batches(run, args.calib_images) if args.calib_images else []
    how = f"BN recalibrated on {args.calib_images} images" if calib else "BN as trained"
    print(f"{run.path}: wavelet path {'on' if run.cfg.wavelet else 'off'}; test top-1 ({how})")
    rows = []
    for b in args.bits:
        config = run.costs.uniform(run.model, b)
        acc = evaluate_config(run, config, calib)
        rows.append({"bits": b, "accuracy": acc, "size_kib": run.costs.size_kib(config),
                     "bitops": run.costs.bitops(config)})
        print(f"  W{b}A{b}: {acc * 100:.2f} %  ({rows[-1]['size_kib']:.1f} KiB)")
    if args.json:
        write_json(args.json, {"checkpoint": str(run.path), "wavelet": run.cfg.wavelet,
                               "calib_images": args.calib_images, "train_seconds": run.wall,
                               "rows": rows})
    return 0


def cmd_export(args) -> int:
    from rfq.cli.pipeline import run_arch
    from rfq.deploy import file_sizes
    from rfq.deploy.methods import export_hotswap

    run = load_hotswap(args)
    if args.bits not in run.cfg.bits:
        raise SystemExit(f"rfq hotswap export: --bits {args.bits} is not a bit-width of this "
                         f"model (it switches among {sorted(run.cfg.bits, reverse=True)})")
    path = export_hotswap(run.model, args.bits, args.out, run_arch(run),
                          {"checkpoint": str(run.path)})
    sizes = file_sizes(path)
    print(f"exported W{args.bits}A{args.bits} to {path}: {sizes['file'] / 1024:.1f} KiB "
          f"(fp32 {sizes['fp32'] / 1024:.1f} KiB)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("hotswap", help="hot-swap bit-width 8..1 (One Model for All, inspired)")
    hs = p.add_subparsers(dest="hotswap_command", required=True)
    t = hs.add_parser("train", help="train one hot-swap model (rfq train --profile hotswap)")
    t.add_argument("--out", required=True)
    t.add_argument("--init-from", help="float checkpoint (default: none, train from scratch)")
    t.add_argument("--no-wavelet", action="store_true",
                   help="the direct LSQ path at every bit (the wavelet ablation)")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--config", help="JSON or TOML file of settings")
    t.add_argument("--set", action="append", metavar="KEY=VALUE")
    for flag, kind in (("--model", str), ("--data-dir", str), ("--epochs", int),
                       ("--steps-per-epoch", int), ("--train-limit", int),
                       ("--batch-size", int), ("--lr", float), ("--seed", int),
                       ("--device", str), ("--threads", int)):
        t.add_argument(flag, type=kind)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)
    e = hs.add_parser("eval", help="test top-1 of a hot-swap model at each bit-width")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--bits", type=_bits_list, default=[8, 6, 5, 4, 3, 2, 1])
    e.add_argument("--calib-images", type=int, default=0,
                   help="recalibrate BN on this many training images first (default 0: as "
                        "trained)")
    e.add_argument("--data-dir")
    e.add_argument("--threads", type=int)
    e.add_argument("--json", help="also write the results here")
    e.set_defaults(func=cmd_eval)
    x = hs.add_parser("export", help="one bit-width of a hot-swap model as a deploy file")
    x.add_argument("--checkpoint", required=True)
    x.add_argument("--bits", type=int, required=True)
    x.add_argument("--out", required=True, help="the .safetensors file to write")
    x.add_argument("--data-dir")
    x.add_argument("--threads", type=int)
    x.set_defaults(func=cmd_export)
