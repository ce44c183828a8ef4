"""Limits that hold whatever a server does (issue 25): timeout_s bounds a whole request (a server
that trickles its answer), an answer has a size cap, a protected server gets its API key as a
Bearer header (never logged), and every teacher failure saves the last finished step. Each test
runs a real HTTP server on 127.0.0.1."""

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from helpers import TINY_RUN, tiny
from opd import http_client
from opd.config import ConfigError, ModelConfig, load_config
from opd.teacher.remote import RemoteTeacher, TeacherRequestError, TeacherResponseError, TeacherUnavailableError
from test_remote_teacher import FakeEngine, Handler  # a server answering with a real tiny model


class Server:
    """A loopback server whose /v1/completions answer is chosen by the test: `mode` is ok (a
    small JSON body), trickle (one byte per 0.05 s, for ever), hang (headers never sent), huge
    (`size` bytes, declared) or huge_chunked (the same, without a Content-Length)."""

    def __init__(self, mode="ok", key=None, size=0, tokenize=None):
        self.mode, self.key, self.size, self.tokenize = mode, key, size, tokenize
        self.seen_auth, self.hits = [], []
        self.stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def send(self, status, body: bytes, length=True):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if length:
                    self.send_header("Content-Length", str(len(body)))
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def authorised(self):
                outer.seen_auth.append(self.headers.get("Authorization"))
                if outer.key is not None and self.headers.get("Authorization") != f"Bearer {outer.key}":
                    self.send(401, b'{"error": "Unauthorized"}')
                    return False
                return True

            def do_GET(self):
                if not self.authorised():
                    return
                if self.path == "/v1/models":
                    return self.send(200, json.dumps({"data": [{"id": "m"}]}).encode())
                self.send(200, b"{}")

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.hits.append(self.path)
                if not self.authorised():
                    return
                mode = outer.mode
                if self.path == "/tokenize":
                    return self.send(200, json.dumps(outer.tokenize).encode())
                try:
                    if mode == "hang":
                        outer.stop.wait(60)
                    elif mode == "trickle":
                        self.send_response(200)
                        self.send_header("Content-Length", "100000")
                        self.end_headers()
                        while not outer.stop.wait(0.05):
                            self.wfile.write(b" ")
                            self.wfile.flush()
                    elif mode in ("huge", "huge_chunked"):
                        self.send(200, b" " * outer.size, length=mode == "huge")
                    else:
                        self.send(200, json.dumps({"choices": []}).encode())
                except OSError:  # the client hung up (as it should on a trickle or an oversized answer)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *args: None  # a client that hangs up mid-answer is the point
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    made = []

    def start(**kw):
        made.append(Server(**kw))
        return made[-1]

    yield start
    for s in made:
        s.close()


def finishes(fn, within=60.0):
    """Run fn in a thread; (finished?, its exception). A safety bound for a test that would
    otherwise hang on a server that never finishes its answer, not a timing measurement."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test
            out["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(within)
    return not thread.is_alive(), out.get("error")


# ----------------------------------------------------------------------------------------------
# 4. timeout_s is a deadline for the whole request; a size cap


def test_a_trickling_answer_ends_at_the_whole_request_deadline(server):
    s = server(mode="trickle")
    client = http_client.make_client(s.url, timeout_s=1.0)
    done, err = finishes(lambda: http_client.request(client, "POST", "/v1/completions", {}))
    assert done, "a server that sends one byte every 0.05 s kept the request open"
    assert isinstance(err, httpx.TimeoutException)
    client.close()


def test_the_teacher_gives_up_on_a_trickling_server_naming_timeout_s(server):
    s = server(mode="trickle")
    teacher = RemoteTeacher(ModelConfig(url=s.url, timeout_s=1.0, retry_for_s=0))
    from opd.teacher.remote import _Sequence

    done, err = finishes(lambda: teacher._score_chunk(s.url, [_Sequence(0, 0, [1, 2, 3], [1, 2])], threading.Event()))
    assert done and isinstance(err, TeacherUnavailableError), err
    assert "teacher.timeout_s=1" in str(err) and s.url in str(err)
    teacher.close()


@pytest.mark.parametrize("mode", ["huge", "huge_chunked"])
def test_an_answer_over_the_size_cap_is_refused(server, mode):
    s = server(mode=mode, size=3 << 20)
    teacher = RemoteTeacher(ModelConfig(url=s.url, max_response_mb=1, retry_for_s=0))
    with pytest.raises(TeacherResponseError, match="too much.*teacher.max_response_mb=1"):
        teacher._request(s.url, "POST", "/v1/completions", {}, what="POST /v1/completions")
    teacher.close()


def test_sampling_timeout_s_bounds_a_trickling_student_server(server, tmp_path):
    from opd.config import SamplingConfig
    from opd.sampler.vllm import SamplerServerError, VLLMServerSampler
    from opd.tiny import build_tiny_tokenizer

    s = server(mode="trickle")
    cfg = SamplingConfig(backend="vllm", url=s.url, timeout_s=1.0)
    sampler = VLLMServerSampler(s.url, lambda path: None, build_tiny_tokenizer(), cfg, tmp_path, [0])
    done, err = finishes(lambda: sampler._post("/v1/completions", {}))
    assert done and isinstance(err, SamplerServerError) and "sampling.timeout_s=1" in str(err), err
    sampler.close()


def test_closing_the_teacher_stops_a_request_to_a_hanging_server(server):
    s = server(mode="hang")
    teacher = RemoteTeacher(ModelConfig(url=s.url, timeout_s=600, retry_for_s=0))
    worker = threading.Thread(target=lambda: pytest.raises(Exception, teacher._request, s.url, "POST",
                                                           "/v1/completions", {}, "POST /v1/completions"))
    worker.start()
    while "/v1/completions" not in s.hits:
        time.sleep(0.01)
    done, _ = finishes(teacher.close, within=30)
    assert done  # on close, a request in flight stops instead of waiting out timeout_s=600
    worker.join(30)
    assert not worker.is_alive()


# ----------------------------------------------------------------------------------------------
# 3. a protected server: api_key_env, sent as a Bearer header, never logged


def test_the_api_key_is_sent_as_a_bearer_header_and_never_logged(server, monkeypatch, caplog):
    s = server(key="s3cret-key")
    monkeypatch.setenv("OPD_TEST_TEACHER_KEY", "s3cret-key")
    with caplog.at_level(logging.DEBUG):
        teacher = RemoteTeacher(ModelConfig(url=s.url, api_key_env="OPD_TEST_TEACHER_KEY", retry_for_s=0))
        teacher.close()
    assert s.seen_auth and set(s.seen_auth) == {"Bearer s3cret-key"}
    monkeypatch.setenv("OPD_TEST_TEACHER_KEY", "k-new-9876")  # a key the server no longer takes: one line, no key
    with pytest.raises(TeacherUnavailableError, match="HTTP 401") as err:
        RemoteTeacher(ModelConfig(url=s.url, api_key_env="OPD_TEST_TEACHER_KEY", retry_for_s=0))
    assert "k-new-9876" not in str(err.value) and "OPD_TEST_TEACHER_KEY was refused" in str(err.value) and "s3cret" not in caplog.text
    with pytest.raises(TeacherUnavailableError, match="HTTP 401"):  # no key at all
        RemoteTeacher(ModelConfig(url=s.url, retry_for_s=0))


def test_a_missing_key_variable_or_a_key_in_the_config_is_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv("OPD_TEST_TEACHER_KEY", raising=False)
    with pytest.raises(ConfigError, match="OPD_TEST_TEACHER_KEY is not set"):
        RemoteTeacher(ModelConfig(url="http://127.0.0.1:9", api_key_env="OPD_TEST_TEACHER_KEY"), check=False)
    with pytest.raises(ConfigError, match="never the key itself") as err:  # the key itself where its name belongs
        load_config(None, ["student.tiny.hidden_size=32", "teacher.url=http://127.0.0.1:9",
                           "teacher.api_key_env=sk-abc123-secret"])
    assert "sk-abc123" not in str(err.value)
    with pytest.raises(ConfigError, match="ca_bundle=.*no such file"):
        RemoteTeacher(ModelConfig(url="https://127.0.0.1:9", ca_bundle=str(tmp_path / "none.pem")), check=False)


def test_the_sampling_server_gets_its_key_too(server, monkeypatch, tmp_path):
    from opd.config import SamplingConfig
    from opd.sampler.vllm import VLLMServerSampler
    from opd.tiny import build_tiny_tokenizer

    s = server(key="student-key")
    monkeypatch.setenv("OPD_TEST_STUDENT_KEY", "student-key")
    cfg = SamplingConfig(backend="vllm", url=s.url, api_key_env="OPD_TEST_STUDENT_KEY")
    sampler = VLLMServerSampler(s.url, lambda path: None, build_tiny_tokenizer(), cfg, tmp_path, [0])
    assert sampler.model == "m" and s.seen_auth == ["Bearer student-key"]
    sampler.close()


# ----------------------------------------------------------------------------------------------
# 6. every teacher failure saves the last finished step; 5. a second Ctrl-C quits at once


class BreakingHandler(Handler):
    """Scores like a vLLM server for `engine.good` scoring requests, then fails as `engine.failure`
    says: nan (an invalid log-prob), 401 (a key rotated away), 400 (a refused request), hang."""

    def do_POST(self):
        engine = self.server.engine
        if self.path == "/v1/completions":
            with engine.count_lock:
                engine.scored += 1
                broken = engine.scored > engine.good
            if broken and engine.failure in ("401", "400"):
                self.rfile.read(int(self.headers["Content-Length"]))
                return self.reply(int(engine.failure), {"error": {"message": "refused"}})
            if broken and engine.failure == "hang":
                engine.hanging.set()
                engine.release.wait(120)
                return
            if broken:
                engine.corrupt = engine.failure
        super().do_POST()


@pytest.fixture
def breaking_server():
    started = []

    def start(good, failure):
        model, tokenizer = tiny(hidden=32, seed=5)
        engine = FakeEngine(model, tokenizer)
        engine.good, engine.failure, engine.scored = good, failure, 0
        engine.count_lock, engine.hanging, engine.release = threading.Lock(), threading.Event(), threading.Event()
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), BreakingHandler)
        httpd.daemon_threads, httpd.engine = True, engine
        httpd.handle_error = lambda *args: None
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        started.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}", engine

    yield start
    for httpd in started:
        httpd.engine.release.set()
        httpd.shutdown()
        httpd.server_close()


def served_run(url, run_dir, *extra):
    """TINY_RUN with the teacher served at `url`: one scoring request per step, no eval set."""
    own = [o for o in TINY_RUN if not o.startswith("teacher.")]
    return [*own, f"teacher.url={url}", "teacher.rows_per_request=16", "teacher.retry_for_s=1",
            "data.eval_holdout=0", f"run_dir={run_dir}", *extra]


@pytest.mark.parametrize("failure", ["nan", "401", "400"])
def test_a_bad_teacher_answer_saves_the_last_finished_step(breaking_server, tmp_path, failure):
    from opd.learner.checkpoint import latest_checkpoint
    from opd.loop import train

    url, engine = breaking_server(good=2, failure=failure)
    run_dir = tmp_path / "run"
    cfg = load_config(None, served_run(url, run_dir, "train.steps=4", "checkpoint.every=50"))
    with pytest.raises(TeacherResponseError, match=r"step 3 could not be scored; saved checkpoint .*step_000002") as err:
        train(cfg)
    assert isinstance(err.value, TeacherRequestError) == (failure != "nan")
    assert latest_checkpoint(run_dir).name == "step_000002"  # checkpoint.every=50: only the failure saved it
    engine.failure = None  # the server is fixed: --resume continues from step 2
    assert train(cfg, resume=True)["steps_done"] == 4


def test_a_second_ctrl_c_quits_at_once_while_the_teacher_hangs(breaking_server, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    url, engine = breaking_server(good=1, failure="hang")
    run_dir = tmp_path / "run"
    args = served_run(url, run_dir, "train.steps=5", "teacher.timeout_s=600", "teacher.retry_for_s=600")
    proc = subprocess.Popen([sys.executable, "-m", "opd.cli.main", "distill", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert engine.hanging.wait(240), "the run never reached its second step"
        proc.send_signal(signal.SIGINT)  # first: finish the step (which hangs), then save
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # second: quit now
        try:
            out, err = proc.communicate(timeout=30)  # a bound on a hang, not a timing measurement
        except subprocess.TimeoutExpired:
            pytest.fail("the second Ctrl-C did not end the run while the teacher hung (timeout_s=600)")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted without saving" in err and "Traceback" not in err


def test_a_served_teachers_max_model_len_bounds_prompt_plus_max_new_tokens(breaking_server, tmp_path):
    from opd.loop import train

    url, engine = breaking_server(good=10**6, failure=None)  # its /tokenize says max_model_len 512
    run_dir = tmp_path / "run"
    cfg = load_config(None, served_run(url, run_dir, "student.tiny.max_position_embeddings=2048",
                                       "sampling.max_new_tokens=600"))
    with pytest.raises(ConfigError, match="more than the teacher server's max_model_len=512"):
        train(cfg)
    assert engine.scored == 0 and not (run_dir / "metrics.jsonl").exists()  # refused before any work
