"""RemoteTeacher against a small real HTTP server on loopback that answers in vLLM's and SGLang's
shapes with log-probs computed by a real tiny model (so the values are real), plus injected faults.
The real engine is tested in tests/vllm/."""

import json
import math
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import torch.nn.functional as F

from helpers import chat_ids, sampler, tiny
from opd.config import ModelConfig
from opd.flops import ModelCost
from opd.rollouts import sequence_batch
from opd.teacher.hf import HFTeacher
from opd.teacher.remote import (RemoteTeacher, TeacherRequestError, TeacherResponseError, TeacherUnavailableError,
                                TokenizerUnverifiableError)
from opd.tiny import build_tiny_tokenizer
from opd.tokenizer_check import TokenizerMismatchError, probe_differences

MAX_LOGPROBS = 20  # like vLLM's --max-logprobs default


class FakeEngine:
    """What a teacher server computes, plus switches for faults."""

    def __init__(self, model, tokenizer, name="tiny-teacher"):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.lock = threading.Lock()
        self.hits = Counter()  # path -> requests
        self.fail_next = 0  # answer this many requests with 503 first
        self.always_fail = False
        self.delay_next = 0.0  # sleep this long before answering the next scoring request
        self.corrupt = None  # missing_token | one_short | nan
        self.swap = None  # (a, b): this server's tokenizer has ids a and b swapped
        self.has_tokenize = True

    @torch.no_grad()
    def logprobs(self, ids):
        with self.lock:
            return F.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), -1)

    def swapped(self, ids):
        if self.swap is None:
            return list(ids)
        a, b = self.swap
        return [b if i == a else a if i == b else i for i in ids]

    def vllm_choice(self, index, ids, k, corrupt):
        lp = self.logprobs(ids)
        entries = [None]
        for j in range(1, len(ids)):
            dist, given = lp[j - 1], ids[j]
            entry = {}
            if k:
                values, top = dist.topk(k)
                for rank, (v, i) in enumerate(zip(values.tolist(), top.tolist()), 1):
                    entry[str(i)] = {"logprob": v, "rank": rank, "decoded_token": self.tokenizer.decode([i])}
            if str(given) not in entry:
                entry[str(given)] = {"logprob": dist[given].item(), "rank": int((dist > dist[given]).sum()) + 1,
                                     "decoded_token": self.tokenizer.decode([given])}
            entries.append(entry)
        if corrupt == "missing_token":
            entries[-1].pop(str(ids[-1]))
        elif corrupt == "one_short":
            entries.pop()
        elif corrupt == "nan":
            entries[-1][str(ids[-1])]["logprob"] = math.nan
        return {"index": index, "text": "x", "logprobs": None, "finish_reason": "length", "prompt_logprobs": entries}

    def sglang_answer(self, ids, k, corrupt):
        lp = self.logprobs(ids)
        tokens = [[None, ids[0], None]] + [[lp[j - 1, ids[j]].item(), ids[j], None] for j in range(1, len(ids))]
        top = [None]
        for j in range(1, len(ids)):
            values, best = lp[j - 1].topk(k) if k else (torch.zeros(0), torch.zeros(0, dtype=torch.long))
            top.append([[v, i, None] for v, i in zip(values.tolist(), best.tolist())])
        if corrupt == "missing_token":
            tokens[-1][1] = (ids[-1] + 1) % len(self.tokenizer)
        elif corrupt == "one_short":
            tokens.pop()
        elif corrupt == "nan":
            tokens[-1][0] = math.nan
        meta = {"id": "req", "prompt_tokens": len(ids), "completion_tokens": 0, "input_token_logprobs": tokens,
                "output_token_logprobs": [], "finish_reason": {"type": "length", "length": 0}}
        if k:
            meta["input_top_logprobs"] = top
        return {"text": "", "meta_info": meta}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall per request

    def log_message(self, *args):
        pass

    def reply(self, status, body=None):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        engine = self.server.engine
        engine.hits[self.path] += 1
        if self.path == "/health":
            return self.reply(200)
        if self.path == "/v1/models":
            return self.reply(200, {"object": "list", "data": [{"id": engine.name, "object": "model"}]})
        self.reply(404, {"detail": "Not Found"})

    def do_POST(self):
        engine = self.server.engine
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        engine.hits[self.path] += 1
        if self.path in ("/v1/completions", "/generate"):
            if engine.always_fail or engine.fail_next > 0:
                engine.fail_next -= 1
                return self.reply(503, {"error": "overloaded"})
            if engine.delay_next:
                delay, engine.delay_next = engine.delay_next, 0.0
                time.sleep(delay)
        if self.path == "/v1/completions":
            assert body["max_tokens"] == 1 and body["temperature"] == 1.0 and body["model"] == engine.name
            k = body["prompt_logprobs"]
            if k > MAX_LOGPROBS:
                return self.reply(400, {"error": {"message": f"Requested prompt logprobs of {k}, which is greater "
                                                             f"than max allowed: {MAX_LOGPROBS}"}})
            prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
            choices = [engine.vllm_choice(i, ids, k, engine.corrupt if i == 0 else None)
                       for i, ids in enumerate(prompts)]
            return self.reply(200, {"id": "cmpl", "object": "text_completion", "model": engine.name,
                                    "choices": choices[::-1]})  # any order: `index` says which is which
        if self.path == "/generate":
            assert body["sampling_params"] == {"max_new_tokens": 0, "temperature": 1.0}
            assert body["return_logprob"] is True and body["logprob_start_len"] == 0
            k = body.get("top_logprobs_num", 0)
            batch = isinstance(body["input_ids"][0], list)
            prompts = body["input_ids"] if batch else [body["input_ids"]]
            answers = [engine.sglang_answer(ids, k, engine.corrupt if i == 0 else None)
                       for i, ids in enumerate(prompts)]
            return self.reply(200, answers if batch else answers[0])
        if self.path == "/tokenize" and engine.has_tokenize:
            ids = engine.tokenizer.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
            return self.reply(200, {"tokens": engine.swapped(ids), "count": len(ids), "max_model_len": 512})
        if self.path == "/detokenize" and engine.has_tokenize:
            if max(body["tokens"]) >= len(engine.tokenizer):
                return self.reply(400, {"error": {"message": "token id out of vocabulary"}})
            return self.reply(200, {"prompt": engine.tokenizer.decode(engine.swapped(body["tokens"]))})
        self.reply(404, {"detail": "Not Found"})


@pytest.fixture(scope="module")
def models():
    teacher, tokenizer = tiny(hidden=32, seed=5)
    student, _ = tiny(hidden=32, seed=6)
    return teacher, student, tokenizer


@pytest.fixture(scope="module")
def rollouts(models):
    """Left-padded sampled rows, one of them ending early (padding after its EOS is attended)."""
    teacher, student, tokenizer = models
    torch.manual_seed(0)
    batch = sampler(student, tokenizer, max_new_tokens=8).sample(
        chat_ids(tokenizer, ["Hi", "Write one sentence about the river.", "What is 2+2?"]), samples_per_prompt=2)
    batch.completion_mask[0, -3:] = 0
    assert (batch.attention_mask == 0).any()  # there is left padding to strip
    return batch


@pytest.fixture
def servers(models):
    started = []

    def start():
        engine = FakeEngine(models[0], models[2])
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.engine = engine
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        started.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}", engine

    yield start
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def teachers():
    made = []

    def make(url, **kw):
        kw.setdefault("timeout_s", 10)
        kw.setdefault("retry_for_s", 5)
        teacher = RemoteTeacher(ModelConfig(url=url, **kw))
        teacher.backoff_start_s = 0.02
        made.append(teacher)
        return teacher

    yield make
    for teacher in made:
        teacher.close()


def local_topk(model, rollouts, k):
    """torch.topk of the in-process log-softmax, at every completion position."""
    with torch.no_grad():
        from opd.models import LogitsHead

        head = LogitsHead(model)
        hidden = head.hidden(rollouts.tokens, rollouts.attention_mask)
        logprobs = F.log_softmax(head.logits(hidden), -1)
    values, ids = logprobs[:, :-1].topk(k, -1)  # state t-1 predicts token t
    mask = rollouts.completion_mask[:, 1:, None] > 0
    return ids.where(mask, 0), values.where(mask, 0.0)


@pytest.mark.parametrize("backend,rows_per_request", [("vllm", 1), ("vllm", 4), ("sglang", 1), ("sglang", 4)])
def test_scores_equal_the_in_process_teacher(models, rollouts, servers, teachers, backend, rows_per_request):
    model, _, tokenizer = models
    url, engine = servers()
    remote = teachers(url, backend=backend, top_k=5, rows_per_request=rows_per_request)
    assert remote.full_distribution is False and remote.top_k == 5
    scores = remote.score(rollouts)
    expected = HFTeacher(model, tokenizer).score(rollouts).logprobs
    torch.testing.assert_close(scores.logprobs, expected, atol=1e-5, rtol=0)
    assert (scores.logprobs[rollouts.completion_mask == 0] == 0).all()

    ids, values = local_topk(model, rollouts, 5)
    assert torch.equal(scores.topk_ids[:, 1:], ids) and (scores.topk_ids[:, 0] == 0).all()
    torch.testing.assert_close(scores.topk_logprobs[:, 1:], values, atol=1e-5, rtol=0)
    requests = engine.hits["/v1/completions" if backend == "vllm" else "/generate"]
    assert requests == math.ceil(rollouts.batch_size / rows_per_request)
    metrics = remote.take_metrics()
    assert metrics["teacher_requests"] == requests and metrics["teacher_retries"] == 0
    assert metrics["teacher_tokens_scored"] == int(rollouts.completion_mask.sum())
    assert metrics["teacher_wait_s"] > 0 and metrics["teacher_tokens_scored_per_s"] > 0
    assert remote.take_metrics() == {}


def test_right_padded_sequences_and_no_topk(models, servers, teachers):
    model, _, tokenizer = models
    batch = sequence_batch([[1, 5, 6, 7, 8], [1, 9, 10]], [2, 1], tokenizer.pad_token_id)
    url, _ = servers()
    scores = teachers(url).score(batch)
    assert scores.topk_ids is None and scores.topk_logprobs is None
    torch.testing.assert_close(scores.logprobs, HFTeacher(model, tokenizer).score(batch).logprobs, atol=1e-5, rtol=0)


def test_requests_are_spread_over_the_urls(models, rollouts, servers, teachers):
    (url_a, a), (url_b, b) = servers(), servers()
    remote = teachers([url_a, url_b], requests_in_flight=2)
    scores = remote.score(rollouts)
    assert a.hits["/v1/completions"] == b.hits["/v1/completions"] == rollouts.batch_size // 2
    torch.testing.assert_close(scores.logprobs, HFTeacher(models[0], models[2]).score(rollouts).logprobs,
                               atol=1e-5, rtol=0)


def test_server_errors_are_retried(rollouts, servers, teachers):
    url, engine = servers()
    remote = teachers(url, requests_in_flight=1)
    engine.fail_next = 2
    remote.score(rollouts.rows(slice(0, 1)))
    metrics = remote.take_metrics()
    assert metrics["teacher_retries"] == 2 and metrics["teacher_requests"] == 1


def test_a_timeout_is_retried(rollouts, servers, teachers):
    url, engine = servers()
    remote = teachers(url, timeout_s=0.3)
    engine.delay_next = 1.0
    remote.score(rollouts.rows(slice(0, 1)))
    assert remote.take_metrics()["teacher_retries"] == 1


def test_a_server_that_keeps_failing_is_given_up_after_retry_for_s(rollouts, servers, teachers):
    url, engine = servers()
    remote = teachers(url, retry_for_s=1.0)
    engine.always_fail = True
    with pytest.raises(TeacherUnavailableError) as err:
        remote.score(rollouts)
    message = str(err.value)
    assert url in message and "HTTP 503" in message
    # retried until retry_for_s had passed (as the message reports it: no wall clock in the test) ...
    retried_s = float(re.search(r"retried for ([0-9.]+) s", message).group(1))
    assert retried_s >= 1.0
    # ... with exponential backoff, not in a tight loop: from the fixture's 0.02 s first delay (x0.5-1
    # jitter), doubling, 1 s holds 6 to 9 attempts (fewer when each request is slow); a loop without
    # backoff would make hundreds
    attempts = int(re.search(r"\((\d+) attempts", message).group(1))
    assert 3 <= attempts <= 10


def test_a_refused_request_is_not_retried(rollouts, servers, teachers):
    url, engine = servers()
    remote = teachers(url, top_k=MAX_LOGPROBS + 1)
    with pytest.raises(TeacherRequestError, match="HTTP 400.*greater than max allowed"):
        remote.score(rollouts)
    assert engine.hits["/v1/completions"] <= rollouts.batch_size  # each sent once at most


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
@pytest.mark.parametrize("corrupt,what", [("missing_token", "token that was sent"),
                                          ("one_short", "entries for the"), ("nan", "not finite")])
def test_invalid_responses_name_server_row_and_position(rollouts, servers, teachers, backend, corrupt, what):
    url, engine = servers()
    remote = teachers(url, backend=backend)
    engine.corrupt = corrupt
    with pytest.raises(TeacherResponseError) as err:
        remote.score(rollouts.rows(slice(1, 2)))
    message = str(err.value)
    last = int(rollouts.completion_mask[1].nonzero().max())  # each fault is at the last token sent
    assert url in message and "row 0" in message and f"position {last}" in message and what in message
    assert engine.hits["/v1/completions" if backend == "vllm" else "/generate"] == 1  # not retried


def test_an_unreachable_server_is_one_line_naming_it():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(TeacherUnavailableError) as err:
        RemoteTeacher(ModelConfig(url=url))
    message = str(err.value)
    assert message.startswith(f"cannot reach the teacher server at {url}: ") and "\n" not in message


def test_served_model_name_is_asked_once(servers, teachers, rollouts):
    url, engine = servers()
    remote = teachers(url)
    remote.score(rollouts)
    remote.score(rollouts)
    assert engine.hits["/v1/models"] == 1
    url, engine = servers()
    named = teachers(url, served_model="tiny-teacher")
    named.score(rollouts)
    assert engine.hits["/v1/models"] == 0


def test_keep_hidden_is_refused(servers, teachers, rollouts):
    url, _ = servers()
    with pytest.raises(ValueError, match="no hidden states"):
        teachers(url).score(rollouts, keep_hidden=True)


# --- tokenizer identity ---


def test_tokenizer_probe_through_the_server(models, servers, teachers):
    tokenizer = models[2]
    url, engine = servers()
    remote = teachers(url)
    remote.check_tokenizer(tokenizer)
    assert engine.hits["/tokenize"] > 10 and engine.hits["/detokenize"] >= len(tokenizer) // 32
    assert remote.max_model_len == 512

    the, is_ = tokenizer.convert_tokens_to_ids(["Ġthe", "Ġis"])
    engine.swap = (the, is_)
    with pytest.raises(TokenizerMismatchError) as err:
        remote.check_tokenizer(tokenizer)
    message = str(err.value)
    assert f"the teacher server at {url}" in message and "tokenized differently" in message
    assert str(the) in message and str(is_) in message and "decode differently" in message


def test_a_server_without_tokenize_is_refused_unless_a_local_tokenizer_is_given(models, servers, teachers, tmp_path):
    teacher_model, _, tokenizer = models
    url, engine = servers()
    engine.has_tokenize = False
    with pytest.raises(TokenizerUnverifiableError, match="teacher.tokenizer"):
        teachers(url, backend="sglang").check_tokenizer(tokenizer)

    tokenizer.save_pretrained(tmp_path)
    teacher_model.config.save_pretrained(tmp_path)
    local = teachers(url, backend="sglang", tokenizer=str(tmp_path))
    local.check_tokenizer(tokenizer)
    assert local.output_size == teacher_model.config.vocab_size
    assert local.cost == ModelCost.from_model(teacher_model.requires_grad_(False))
    other = build_tiny_tokenizer(vocab_size=700)
    with pytest.raises(TokenizerMismatchError, match="vocabulary size"):
        local.check_tokenizer(other)


def test_probe_differences_without_http():
    student = build_tiny_tokenizer()
    the = student.convert_tokens_to_ids("Ġthe")

    def encode(text):
        return [the + 1 if i == the else i for i in student.encode(text, add_special_tokens=False)]

    assert probe_differences(student, lambda t: student.encode(t, add_special_tokens=False), student.decode) == []
    problems = probe_differences(student, encode, student.decode)
    assert len(problems) == 1 and "tokenized differently" in problems[0] and str(the) in problems[0]

    def decode(ids):
        if 100 in ids:
            raise ValueError("unknown id 100")
        return student.decode(ids)

    problems = probe_differences(student, lambda t: student.encode(t, add_special_tokens=False), decode)
    assert len(problems) == 1 and "could not be decoded by the teacher: unknown id 100" in problems[0]


# --- a served teacher of another tokenizer (teacher.tokenizer_mode=cross) ---


@pytest.fixture(scope="module")
def cross_rollouts():
    """Completions sampled in another tokenizer (a 400-token BPE) than the served teacher's (768)."""
    from opd.data import Prompt
    from opd.rollouts import sampled_batch

    student = build_tiny_tokenizer(vocab_size=400)
    messages = [[{"role": "user", "content": q}] for q in ("Hi", "Write about the sea.")]
    prompt_ids = [student.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"] for m in messages]
    prompts = [Prompt(ids=list(p), text=student.decode(p), record={"messages": m}) for p, m in zip(prompt_ids, messages)]
    texts = ["The sea is quiet. café 🙂", "It sings by the sea.", "naïve", "A small robot"]
    completions = [student.encode(x, add_special_tokens=False) + [student.eos_token_id] for x in texts]
    behaviour = [[-1.0] * len(c) for c in completions]
    return student, sampled_batch([list(p) for p in prompt_ids], completions, behaviour, [True] * 4, 2,
                                  student.pad_token_id, prompts=prompts)


def test_a_served_cross_teacher_scores_as_in_process_and_validates_its_ids(models, servers, teachers, cross_rollouts):
    from opd.teacher.cross import CrossTokenizerTeacher

    model, _, teacher_tokenizer = models
    student, batch = cross_rollouts
    url, engine = servers()
    remote = teachers(url)
    remote.check_tokenizer(teacher_tokenizer, probe_server=True)  # the server tokenizes as the local copy
    served = CrossTokenizerTeacher(remote, teacher_tokenizer, student)
    local = CrossTokenizerTeacher(HFTeacher(model, teacher_tokenizer), teacher_tokenizer, student)
    a, b = served.score(batch), local.score(batch)
    torch.testing.assert_close(a.chunks.teacher_logprobs, b.chunks.teacher_logprobs, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.chunks.index, b.chunks.index) and (a.chunks.signal.sum(-1) > 0).all()
    metrics = served.take_metrics()
    assert metrics["aligned_1to1"] < 1 and metrics["dropped_rows"] == 0

    engine.corrupt = "missing_token"  # the teacher-side ids are checked as for any served teacher
    with pytest.raises(TeacherResponseError, match="token that was sent"):
        served.score(batch)
    engine.corrupt = None
    the, is_ = teacher_tokenizer.convert_tokens_to_ids(["Ġthe", "Ġis"])
    engine.swap = (the, is_)
    with pytest.raises(TokenizerMismatchError, match="tokenized differently"):
        remote.check_tokenizer(teacher_tokenizer, probe_server=True)
