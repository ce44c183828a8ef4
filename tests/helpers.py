"""Small builders shared by the tests."""

import os
import socket
import subprocess
import sys
from pathlib import Path

from opd.config import SamplingConfig, TinyModelConfig
from opd.sampler.hf import HFSampler
from opd.tiny import build_tiny_model, build_tiny_tokenizer


def tiny(hidden=32, seed=0, pretrain_steps=0, **kw):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=hidden, seed=seed, pretrain_steps=pretrain_steps, **kw),
                             tokenizer)
    return model, tokenizer


def chat_ids(tokenizer, texts):
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          return_dict=True)["input_ids"] for t in texts]


def sampler(model, tokenizer, **kw):
    return HFSampler(model, tokenizer, SamplingConfig(**kw))


# A run that takes a few seconds on 2 CPU cores: a random 32-wide student, a 64-wide teacher
# pretrained for 200 steps on the built-in conversations.
TINY_RUN = [
    "student.tiny.hidden_size=32", "student.tiny.seed=1",
    "teacher.tiny.hidden_size=64", "teacher.tiny.seed=2", "teacher.tiny.pretrain_steps=200",
    "train.prompts_per_step=4", "sampling.samples_per_prompt=4", "sampling.max_new_tokens=16",
    "train.micro_batch_size=8", "optim.lr=3e-3", "optim.warmup_steps=2",
    "eval.every=0", "log.progress=false", "log.tensorboard=false", "checkpoint.every=0",
]


WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc: int = 2, timeout: int = 240, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc-per-node N tests/distributed_worker.py ARGS` on
    127.0.0.1 and a free port, with a timeout (this interpreter: .venv or .venv-vllm)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parent.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER), *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if check:
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done
