"""A served teacher under torchrun (issue 33): 2 ranks (gloo) each send their share of the batch to
the real vLLM server; the run equals the same 2-rank run with the teacher in process, and a server
killed mid-run (kill -9 of its whole process group) ends the job with the last checkpoint kept, from
which `--resume` continues exactly as the uninterrupted run.

Every run is `python -m torch.distributed.run` of tests/distributed_worker.py on 127.0.0.1 with a
timeout; the server is the session's (conftest.py), on 127.0.0.1, started and stopped by the fixtures.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import torchrun
from opd.learner.checkpoint import latest_checkpoint

pytestmark = pytest.mark.vllm

# The worker's tiny run (helpers.TINY_RUN) with the session's served teacher in place of its own;
# 4 prompts x 2 samples: each rank scores 2 prompts' 4 sequences.
RUN = ["train.prompts_per_step=4", "sampling.samples_per_prompt=2", "sampling.max_new_tokens=12",
       "data.eval_holdout=4", "train.strategy=ddp"]
TIMING = ("_s", "_s_total")


def served(server, *extra) -> list[str]:
    return ["teacher.tiny=null", f"teacher.url={server.url}", f"teacher.served_model={server.model_name}", *extra]


def rows(run_dir) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.endswith(TIMING)}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir) -> dict:
    return load_file(str(latest_checkpoint(run_dir) / "model" / "model.safetensors"))


def test_two_ranks_score_their_shares_on_the_server_as_with_the_teacher_in_process(vllm_server, tmp_path):
    torchrun("train", tmp_path / "local", "train.steps=3", *RUN, "teacher.tiny=null",
             f"teacher.path={vllm_server.model_dir}", timeout=400)
    torchrun("train", tmp_path / "served", "train.steps=3", *RUN, *served(vllm_server), timeout=400)
    local, served_rows = rows(tmp_path / "local"), rows(tmp_path / "served")
    assert [r["step"] for r in served_rows] == [0, 1, 2, 3]
    for a, b in zip(local[1:], served_rows[1:]):  # the same samples (in process, per rank), the same teacher numbers
        assert b["tokens"] == a["tokens"]
        assert b["teacher_kl"] == pytest.approx(a["teacher_kl"], abs=1e-4)
        assert b["teacher_retries"] == 0
    # one request per sequence (teacher.rows_per_request=1), summed over ranks: the 8 sequences of the
    # global batch, 4 from each rank (step 1 also counts the step-0 evaluation's)
    assert [r["teacher_requests"] for r in served_rows[2:]] == [8, 8]
    assert served_rows[1]["teacher_requests"] >= 8
    for name, w in final_weights(tmp_path / "local").items():
        torch.testing.assert_close(final_weights(tmp_path / "served")[name], w, atol=1e-4, rtol=1e-4)


def test_a_server_killed_under_torchrun_ends_the_job_and_resume_continues_exactly(vllm_server, tmp_path):
    settings = ["train.steps=4", "checkpoint.every=1", *RUN,
                *served(vllm_server, "teacher.retry_for_s=3", "teacher.timeout_s=20")]
    torchrun("train", tmp_path / "whole", *settings, timeout=400)
    try:  # rank 0 kills the server as step 3 begins: that step cannot be scored on any rank
        done = torchrun("train", tmp_path / "killed", "--rank", 0, "--at-step", 3, "--then", "kill-server",
                        "--server-pgid", vllm_server.proc.pid, *settings, timeout=400, check=False)
    finally:
        vllm_server.kill()  # reap what is left of it, then back on the same port
        vllm_server.start()
    assert done.returncode != 0
    assert "step 3 could not be scored" in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]
    assert latest_checkpoint(tmp_path / "killed").name == "step_000002"

    torchrun("train", tmp_path / "killed", "--resume", *settings, timeout=400)
    killed, whole = rows(tmp_path / "killed"), rows(tmp_path / "whole")
    assert [r["step"] for r in killed] == [0, 1, 2, 3, 4]  # every step once
    for a, b in zip(killed[1:], whole[1:]):
        assert a["tokens"] == b["tokens"] and a["teacher_kl"] == pytest.approx(b["teacher_kl"], abs=1e-5)
    for name, w in final_weights(tmp_path / "whole").items():
        torch.testing.assert_close(final_weights(tmp_path / "killed")[name], w, atol=1e-6, rtol=1e-6)
