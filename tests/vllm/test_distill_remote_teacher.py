"""Distillation from a teacher served by the real vLLM engine: the same run as with the teacher in
process, and a server killed mid-run loses and duplicates nothing after `--resume`."""

from __future__ import annotations

import json

import pytest
import torch

import opd.teacher.remote as remote
from opd.config import load_config
from opd.learner.checkpoint import latest_checkpoint
from opd.loop import train
from opd.teacher.errors import TeacherUnavailableError

pytestmark = pytest.mark.vllm

RUN = [
    "method=distill", "student.tiny.hidden_size=32", "student.tiny.seed=1",
    "train.prompts_per_step=4", "sampling.samples_per_prompt=2", "sampling.max_new_tokens=12",
    "train.micro_batch_size=8", "optim.lr=3e-3", "optim.warmup_steps=1", "data.eval_holdout=4",
    "eval.every=0", "log.progress=false", "log.tensorboard=false", "checkpoint.every=0",
]


def served(server, *extra):
    return [f"teacher.url={server.url}", f"teacher.served_model={server.model_name}", *extra]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def student_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(latest_checkpoint(run_dir) / "model" / "model.safetensors"))


def test_a_distill_run_with_the_served_teacher_matches_the_in_process_one(vllm_server, tmp_path):
    local = train(load_config(None, [*RUN, "train.steps=4", f"teacher.path={vllm_server.model_dir}",
                                     f"run_dir={tmp_path / 'local'}"]))
    served_run = train(load_config(None, [*RUN, "train.steps=4", *served(vllm_server),
                                          f"run_dir={tmp_path / 'served'}"]))
    a, b = rows(tmp_path / "local"), rows(tmp_path / "served")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for x, y in zip(a[1:], b[1:]):  # same samples (the student samples in process), same teacher numbers
        assert y["tokens"] == x["tokens"]
        assert y["teacher_kl"] == pytest.approx(x["teacher_kl"], abs=1e-4)
        assert y["teacher_requests"] > 0 and y["teacher_retries"] == 0
    assert served_run["last_eval"]["eval/teacher_kl"] == pytest.approx(local["last_eval"]["eval/teacher_kl"], abs=1e-3)
    for name, w in student_weights(tmp_path / "local").items():
        torch.testing.assert_close(student_weights(tmp_path / "served")[name], w, atol=1e-4, rtol=1e-4)


def test_a_server_killed_mid_run_then_resume_loses_and_repeats_nothing(vllm_server, tmp_path, monkeypatch):
    cfg = load_config(None, [*RUN, "train.steps=5", *served(vllm_server, "teacher.retry_for_s=3",
                                                            "teacher.timeout_s=20"),
                             f"run_dir={tmp_path / 'killed'}"])
    original, calls = remote.RemoteTeacher.score, []

    def score_then_kill(self, rollouts, keep_hidden=False):
        calls.append(1)
        if len(calls) == 4:  # steps 1 and 2 are scored (plus the step-0 eval); then the server dies (kill -9)
            vllm_server.kill()
        return original(self, rollouts, keep_hidden)

    monkeypatch.setattr(remote.RemoteTeacher, "score", score_then_kill)
    try:
        with pytest.raises(TeacherUnavailableError, match="step 3 could not be scored.*--resume"):
            train(cfg)
    finally:
        monkeypatch.undo()
        vllm_server.start()  # back on the same port
    assert latest_checkpoint(tmp_path / "killed").name == "step_000002"

    summary = train(cfg, resume=True)
    assert summary["steps_done"] == 5
    steps = [r["step"] for r in rows(tmp_path / "killed")]
    assert steps == [0, 1, 2, 3, 4, 5]  # every step once

    # and the continuation is the uninterrupted run's
    train(load_config(None, [*RUN, "train.steps=5", *served(vllm_server), f"run_dir={tmp_path / 'whole'}"]))
    for a, b in zip(rows(tmp_path / "killed")[1:], rows(tmp_path / "whole")[1:]):
        assert a["tokens"] == b["tokens"] and a["teacher_kl"] == pytest.approx(b["teacher_kl"], abs=1e-5)
    for name, w in student_weights(tmp_path / "whole").items():
        torch.testing.assert_close(student_weights(tmp_path / "killed")[name], w, atol=1e-6, rtol=1e-6)


def test_an_unreachable_teacher_is_one_line_naming_the_url(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    cfg = load_config(None, [*RUN, "train.steps=1", f"teacher.url={url}", "teacher.retry_for_s=0",
                             f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(TeacherUnavailableError, match=url.replace(".", r"\.")):
        train(cfg)


def test_the_top_k_loss_trains_on_the_served_teachers_top_k(vllm_server, tmp_path):
    run_dir = tmp_path / "topk"
    train(load_config(None, [*RUN, "train.steps=8", "optim.lr=1e-2", *served(vllm_server, "teacher.top_k=20"),
                             "loss.kind=topk_forward_kl", f"run_dir={run_dir}"]))
    losses = [r["topk_forward_kl"] for r in rows(run_dir)[1:]]
    assert all(x >= 0 for x in losses) and len(losses) == 8
    # the forward KL over the teacher's top 20 (+ tail) is what the step minimises: it falls
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:2]) / 2, losses
