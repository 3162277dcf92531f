"""Command line: ``python -m rfq demo`` (the method's train/search/eval/export commands arrive
with the method layer)."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rfq")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="showcase of the fused quantization ops on digits")
    demo.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.steps < 1:
            parser.error("--steps must be at least 1")
        from rfq import showcase

        showcase.main(steps=args.steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
