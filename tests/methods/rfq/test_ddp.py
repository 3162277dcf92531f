"""Multi-process training: 2 CPU processes under torchrun (gloo) stay in lockstep."""

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
TESTS = HERE.parents[1]  # method_utils.py


def test_two_process_ddp_training_keeps_ranks_identical(tmp_path):
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    err = proc.stderr
    assert proc.returncode == 0, err[err.find("Traceback"):][:4000] or err[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["steps"] == r1["steps"] == 6
    assert r0["config"] == r1["config"]  # the same random bit-widths on every rank
    for key, value in r0["model"].items():
        if torch.is_tensor(value) and value.is_floating_point() and "running" not in key:
            assert torch.equal(value, r1["model"][key]), key
    assert (tmp_path / "checkpoint.pt").is_file()  # written once, by rank 0
