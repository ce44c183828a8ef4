"""The GPU path (CUDA, bf16). Skipped on machines without CUDA, which includes CI."""

import pytest
import torch

from opd.loop import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_distillation_runs_on_cuda(tiny_config, tmp_path, dtype):
    cfg = tiny_config("train.device=cuda", f"student.dtype={dtype}", f"teacher.dtype={dtype}",
                      "train.steps=4", "eval.every=2", "loss.kind=sampled_reverse_kl", run_dir=tmp_path / "run")
    summary = train(cfg)
    assert summary["steps_done"] == 4
    assert summary["last_step"]["ratio_mean"] == pytest.approx(1.0, abs=2e-2 if dtype == "bfloat16" else 1e-3)


def test_exact_loss_on_cuda_and_auto_device(tiny_config, tmp_path):
    summary = train(tiny_config("train.steps=2", "loss.kind=reverse_kl", run_dir=tmp_path / "run"))  # device: auto
    assert summary["steps_done"] == 2 and "exact_reverse_kl" in summary["last_step"]
