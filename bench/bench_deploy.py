"""Deployed models (rfq.deploy) against their fp32 models, same run (issue 16: never slower at
batch 1; goal 1.5x at batch 1 for ResNet-18). Models at 28x28 input (Fashion-MNIST size; 3 input
channels for ResNet-18 and MobileNetV2) with a random mixed config from {6..2} bits (depthwise
{6..3}); timing does not depend on the weights' values.

Baselines per group: the fp32 model as users run it (eager, BN as its own op: "fp32"), the same
with BN folded into the conv ("fp32, BN folded": the fastest plain fp32 form), and the deployed
model with its input fake quantization switched off (the ratio against it is what that
quantization costs). Batch 64 runs twice: the default dense="auto" (dense copies only for the
convs that are compute-bound at batch 1) and dense="all" (every conv keeps one: the throughput
setting). All under torch.inference_mode().
"""

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from rfq import deploy
from rfq.deploy import bench as deploy_bench
from rfq.models import build_model
from rfq.runtime import flush_denormals, retain_freed_memory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "deploy"))
from deploy_cases import INPUT, quantized_model  # noqa: E402

SMOKE = bool(os.environ.get("RFQ_BENCH_SMOKE"))
# (model, batch, which convs keep a dense weight copy: see rfq.deploy.keep_dense_weights)
CASES = [("resnet20", 1, "auto")] if SMOKE else [
    (m, b, d) for m in ("resnet20", "resnet18", "mobilenetv2")
    for b, d in ((1, "auto"), (64, "auto"), (64, "all"))]
ROLES = ["rfq", "fp32", "fp32, BN folded", "deployed, inputs not quantized"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    retain_freed_memory()
    tmp = tmp_path_factory.mktemp("deploy-bench")
    out = {}
    for name in {c[0] for c in CASES}:
        model = quantized_model(name, None, seed=0)
        arch = {**deploy.infer_arch(model), "input_shape": list(INPUT[name])}
        out[name] = deploy.export(model, tmp / f"{name}.safetensors", arch=arch)
    return out


@pytest.fixture(scope="module")
def models(files):
    cache = {}

    def get(name, dense, role):
        if (name, dense) not in cache:
            cache[name, dense] = {"rfq": deploy.load(files[name], dense=dense)}
        built = cache[name, dense]
        if role not in built:
            skeleton = build_model(name, INPUT[name][0], 10)
            deployed = built["rfq"]
            built[role] = {
                "fp32": lambda: deploy_bench.float_twin(deployed, skeleton),
                "fp32, BN folded": lambda: deploy_bench.float_twin(deployed, skeleton, True),
                "deployed, inputs not quantized": lambda: deploy_bench.without_act_quant(deployed),
            }[role]()
        return built[role]
    return get


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("name,batch,dense", CASES)
def bench_deployed_inference(benchmark, models, name, batch, dense, role):
    model = models(name, dense, role)
    benchmark.group = f"{name} inference, batch {batch}, dense={dense}"
    floor = "never slower at batch 1" + ("; goal 1.5x" if name == "resnet18" else "") \
        if batch == 1 else "(reported)"
    benchmark.extra_info.update(role=role, target="D1 deploy speed", floor=floor)
    x = torch.randn(batch, *INPUT[name], generator=torch.Generator().manual_seed(0))

    def run():
        with torch.inference_mode():
            return model(x)
    with flush_denormals():
        # half a second of calls first: the first group of the session (ResNet-20, the deployed
        # role) right after the exports otherwise timed 1.6-2x slow, whichever role came first
        end = time.perf_counter() + 0.5
        while time.perf_counter() < end:
            run()
        benchmark.pedantic(run, rounds=5 if SMOKE else (60 if batch == 1 else 15),
                           iterations=5 if batch == 1 else 1, warmup_rounds=3)
