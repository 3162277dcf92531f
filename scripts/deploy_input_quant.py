"""bench/README's input-quantizer table: what the deployed models' input fake quantization costs
at batch 1, and how many of their quantizers run fused into a packed call. The models are
bench/bench_deploy.py's (random mixed configs; timing does not depend on the weights' values).

    python scripts/deploy_input_quant.py [--rounds 5] [--pairs 400] [--batch 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "deploy"))
from deploy_cases import INPUT, quantized_model  # noqa: E402

from rfq import deploy  # noqa: E402
from rfq.deploy.bench import input_quant_cost  # noqa: E402
from rfq.runtime import flush_denormals, retain_freed_memory  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--pairs", type=int, default=400, help="alternating forward pairs per round")
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    retain_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.rounds} rounds of {args.pairs} pairs")
    print("| model | quantizers fused / separate | share of the forward, median [range] |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("resnet20", "resnet18", "mobilenetv2"):
            model = quantized_model(name, None, seed=0)
            arch = {**deploy.infer_arch(model), "input_shape": list(INPUT[name])}
            deployed = deploy.load(deploy.export(model, Path(tmp) / f"{name}.safetensors",
                                                 arch=arch))
            x = torch.randn(args.batch, *INPUT[name], generator=torch.Generator().manual_seed(0))
            with flush_denormals():
                r = input_quant_cost(deployed, x, args.rounds, args.pairs)
            med, lo, hi = (100 * v for v in r["share"])
            print(f"| {name} | {r['fused']} / {r['separate']} | {med:.1f} % [{lo:.1f}–{hi:.1f}] |",
                  flush=True)


if __name__ == "__main__":
    main()
