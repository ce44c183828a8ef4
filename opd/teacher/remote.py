"""The teacher as a served model: a vLLM (OpenAI-compatible) or SGLang server addressed by URL.

One prefill per sequence scores every token the student sampled; only the real tokens of a row are
sent (left padding and the padding after the last completion token are stripped), and the answer is
put back at the row's columns, so `TeacherScores` is aligned with `rollouts.tokens` exactly as the
in-process teacher's. Requests run concurrently (`requests_in_flight` in all, spread round-robin
over the URLs, `rows_per_request` sequences each), are retried with exponential backoff on
connection errors, timeouts, HTTP 5xx and 429 for `retry_for_s`, and every answer is validated:
one entry per position sent, holding the id that was sent, with a finite log-prob <= 0.

vLLM (`backend: vllm`): POST /v1/completions with the token ids as `prompt`, `max_tokens: 1`,
`prompt_logprobs: k`, `temperature: 1`. `choices[i].prompt_logprobs` is `null` for the first token,
then per position a dict keyed by token id (a string) of `{logprob, rank, decoded_token}` that
holds the k most likely tokens and always the given one (so k = 0 still returns the given token).
A list of id lists as `prompt` gives one choice per sequence, in `index` order. Prompt log-probs
are computed at temperature 1 whatever the request says; the server's `--max-logprobs` (default
20) bounds k.

SGLang (`backend: sglang`): POST /generate with `input_ids`, `sampling_params: {max_new_tokens: 0,
temperature: 1}`, `return_logprob: true`, `logprob_start_len: 0` and `top_logprobs_num: k`.
`meta_info.input_token_logprobs` is `[[logprob, token_id, text_or_null], ...]`, one per input
token, the first logprob `null` (the first token has no predecessor); `meta_info.input_top_logprobs`
is per position a list of `[logprob, token_id, text]` (or `null`). A list of id lists as `input_ids`
answers a list of such objects in order. (Shapes from SGLang's `GenerateReqInput` docs
(docs/references/sampling_params.md) and `TokenizerManager.detokenize_logprob_tokens` /
`detokenize_top_logprobs_tokens` in python/sglang/srt/managers/tokenizer_manager.py, which build
`(logprob, token_id, text_or_None)` per position; slime's teacher scoring reads it the same way.)

Top-k: with `top_k: k > 0` the teacher's k most likely tokens per completion position are kept
(`TeacherScores.topk_ids` / `topk_logprobs`, B x T x k). A position where the server returned
fewer than k tokens is padded with log-prob -inf and id 0; the top-k loss ignores such entries.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from opd import http_client
from opd.config import ConfigError, ModelConfig
from opd.flops import ModelCost
from opd.roles import TeacherScores
from opd.rollouts import Rollouts
from opd.teacher.errors import TeacherResponseError, TeacherUnavailableError
from opd.tokenizer_check import TokenizerMismatchError, check_tokenizer_probe, check_tokenizers_match

log = logging.getLogger(__name__)

# A log-prob may exceed 0 by float rounding in the server (log_softmax in bf16 / fp16).
LOGPROB_TOLERANCE = 1e-3


class TeacherRequestError(TeacherResponseError):
    """The server refused a request (HTTP 4xx other than 429): a misconfiguration (model name, k
    above the server's --max-logprobs, sequences longer than its --max-model-len), never retried."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class TokenizerUnverifiableError(TokenizerMismatchError):
    """The server cannot tokenize (no /tokenize endpoint) and no local copy of the teacher's
    tokenizer was given, so the tokenizers cannot be compared. Refused rather than warned about:
    a silent mismatch trains the student on scores of different text."""


class _Cancelled(Exception):
    """Another request of the same batch failed; this one stops retrying."""


@dataclass
class _Sequence:
    row: int  # index in the batch
    start: int  # column of the first token sent
    ids: list[int]  # the tokens sent: the row's real tokens up to its last completion token
    columns: list[int]  # columns of its completion tokens (each > start)


@dataclass
class _Scored:
    logprobs: list[float]  # one per completion column
    topk: list[list[tuple[int, float]]] | None  # per completion column, at most k (id, log-prob), best first


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


class RemoteTeacher:
    """A `Teacher` (opd.roles) backed by one or several vLLM / SGLang servers (`spec.url`).

    The servers are checked at construction (`check_reachable`); call `check_tokenizer(student
    tokenizer)` before training and `close()` at the end (or use it as a context manager).
    """

    full_distribution = False
    backoff_start_s = 0.5  # first retry delay; doubles each retry, with jitter, up to backoff_cap_s
    backoff_cap_s = 10.0
    health_timeout_s = 10.0

    def __init__(self, spec: ModelConfig, micro_batch_size: int | None = None, check: bool = True):
        """`micro_batch_size` is accepted for symmetry with the in-process teacher and unused: a
        request holds `spec.rows_per_request` sequences. `check`: contact the servers now."""
        if not spec.urls:
            raise ValueError("RemoteTeacher needs `url` (one or several teacher server URLs)")
        self.spec = spec
        self.urls = [url.rstrip("/") for url in spec.urls]
        self.backend = spec.backend
        self.top_k = spec.top_k
        self.output_size, self.cost = _local_model_facts(spec.tokenizer)
        try:
            headers = http_client.api_key_header(spec.api_key_env, "teacher")
            verify = http_client.tls_verification(spec.tls_verify, spec.ca_bundle, "teacher")
        except (http_client.MissingApiKey, FileNotFoundError) as err:
            raise ConfigError(str(err)) from None
        self._clients = {url: http_client.make_client(url, spec.timeout_s, spec.requests_in_flight, headers, verify,
                                                      connect_s=self.health_timeout_s) for url in self.urls}
        self._closing = threading.Event()  # set by close(): requests in flight stop at once
        self._pool = ThreadPoolExecutor(spec.requests_in_flight, thread_name_prefix="opd-teacher")
        self._models: dict[str, str | None] = {url: spec.served_model for url in self.urls}
        self._next_url = itertools.count()
        self._lock = threading.Lock()
        self._reset_metrics()
        self.max_model_len: int | None = None  # from vLLM's /tokenize, once check_tokenizer has probed it
        if check:
            try:
                self.check_reachable()
            except BaseException:
                self.close()
                raise

    @classmethod
    def from_config(cls, spec: ModelConfig, micro_batch_size: int | None = None, check: bool = True) -> "RemoteTeacher":
        return cls(spec, micro_batch_size, check)

    # --- lifecycle ---

    def close(self) -> None:
        self._closing.set()  # a request in flight (a server that hangs) stops within a fraction of a second
        self._pool.shutdown(wait=True, cancel_futures=True)
        for client in self._clients.values():
            client.close()

    def verify(self, vocab_size: int) -> None:
        """Nothing to check locally: every answer is validated as it arrives."""

    def as_sampler(self, sampling) -> None:
        return None  # a served scorer: its own accuracy is not measured here

    def __enter__(self) -> "RemoteTeacher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_reachable(self) -> None:
        """One quick request per server (no retries): GET /health (a 404 falls back to /v1/models,
        which also gives vLLM's model name when `served_model` is not set). Raises
        TeacherUnavailableError, one line naming the URL, when a server does not answer or is not
        healthy."""
        for url in self.urls:
            paths = ["/health", "/v1/models"] if self.backend == "vllm" else ["/health", "/get_model_info"]
            for path in paths:
                try:
                    response = http_client.request(self._clients[url], "GET", path, timeout_s=self.health_timeout_s,
                                                   max_bytes=1 << 20, cancel=(self._closing,))
                except (httpx.HTTPError, http_client.ResponseTooLarge) as err:
                    raise TeacherUnavailableError(
                        f"cannot reach the teacher server at {url}: {_one_line(_describe(err))}") from None
                if response.status_code == 404 and path != paths[-1]:
                    continue
                if response.status_code >= 400:
                    hint = _key_hint(response.status_code, self.spec.api_key_env)
                    raise TeacherUnavailableError(
                        f"the teacher server at {url} is not ready: GET {path} answered HTTP {response.status_code} "
                        f"{_one_line(response.text, 200)}{hint}")
                break
            self._model(url)
        names = {self._models[url] for url in self.urls}
        if len(names) > 1:
            log.warning("the teacher servers serve differently named models %s: they should be one model", names)

    def _served_model(self, url: str) -> str:
        """The first model that vLLM's /v1/models lists."""
        body = self._request(url, "GET", "/v1/models", None, what="GET /v1/models")
        try:
            return body["data"][0]["id"]
        except (KeyError, IndexError, TypeError):
            raise TeacherResponseError(f"the teacher server at {url} lists no model at /v1/models: "
                                       f"{_one_line(body, 200)}; set teacher.served_model") from None

    # --- tokenizer identity ---

    def check_tokenizer(self, tokenizer, probe_server: bool = False) -> None:
        """Refuse (TokenizerMismatchError) a student tokenizer that differs from the teacher's.

        With `spec.tokenizer` (a local copy of the teacher's tokenizer) the two are compared token
        by token (`check_tokenizers_match`). Otherwise the first server is probed: its /tokenize on
        probe texts (plain, digits, whitespace, unicode, every special token, the chat template)
        and its /detokenize on id ranges over the whole vocabulary are compared with the student's
        tokenizer. A server without /tokenize (older SGLang) raises TokenizerUnverifiableError:
        give `teacher.tokenizer`. `probe_server`: probe the server even when `spec.tokenizer` is given
        (a teacher of another tokenizer: the server must tokenize as that local copy does).
        """
        if self.spec.tokenizer is not None and not probe_server:
            from transformers import AutoTokenizer

            teacher = AutoTokenizer.from_pretrained(self.spec.tokenizer, local_files_only=True)
            check_tokenizers_match(tokenizer, teacher)
            return
        url = self.urls[0]
        model = self._model(url)

        def encode(text: str) -> list[int]:
            body = self._probe(url, "/tokenize", {"model": model, "prompt": text, "add_special_tokens": False})
            tokens = body.get("tokens") if isinstance(body, dict) else None
            if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                raise TeacherResponseError(f"the teacher server at {url} answered POST /tokenize with "
                                           f"{_one_line(body, 120)}, not {{\"tokens\": [int, ...]}}")
            if self.max_model_len is None and isinstance(body.get("max_model_len"), int):
                self.max_model_len = body["max_model_len"]
            return tokens

        def decode(ids: list[int]) -> str:
            body = self._probe(url, "/detokenize", {"model": model, "tokens": ids})
            text = (body.get("prompt", body.get("text")) if isinstance(body, dict) else None)
            if not isinstance(text, str):
                raise TeacherResponseError(f"the teacher server at {url} answered POST /detokenize with "
                                           f"{_one_line(body, 120)}, not {{\"prompt\": text}}")
            return text

        try:
            encode("Hello")
        except TeacherRequestError as err:
            if err.status in (404, 405):
                raise TokenizerUnverifiableError(
                    f"the teacher server at {url} ({self.backend}) has no /tokenize endpoint, so its tokenizer "
                    f"cannot be compared with the student's; set teacher.tokenizer to a local directory with the "
                    f"teacher's tokenizer") from None
            raise
        check_tokenizer_probe(tokenizer, encode, decode, teacher=f"the teacher server at {url}")

    def _probe(self, url: str, path: str, payload: dict) -> dict:
        """One tokenizer request; a refusal (e.g. ids the server's vocabulary does not have) is a
        ValueError, which the probe reports as a difference."""
        try:
            return self._request(url, "POST", path, payload, what=f"POST {path}")
        except TeacherRequestError as err:
            if err.status in (404, 405):
                raise
            raise ValueError(str(err)) from None

    # --- scoring ---

    def score(self, rollouts: Rollouts, keep_hidden: bool = False) -> TeacherScores:
        if keep_hidden:
            raise ValueError("a served teacher returns no hidden states: exact (full-vocabulary) losses need the "
                             "teacher in process (teacher.path / teacher.tiny)")
        started = time.perf_counter()
        try:
            sequences = _sequences(rollouts)
            per_request = self.spec.rows_per_request
            chunks = [sequences[i:i + per_request] for i in range(0, len(sequences), per_request)]
            results = self._run_chunks(chunks)
        finally:
            with self._lock:
                self._wait_s += time.perf_counter() - started
        batch, width = rollouts.tokens.shape
        logprobs = torch.zeros(batch, width)
        k = self.top_k
        topk_ids = torch.zeros(batch, width, k, dtype=torch.long) if k else None
        topk_logprobs = torch.zeros(batch, width, k) if k else None
        for chunk, scored_chunk in zip(chunks, results):
            for sequence, scored in zip(chunk, scored_chunk):
                columns = torch.tensor(sequence.columns, dtype=torch.long)
                logprobs[sequence.row, columns] = torch.tensor(scored.logprobs, dtype=torch.float32)
                if k:  # positions with fewer than k entries are padded with id 0, log-prob -inf
                    pad = [(0, float("-inf"))] * k
                    rows = [entries + pad[len(entries):] for entries in scored.topk]
                    topk_ids[sequence.row, columns] = torch.tensor([[i for i, _ in r] for r in rows], dtype=torch.long)
                    topk_logprobs[sequence.row, columns] = torch.tensor([[v for _, v in r] for r in rows])
        device = rollouts.tokens.device
        scores = TeacherScores(
            logprobs=logprobs.to(device=device, dtype=rollouts.completion_mask.dtype),
            topk_ids=topk_ids.to(device) if k else None,
            topk_logprobs=topk_logprobs.to(device) if k else None)
        with self._lock:
            self._tokens += sum(len(s.columns) for s in sequences)
            self._scored = True
        return scores

    def _run_chunks(self, chunks: list[list[_Sequence]]) -> list[list[_Scored]]:
        """Score the chunks concurrently, each on the next URL in turn; the first failure cancels
        the rest (requests not started are dropped, retrying ones stop) and is raised."""
        cancel = threading.Event()
        futures = [self._pool.submit(self._score_chunk, self.urls[next(self._next_url) % len(self.urls)], chunk,
                                     cancel) for chunk in chunks]
        try:
            wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # KeyboardInterrupt: stop the retrying workers, drop the queued ones
            cancel.set()
            for future in futures:
                future.cancel()
            raise
        if any(f.done() and not f.cancelled() and f.exception() is not None for f in futures):
            cancel.set()
            for future in futures:
                future.cancel()
            wait(futures)
            errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
            raise next((e for e in errors if not isinstance(e, _Cancelled)), errors[0])
        return [f.result() for f in futures]

    def _model(self, url: str) -> str | None:
        if self.backend == "vllm" and self._models[url] is None:
            self._models[url] = self._served_model(url)
        return self._models[url]

    def _score_chunk(self, url: str, chunk: list[_Sequence], cancel: threading.Event) -> list[_Scored]:
        if cancel.is_set():
            raise _Cancelled()
        if self.backend == "vllm":
            prompt = chunk[0].ids if len(chunk) == 1 else [s.ids for s in chunk]
            payload = {"model": self._model(url), "prompt": prompt, "max_tokens": 1, "temperature": 1.0,
                       "prompt_logprobs": self.top_k}
            body = self._request(url, "POST", "/v1/completions", payload, what="POST /v1/completions",
                                 cancel=cancel, count=True)
            choices = body.get("choices") if isinstance(body, dict) else None
            if not isinstance(choices, list) or len(choices) != len(chunk):
                raise TeacherResponseError(
                    f"the teacher server at {url} returned {len(choices) if isinstance(choices, list) else 'no'} "
                    f"choices for {len(chunk)} sequences (rows {[s.row for s in chunk]})")
            choices = sorted(choices, key=lambda c: c.get("index", 0)) if len(choices) > 1 else choices
            return [parse_vllm(choice.get("prompt_logprobs"), s, self.top_k, url) for choice, s in zip(choices, chunk)]

        input_ids = chunk[0].ids if len(chunk) == 1 else [s.ids for s in chunk]
        payload = {"input_ids": input_ids, "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
                   "return_logprob": True, "logprob_start_len": 0}
        if self.top_k:
            payload["top_logprobs_num"] = self.top_k
        body = self._request(url, "POST", "/generate", payload, what="POST /generate", cancel=cancel, count=True)
        answers = [body] if len(chunk) == 1 and isinstance(body, dict) else body
        if not isinstance(answers, list) or len(answers) != len(chunk):
            raise TeacherResponseError(f"the teacher server at {url} returned {type(body).__name__} for "
                                       f"{len(chunk)} sequences (rows {[s.row for s in chunk]})")
        return [parse_sglang(answer, s, self.top_k, url) for answer, s in zip(answers, chunk)]

    # --- HTTP with retries ---

    def _request(self, url: str, method: str, path: str, payload: dict | None, what: str,
                 cancel: threading.Event | None = None, count: bool = False):
        """JSON body of a successful response. Connection errors, timeouts, HTTP 5xx and 429 are
        retried with exponential backoff (+ jitter) until `retry_for_s` has passed since the first
        attempt, then TeacherUnavailableError; another 4xx is TeacherRequestError at once."""
        client = self._clients[url]
        first = time.monotonic()
        retry = 0
        if count:
            with self._lock:
                self._requests += 1
        while True:
            if cancel is not None and cancel.is_set():
                raise _Cancelled()
            try:
                response = http_client.request(client, method, path, payload, timeout_s=self.spec.timeout_s,
                                               max_bytes=int(self.spec.max_response_mb * 2**20),
                                               cancel=(cancel, self._closing))
            except http_client.RequestCancelled:
                raise _Cancelled() from None
            except http_client.ResponseTooLarge as err:  # a misbehaving server: its answer is not read on
                raise TeacherResponseError(f"the teacher server at {url} answered {what} with too much: {err} "
                                           f"(teacher.max_response_mb={self.spec.max_response_mb:g})") from None
            except httpx.TransportError as err:  # connect / read / write errors, and the whole request's timeout
                last = _describe(err)
                if isinstance(err, httpx.TimeoutException):
                    last += f" (no complete answer within teacher.timeout_s={self.spec.timeout_s:g})"
            else:
                if response.status_code < 400:
                    try:
                        return response.json()
                    except ValueError:
                        raise TeacherResponseError(f"the teacher server at {url} answered {what} with a body that is "
                                                   f"not JSON: {_one_line(response.text, 200)}") from None
                if response.status_code != 429 and response.status_code < 500:
                    raise TeacherRequestError(f"the teacher server at {url} refused {what} (HTTP "
                                              f"{response.status_code}): {_one_line(response.text, 500)}"
                                              f"{_key_hint(response.status_code, self.spec.api_key_env)}",
                                              response.status_code)
                last = f"HTTP {response.status_code} {_one_line(response.text, 200)}"
            elapsed = time.monotonic() - first
            if elapsed >= self.spec.retry_for_s:
                raise TeacherUnavailableError(
                    f"the teacher server at {url} kept failing {what}: retried for {elapsed:.1f} s "
                    f"({retry + 1} attempts, teacher.retry_for_s={self.spec.retry_for_s:g}); last error: {last}")
            delay = min(self.backoff_cap_s, self.backoff_start_s * 2 ** retry) * random.uniform(0.5, 1.0)
            delay = min(delay, self.spec.retry_for_s - elapsed)
            if retry == 0:
                log.warning("teacher server %s failed %s (%s); retrying for up to %.0f s", url, what, last,
                            self.spec.retry_for_s)
            if (cancel or self._closing).wait(delay) or self._closing.is_set():
                raise _Cancelled()
            retry += 1
            if count:
                with self._lock:
                    self._retries += 1

    # --- metrics ---

    def _reset_metrics(self) -> None:
        self._wait_s = 0.0
        self._requests = self._retries = self._tokens = 0
        self._scored = False

    def take_metrics(self) -> dict:
        """Since the last call: teacher_wait_s (wall time inside score), teacher_requests (scoring
        requests, each counted once however often retried), teacher_retries, teacher_tokens_scored
        (completion tokens) and teacher_tokens_scored_per_s. {} when nothing was scored."""
        with self._lock:
            if not self._scored and not self._requests:
                return {}
            metrics = {"teacher_wait_s": self._wait_s, "teacher_requests": self._requests,
                       "teacher_retries": self._retries, "teacher_tokens_scored": self._tokens,
                       "teacher_tokens_scored_per_s": self._tokens / self._wait_s if self._wait_s > 0 else 0.0}
            self._reset_metrics()
        return metrics


# --- pieces with no HTTP in them ---


def _key_hint(status: int, api_key_env: str | None) -> str:
    """What a refused key asks for (the key itself is never shown)."""
    if status not in (401, 403):
        return ""
    if api_key_env is None:
        return (" (a protected server: set teacher.api_key_env to the name of the environment variable that holds "
                "its key)")
    return f" (the key in ${api_key_env} was refused: rotated, or for another server?)"


def _describe(err: Exception) -> str:
    text = str(err)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _local_model_facts(directory: str | None) -> tuple[int | None, ModelCost | None]:
    """(output size, FLOP cost) from a local config.json next to the teacher's tokenizer, else None."""
    if directory is None or not (Path(directory) / "config.json").is_file():
        return None, None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        cost = ModelCost.from_config_dir(directory)
    except Exception as err:  # noqa: BLE001 - FLOP accounting is optional, scoring is not
        log.warning("cannot count the teacher's FLOPs from %s/config.json: %s", directory, err)
        cost = None
    return getattr(text, "vocab_size", None), cost


def _sequences(rollouts: Rollouts) -> list[_Sequence]:
    """What to send for each row that has completion tokens: its real tokens (from the first
    attended one) up to and including its last completion token."""
    tokens = rollouts.tokens.detach().cpu()
    attended = rollouts.attention_mask.detach().cpu() > 0
    completion = rollouts.loss_mask.detach().cpu() > 0
    sequences = []
    for row in range(tokens.shape[0]):
        columns = completion[row].nonzero().flatten().tolist()
        if not columns:
            continue
        real = attended[row].nonzero().flatten().tolist()
        start, last = (real[0] if real else columns[0]), columns[-1]
        if not real or not bool(attended[row, start:last + 1].all()):
            raise ValueError(f"row {row}: the attention mask is not one run of real tokens up to the last "
                             f"completion token (column {last}); cannot send it to a teacher server")
        if columns[0] <= start:
            raise ValueError(f"row {row}: completion token at column {columns[0]} has no token before it")
        sequences.append(_Sequence(row, start, tokens[row, start:last + 1].tolist(), columns))
    return sequences


def _invalid(url: str, sequence: _Sequence, column: int | None, what: str) -> TeacherResponseError:
    where = f"row {sequence.row}"
    if column is not None:
        j = column - sequence.start
        token = f", token {sequence.ids[j]}" if 0 <= j < len(sequence.ids) else ""
        where += f", position {column}{token}"
    return TeacherResponseError(f"the teacher server at {url} returned an invalid score for {where}: {what}")


def _check_value(value, url: str, sequence: _Sequence, column: int, name: str) -> float:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(url, sequence, column, f"{name} is {value!r}, not a number")
    value = float(value)
    if not math.isfinite(value):
        raise _invalid(url, sequence, column, f"{name} is {value}, not finite")
    if value > LOGPROB_TOLERANCE:
        raise _invalid(url, sequence, column, f"{name} is {value} > 0, not a log-probability")
    return value


def _check_length(entries, url: str, sequence: _Sequence, field: str) -> list:
    if not isinstance(entries, list):
        raise _invalid(url, sequence, None, f"no {field} list in the response (got {type(entries).__name__})")
    if len(entries) != len(sequence.ids):
        first_wrong = sequence.start + min(len(entries), len(sequence.ids))
        raise _invalid(url, sequence, first_wrong,
                       f"{field} has {len(entries)} entries for the {len(sequence.ids)} tokens sent (one per "
                       f"position expected)")
    return entries


def _topk(candidates: list[tuple[int, float]], k: int, url: str, sequence: _Sequence, column: int):
    """The k best (id, log-prob) of a position's candidates, best first; NaN or positive values are
    errors, -inf entries are dropped (padding)."""
    checked = []
    for token, value in candidates:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
                or value > LOGPROB_TOLERANCE:
            raise _invalid(url, sequence, column, f"top-k log-prob of token {token} is {_one_line(repr(value), 60)}, "
                                                  f"not a log-probability")
        if value > float("-inf"):
            checked.append((int(token), float(value)))
    checked.sort(key=lambda entry: -entry[1])
    return checked[:k]


def parse_vllm(prompt_logprobs, sequence: _Sequence, k: int, url: str) -> _Scored:
    """One sequence's `choices[i].prompt_logprobs`: [null, {token_id: {logprob, rank, decoded_token}}, ...]."""
    entries = _check_length(prompt_logprobs, url, sequence, "prompt_logprobs")
    completion = set(sequence.columns)
    logprobs, topk = [], [] if k else None
    for j in range(1, len(entries)):
        column = sequence.start + j
        entry, token = entries[j], sequence.ids[j]
        if not isinstance(entry, dict) or str(token) not in entry:
            keys = list(entry)[:5] if isinstance(entry, dict) else entry
            raise _invalid(url, sequence, column, f"the entry does not hold the token that was sent (got {keys!r})")
        if column not in completion:
            continue
        given = entry[str(token)]
        logprobs.append(_check_value(given.get("logprob") if isinstance(given, dict) else given, url, sequence,
                                     column, "log-prob"))
        if k:
            try:
                candidates = [(int(t), c["logprob"] if isinstance(c, dict) else c) for t, c in entry.items()]
            except (TypeError, ValueError, KeyError):
                raise _invalid(url, sequence, column, f"malformed top-k entry {_one_line(entry, 200)}") from None
            topk.append(_topk(candidates, k, url, sequence, column))
    return _Scored(logprobs, topk)


def parse_sglang(answer, sequence: _Sequence, k: int, url: str) -> _Scored:
    """One sequence's /generate answer: meta_info.input_token_logprobs [[logprob, id, text], ...]
    and, with k, meta_info.input_top_logprobs [null | [[logprob, id, text], ...], ...]."""
    meta = answer.get("meta_info") if isinstance(answer, dict) else None
    if not isinstance(meta, dict):
        raise _invalid(url, sequence, None, "no meta_info in the response")
    entries = _check_length(meta.get("input_token_logprobs"), url, sequence, "input_token_logprobs")
    top = _check_length(meta.get("input_top_logprobs"), url, sequence, "input_top_logprobs") if k else None
    completion = set(sequence.columns)
    logprobs, topk = [], [] if k else None
    for j in range(1, len(entries)):
        column = sequence.start + j
        entry, token = entries[j], sequence.ids[j]
        if not isinstance(entry, (list, tuple)) or len(entry) < 2 or entry[1] != token:
            raise _invalid(url, sequence, column, f"the entry is {_one_line(entry, 100)}, not the token that was sent")
        if column not in completion:
            continue
        logprobs.append(_check_value(entry[0], url, sequence, column, "log-prob"))
        if k:
            position = top[j] or []
            try:
                candidates = [(int(c[1]), c[0]) for c in position]
            except (TypeError, ValueError, IndexError):
                raise _invalid(url, sequence, column, f"malformed top-k entry {_one_line(position, 200)}") from None
            topk.append(_topk(candidates, k, url, sequence, column))
    return _Scored(logprobs, topk)
