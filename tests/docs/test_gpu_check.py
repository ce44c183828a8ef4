"""scripts/gpu_check.sh (issue 33): on a machine without a GPU it says so and exits 0; its one-check
runner reports a skipped check in one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: run scripts/gpu_check.sh itself")
def test_without_a_gpu_the_check_says_so_and_exits_cleanly():
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OPD_PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"gpu_check: no CUDA GPU here (torch.cuda.is_available() is False with "
                                   f"{sys.executable}): nothing checked")


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="2 GPUs: the nccl check runs")
def test_a_check_that_cannot_run_here_is_one_skip_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--one", "nccl"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0
    assert done.stdout.startswith("SKIP nccl") and "NCCL needs 2 GPUs" in done.stdout
