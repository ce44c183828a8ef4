"""What to run whenever a GPU is at hand: the GPU paths that this project's CPU machines cannot
test, each a short real run, one line per check with its figure (scripts/gpu_check.sh runs it).

    scripts/gpu_check.sh                 # every check (a few minutes on one GPU)
    scripts/gpu_check.sh bf16 nccl       # some of them

Checks (each in its own process, with a deadline, so that one hang or crash does not stop the rest):
  bf16      the learner on CUDA: 4 distillation steps, train.compute_dtype=bfloat16 (fp32 weights);
            figure: s/step, and the importance ratio (1.0: the sampler and the learner agree)
  colocated sampling.backend=vllm in process on the GPU (CUDA vLLM), weights synced after every
            step at optim.lr=3e-2; figure: logprob_mismatch per step (sampling.recompute_logprobs),
            which grows step after step when the sync does not reach the engine
  served    the teacher on a vLLM server on the GPU (bf16), 127.0.0.1; figure: |teacher_kl - the
            in-process bf16 teacher's| per step, and the server's scoring rate
  nccl      2 processes (torchrun, NCCL) when 2 GPUs exist: the gradient test of tests/learner/test_distributed.py
            and a 3-step FSDP2 run; figure: wall time

Exit status: 0 when every check passed or was skipped (no vLLM, one GPU for nccl), 1 otherwise.
Without a CUDA GPU it says so and exits 0 having checked nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CHECKS = ("bf16", "colocated", "served", "nccl")
DEADLINE_S = {"bf16": 300, "colocated": 420, "served": 480, "nccl": 480}

# A tiny student whose heads vLLM's attention kernels take (head_dim 32), a random tiny teacher.
STUDENT = ["student.tiny.hidden_size=64", "student.tiny.num_heads=2", "student.tiny.seed=1"]
TEACHER = ["teacher.tiny.hidden_size=64", "teacher.tiny.num_heads=2", "teacher.tiny.seed=2",
           "teacher.tiny.pretrain_steps=0", "teacher.tiny.init_std=0.5"]
RUN = ["method=distill", "train.device=cuda", "train.prompts_per_step=8", "sampling.samples_per_prompt=4",
       "sampling.max_new_tokens=32", "train.micro_batch_size=16", "data.eval_holdout=4", "eval.every=0",
       "log.progress=false", "log.tensorboard=false", "checkpoint.every=0"]


class Skip(Exception):
    pass


def run(run_dir: Path, *overrides: str) -> list[dict]:
    """A real training run (opd.loop.train); its metrics.jsonl rows after step 0."""
    from opd.config import load_config
    from opd.loop import train

    train(load_config(None, [f"run_dir={run_dir}", *RUN, *overrides]))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["step"] > 0]


def needs_vllm() -> None:
    try:
        import vllm  # noqa: F401
        from vllm.platforms import current_platform
    except Exception as err:  # not installed, or a build that does not import here
        raise Skip(f"no CUDA vLLM in {sys.executable} ({type(err).__name__}: {err}): pip install -e '.[vllm]'")
    if not current_platform.is_cuda():
        raise Skip(f"vLLM here is the {current_platform.device_name} build, not CUDA's")


def check_bf16(folder: Path) -> str:
    t0 = time.perf_counter()
    rows = run(folder / "bf16", *STUDENT, *TEACHER, "train.steps=4", "train.compute_dtype=bfloat16")
    ratios = [r["ratio_mean"] for r in rows]
    if not all(abs(x - 1) < 0.05 for x in ratios):
        raise AssertionError(f"importance ratio far from 1 under bf16: {ratios}")
    return (f"4 steps in {time.perf_counter() - t0:.1f} s (with start-up), ratio_mean {min(ratios):.4f}-"
            f"{max(ratios):.4f}, loss {rows[-1]['loss']:.4f}")


def check_colocated(folder: Path) -> str:
    needs_vllm()
    rows = run(folder / "colocated", *STUDENT, *TEACHER, "train.steps=4", "optim.lr=3e-2", "optim.warmup_steps=0",
               "sampling.backend=vllm", "sampling.recompute_logprobs=true", "student.dtype=bfloat16",
               "teacher.dtype=bfloat16")
    mismatch = [r["logprob_mismatch"] for r in rows]
    # the engine computes in bf16 with its own kernels (small, steady mismatch); a sync that does not
    # reach it leaves it on step 1's weights while lr=3e-2 moves the learner away (mismatch grows)
    if max(mismatch) > 0.1:
        raise AssertionError(f"logprob_mismatch per step {mismatch}: the engine's weights are not the learner's")
    sample_s = sum(r.get("sample_s", 0.0) for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    return (f"logprob_mismatch per step {', '.join(f'{x:.4f}' for x in mismatch)}; "
            f"{tokens / max(sample_s, 1e-9):.0f} sampled tok/s")


def check_served(folder: Path) -> str:
    needs_vllm()
    from opd.config import TinyModelConfig
    from opd.tiny import build_tiny_model, build_tiny_tokenizer
    from opd.vllm_server import VLLMServer

    teacher_dir = folder / "teacher"
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(TinyModelConfig(hidden_size=64, num_heads=2, seed=2, init_std=0.5), tokenizer)
    model.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    # the last --dtype wins: the server scores in bf16, as the in-process bf16 teacher below
    server = VLLMServer(sys.executable, teacher_dir, folder / "server.log",
                        extra_args=("--dtype", "bfloat16", "--gpu-memory-utilization", "0.25"))
    server.start()
    try:
        base = [*STUDENT, "train.steps=3", "teacher.dtype=bfloat16"]
        served = run(folder / "served", *base, f"teacher.url={server.url}", f"teacher.served_model={server.model_name}")
    finally:
        server.stop()
    local = run(folder / "local", *base, f"teacher.path={teacher_dir}")
    gaps = [abs(a["teacher_kl"] - b["teacher_kl"]) for a, b in zip(served, local)]
    if max(gaps) > 0.05:  # bf16 kernels differ between vLLM and transformers; a wrong score differs by far more
        raise AssertionError(f"served vs in-process teacher_kl differ by {gaps}")
    rate = sum(r["teacher_tokens_scored"] for r in served) / max(sum(r["teacher_wait_s"] for r in served), 1e-9)
    return (f"server up in {server.start_seconds:.0f} s; |teacher_kl served - in process| per step "
            f"{', '.join(f'{g:.4f}' for g in gaps)}; {rate:.0f} scored tok/s")


def check_nccl(folder: Path) -> str:
    import torch

    if torch.cuda.device_count() < 2:
        raise Skip(f"NCCL needs 2 GPUs; {torch.cuda.device_count()} here")
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "learner" / "test_distributed.py"), "-k", "nccl"],
                          capture_output=True, text=True, timeout=DEADLINE_S["nccl"] // 2, env=env, cwd=ROOT)
    if done.returncode != 0 or " passed" not in done.stdout:
        raise AssertionError(f"the NCCL gradient test failed:\n{(done.stdout + done.stderr)[-2000:]}")
    grads_s = time.perf_counter() - t0
    worker = ROOT / "tests" / "distributed_worker.py"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(worker), "train",
                           str(folder / "fsdp2"), "train.steps=3", "train.device=cuda", "train.strategy=fsdp2"],
                          capture_output=True, text=True, timeout=DEADLINE_S["nccl"] // 2, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise AssertionError(f"the 2-rank FSDP2 run failed:\n{(done.stdout + done.stderr)[-2000:]}")
    return f"gradients of 2 ranks = 1 rank (DDP, FSDP2) in {grads_s:.0f} s; 3 FSDP2 steps on 2 GPUs in " \
           f"{time.perf_counter() - t0 - grads_s:.0f} s"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one(name: str) -> int:
    """Run one check in this process; print its line."""
    with tempfile.TemporaryDirectory(prefix=f"opd-gpu-check-{name}-") as folder:
        try:
            figure = globals()[f"check_{name}"](Path(folder))
        except Skip as why:
            print(f"SKIP {name:9} {why}", flush=True)
            return 0
        except Exception as err:
            text = str(err).strip() or type(err).__name__
            print(f"FAIL {name:9} {type(err).__name__}: {text}", flush=True)
            return 1
    print(f"PASS {name:9} {figure}", flush=True)
    return 0


def run_check(name: str) -> tuple[int | None, str]:
    """One check in its own process (a crash or a hang does not take the others with it): its exit
    code (None past its deadline) and output. Past the deadline it gets Ctrl-C first, so that a vLLM
    server it started is stopped by its `finally`, then SIGKILL."""
    import signal

    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, __file__, "--one", name], stdout=out, stderr=subprocess.STDOUT,
                                text=True)
        try:
            code = proc.wait(timeout=DEADLINE_S[name])
        except subprocess.TimeoutExpired:
            code = None
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out.seek(0)
        return code, out.read()


def main(argv: list[str]) -> int:
    if argv[:1] == ["--one"]:
        return one(argv[1])
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing checked")
        return 0
    names = argv or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        print(f"gpu_check: unknown check {unknown[0]!r}; the checks are {', '.join(CHECKS)}")
        return 2
    print(f"gpu_check: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"{sys.executable}", flush=True)
    failed = 0
    for name in names:
        t0 = time.perf_counter()
        code, out = run_check(name)
        lines = [line for line in out.splitlines() if line.startswith(("PASS ", "FAIL ", "SKIP "))]
        if not lines:
            tail = out.strip().splitlines()[-1:] or ["no output"]
            why = f"no result after {DEADLINE_S[name]} s (stopped)" if code is None else f"exited with {code}"
            lines = [f"FAIL {name:9} {why}: {tail[0]}"]
        print(f"{lines[-1]}  [{time.perf_counter() - t0:.0f} s]", flush=True)
        failed += lines[-1].startswith("FAIL")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
