"""The blog's claims tested the way the blog tested them (issue 31): on the demo's arithmetic task
(the default) and on the sums task (--task sums, item 3: long answers, several solution paths,
self-corrections, a student start far below its teacher).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/blog_claims.py facts   [--task sums]
    OMP_NUM_THREADS=1 .venv/bin/python experiments/blog_claims.py sweep   [--task sums] [--methods sft,distill,rl]
    OMP_NUM_THREADS=1 .venv/bin/python experiments/blog_claims.py seeds   [--task sums] [--seeds 1,2]
    OMP_NUM_THREADS=1 .venv/bin/python experiments/blog_claims.py long    --task sums --seeds 1
    OMP_NUM_THREADS=1 .venv/bin/python experiments/blog_claims.py plateau [--task sums]
    .venv/bin/python experiments/blog_claims.py write

Stages (each under 12 minutes on one shared core, but long; a finished run is skipped, so a stage resumes):
* facts (item 3): what the task gives the mechanisms to act on: answer lengths and truncation at
  max_new_tokens, corrections, teacher and student-start accuracy on the test split, and the
  teacher's entropy (nats/token) on the student's samples and on its own.
* sweep (item 2): every method at 3 learning rates (2 for sums; distillation also without gradient
  clipping at its best one, demo only), seed 0, scored on a VALIDATION split: 64 of 128 held-out
  problems, drawn by a fixed seed; the other 64 are the TEST split, never used to choose.
* seeds (item 2): each method at its chosen setting, more seeds, evaluated on the test split;
  steps and FLOPs to the common accuracy as in compare_methods.py, and to fixed levels (LEVELS).
* long: as seeds, one seed, 4x the steps (about 30 minutes for sums).
* plateau (item 1): SFT on teacher samples from the start until validation accuracy stops
  rising (the measured plateau, with its FLOPs); from that checkpoint, more SFT on fresh teacher
  samples vs on-policy distillation, on the test split, in FLOPs (data paid) to the next level.
* write: experiments/RESULTS_blog_claims.md from experiments/results/blog_claims.json and
  blog_claims_sums.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from opd.cli.demo import STUDENT_BUILD, TEACHER_BUILD, TASK, _build, _merge, method_config
from opd.compare import cached_model, compare_runs, model_accuracy, sft_on_teacher_samples
from opd.config import load_config
from opd.hardware import machine_record

HERE = Path(__file__).parent
console = Console()

STEPS, EVAL_EVERY, SWEEP_EVAL_EVERY = 100, 10, 20  # the sweep evaluates less often: it only chooses
SPLIT_SEED = 31  # which 64 of the 128 held-out problems validate, which 64 test
LONG = {"steps": 400, "every": 40}  # the long stage (sums): one seed, four times the budget
PLATEAU = {"steps": 400, "every": 25, "checkpoint_every": 25, "more_steps": 100, "patience": 3}


@dataclass(frozen=True)
class Setup:
    """A task with its teacher and student start: where its runs and results go, what every run of
    it shares (`tree`, merged over the demo's recipe) and the learning rates the sweep tries."""

    name: str
    task: dict
    teacher_build: dict
    student_build: dict
    tree: dict
    lrs: dict
    results: Path
    out: Path
    no_clip_run: bool = True  # the sweep also runs distillation without clipping at its best lr


DEMO = Setup("demo", TASK, TEACHER_BUILD, STUDENT_BUILD, {},
             {"sft": [2.5e-4, 5e-4, 1e-3], "distill": [2.5e-4, 5e-4, 1e-3], "rl": [1e-4, 2e-4, 4e-4]},
             HERE / "results" / "blog_claims.json", Path("runs/experiments/blog_claims"))

# Issue 31 item 3: long answers (63-85 tokens) with several valid orders and corrected slips, a
# student start far below its teacher (a quarter of the teacher's training). eval_size 128: the
# training prompts skip all 128 held-out problems (validation and test alike).
SUMS_TASK = {"name": "sums", "train_size": 4000, "eval_size": 128}
SUMS_LENGTH = 110  # max_new_tokens: the longest reference answer is 85 tokens (+ end of turn)


def _sums_build(seed: int, steps: int) -> dict:
    tree = _merge(_build(hidden=128, seed=seed, steps=steps), {
        "sampling": {"max_new_tokens": SUMS_LENGTH}, "eval": {"max_new_tokens": SUMS_LENGTH}})
    return {**tree, "task": SUMS_TASK}


SUMS = Setup("sums", SUMS_TASK, _sums_build(seed=0, steps=1200), _sums_build(seed=1, steps=300),
             {"task": SUMS_TASK, "sampling": {"max_new_tokens": SUMS_LENGTH}, "eval": {"max_new_tokens": SUMS_LENGTH}},
             {"sft": [5e-4, 1e-3], "distill": [5e-4, 1e-3], "rl": [1e-4, 2e-4]},
             HERE / "results" / "blog_claims_sums.json", Path("runs/experiments/blog_claims_sums"),
             no_clip_run=False)  # time went to seeds instead
SETUPS = {"demo": DEMO, "sums": SUMS}
SETUP = DEMO  # main() sets it from --task


# ----------------------------------------------------------------------------------------------
# shared pieces


def splits() -> dict[str, Path]:
    """The held-out problems, split by SPLIT_SEED into validation and test JSONL files."""
    from opd.data.sources import task_records

    cfg = load_config(None, ["task.eval_size=128"], base={"method": "sft", "run_dir": "unused",
                                                          "student": {"tiny": {}}, "task": SETUP.task})
    records = [r for _, r in task_records(cfg, "eval")]
    order = list(range(len(records)))
    random.Random(SPLIT_SEED).shuffle(order)
    paths = {}
    for name, idx in (("val", sorted(order[:64])), ("test", sorted(order[64:]))):
        paths[name] = SETUP.out / f"{name}.jsonl"
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        paths[name].write_text("".join(json.dumps(records[i]) + "\n" for i in idx))
    return paths


def demo_models() -> tuple[Path, Path]:
    """The setup's teacher and student start (built once, cached)."""
    teacher, _ = cached_model(load_config(None, [], base=SETUP.teacher_build), console, f"the {SETUP.name} teacher")
    student, _ = cached_model(load_config(None, [], base=SETUP.student_build), console, f"the {SETUP.name} student start")
    return teacher, student


def run_config(method: str, lr: float, clip: bool, seed: int, eval_path: Path, student: Path, teacher: Path,
               steps: int = STEPS, every: int = EVAL_EVERY, extra: list[str] = ()):
    """One method's run: the demo's recipe with this lr (and clipping), seed and eval split. SFT's
    data: teacher samples written for the demo's 150-step budget (cached, reused; its writing cost
    is charged per sequence trained on)."""
    overrides = [f"optim.lr={lr}", f"train.seed={seed}", f"eval.every={every}", f"data.eval_prompts={eval_path}",
                 *([] if clip else ["optim.grad_clip=null"]), *extra]
    if method == "sft":
        cfg, written = sft_on_teacher_samples(
            method_config("sft", student, teacher, [*overrides, f"train.steps={max(steps, 150)}"], SETUP.tree), console)
        return cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": steps})}), written
    return method_config(method, student, teacher, [*overrides, f"train.steps={steps}"], SETUP.tree), None


def train_once(cfg, run_dir: Path) -> Path:
    from opd.loop import train

    global TRAINED
    if not (run_dir / "summary.json").is_file():
        TRAINED = True
        console.print(f"[bold]training {run_dir}")
        if run_dir.exists():
            import shutil
            shutil.rmtree(run_dir)
        summary = train(cfg.model_copy(update={"run_dir": str(run_dir)}), console=console)
        if summary["interrupted"]:
            raise KeyboardInterrupt
    return run_dir


def curve(run_dir: Path) -> list[dict]:
    from opd.run_dir import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def run_facts(run_dir: Path) -> dict:
    rows = curve(run_dir)
    evals = [r for r in rows if "eval/accuracy" in r]
    norms = [r[k] for r in rows for k in r if k.endswith("grad_norm") and isinstance(r[k], (int, float))]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"accuracy": [(r["step"], r["eval/accuracy"]) for r in evals],
            # the teacher's KL on the student's eval samples: a less noisy view of the same distance
            "teacher_kl": [(r["step"], r["eval/teacher_kl"]) for r in evals if "eval/teacher_kl" in r],
            "final": evals[-1]["eval/accuracy"], "best": max(r["eval/accuracy"] for r in evals),
            "late": statistics.fmean(r["eval/accuracy"] for r in evals[-3:]),  # the choosing score
            "grad_norm_median": statistics.median(norms) if norms else None,
            "grad_clipped_steps": summary.get("grad_clipped_steps"), "steps": summary["steps_done"],
            "flops_total": summary["flops_total"], "flops_total_with_data": summary["flops_total_with_data"],
            "wall_s": summary["wall_s_total"]}


def load_results(setup: Setup | None = None) -> dict:
    path = (setup or SETUP).results
    return json.loads(path.read_text()) if path.is_file() else {}


TRAINED = False  # whether this process trained a run (else a stage only re-read finished runs)


def save(section: str, value, command: str, started: float) -> None:
    results = load_results()
    results[section] = value
    results.setdefault("commands", {})[section] = command
    if TRAINED or section not in results.get("seconds", {}):  # a re-read keeps the time the runs took
        results.setdefault("seconds", {})[section] = time.time() - started
        results.setdefault("machine", {})[section] = {**machine_record(), "torch": torch.__version__}
    SETUP.results.parent.mkdir(exist_ok=True)
    SETUP.results.write_text(json.dumps(results, indent=2))


# ----------------------------------------------------------------------------------------------
# item 3: what the task gives the blog's mechanisms to act on

FACTS_SAMPLES = 4  # samples per test problem for the facts (the runs' evaluations take 2)


def sample_facts(rollouts, tokenizer, metrics: dict) -> dict:
    """Length, truncation, corrections and accuracy of one model's samples, and the teacher's
    entropy and KL on them."""
    from opd.evaluation import completion_texts
    from opd.tasks.sums import CORRECTION

    texts = completion_texts(rollouts, tokenizer)
    lengths = rollouts.completion_lengths.float()
    return {"accuracy": metrics["accuracy"], "length_mean": float(lengths.mean()), "length_min": int(lengths.min()),
            "length_max": int(lengths.max()), "truncated": metrics["truncated"],
            "correction_rate": sum(CORRECTION in t for t in texts) / len(texts),
            "teacher_entropy": metrics.get("teacher_entropy"), "teacher_kl": metrics.get("teacher_kl"),
            "samples": len(texts), "examples": texts[:3]}


def facts() -> dict:
    """On the test split: the reference answers' length and corrections; the teacher's and the
    student start's samples (accuracy, length, truncation at max_new_tokens, corrections), and the
    teacher's entropy (nats/token) on each: on the student's states is where distillation learns."""
    from opd.components import load_teacher
    from opd.data import encode_prompts
    from opd.data.sources import prompt_records, task_records
    from opd.evaluation import evaluate_prompts
    from opd.models import load_model, pick_device
    from opd.sampler.hf import HFSampler
    from opd.tasks.sums import CORRECTION

    paths, (teacher, student) = splits(), demo_models()
    cfg = method_config("distill", student, teacher, [f"data.eval_prompts={paths['test']}",
                                                      f"eval.samples_per_prompt={FACTS_SAMPLES}"], SETUP.tree)
    device = pick_device(cfg.train.device)
    max_new = cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens
    _, tokenizer = load_model(cfg.student, device)
    references = [r.get("completion") or "" for _, r in task_records(cfg, "train")]
    ref_lengths = [len(tokenizer(t)["input_ids"]) + 1 for t in references]  # + the end-of-turn token
    out = {"max_new_tokens": max_new, "samples_per_problem": FACTS_SAMPLES,
           "references": {"count": len(references), "length_mean": statistics.fmean(ref_lengths),
                          "length_min": min(ref_lengths), "length_max": max(ref_lengths),
                          "over_max_new_tokens": sum(n > max_new for n in ref_lengths) / len(ref_lengths),
                          "correction_rate": sum(CORRECTION in t for t in references) / len(references)}}
    scorer = load_teacher(cfg.teacher, device, tokenizer, cfg.loss.chunk_size, cfg.train.micro_batch_size)
    for who, spec in (("teacher", cfg.teacher), ("student_start", cfg.student)):
        model, tokenizer = load_model(spec, device)
        prompts, _ = encode_prompts(prompt_records(cfg, "eval"), tokenizer, cfg.data.max_prompt_tokens,
                                    cfg.data.overlong)
        metrics, rollouts = evaluate_prompts(prompts, HFSampler(model, tokenizer, cfg.sampling), cfg.eval, max_new,
                                             teacher=scorer)
        out[who] = sample_facts(rollouts, tokenizer, metrics)
        console.print(f"{who}: {out[who]}")
    return out


# ----------------------------------------------------------------------------------------------
# item 2: each method at its own best learning rate


def sweep(methods: list[str]) -> dict:
    paths, (teacher, student) = splits(), demo_models()
    table = dict(load_results().get("sweep", {}))

    def one(method: str, lr: float, clip: bool) -> None:
        name = f"{method} lr={lr:g}" + ("" if clip else " no clip")
        cfg, _ = run_config(method, lr, clip, 0, paths["val"], student, teacher, every=SWEEP_EVAL_EVERY)
        run_dir = train_once(cfg, SETUP.out / "sweep" / name.replace(" ", "_").replace("=", ""))
        table[name] = {"method": method, "lr": lr, "clip": clip, **run_facts(run_dir)}
        console.print(f"{name}: val late {table[name]['late']:.3f} final {table[name]['final']:.3f}")

    for method in methods:
        for lr in SETUP.lrs[method]:
            one(method, lr, True)
        if method == "distill" and SETUP.no_clip_run:
            one(method, chosen(table)["distill"]["lr"], False)
    return table


def chosen(table: dict) -> dict:
    """Per method, the sweep's setting with the highest validation score (late: mean of the last 3
    evaluations, less noisy than the final one)."""
    best = {}
    for row in table.values():
        if row["method"] not in best or row["late"] > best[row["method"]]["late"]:
            best[row["method"]] = row
    return best


def seeds(seed_list: list[int], steps: int = STEPS, every: int = EVAL_EVERY, folder: str = "seeds",
          methods: list[str] | None = None) -> dict:
    """Each method (all, or `methods`, in that order) at its chosen setting, per seed, on the test split."""
    paths, (teacher, student) = splits(), demo_models()
    picks = chosen(load_results()["sweep"])
    if methods is not None:
        picks = {m: picks[m] for m in methods}
    test_cfg = method_config("distill", student, teacher, [f"data.eval_prompts={paths['test']}"], SETUP.tree)
    teacher_accuracy = model_accuracy(test_cfg, test_cfg.teacher)
    per_seed, runs = {}, {}
    for seed in seed_list:
        out = SETUP.out / folder / f"seed_{seed}"
        groups, extra = {}, {}
        for method, pick in picks.items():
            cfg, written = run_config(method, pick["lr"], pick["clip"], seed, paths["test"], student, teacher,
                                      steps=steps, every=every)
            groups[method] = [train_once(cfg, out / method)]
            if written:
                extra[method] = written["seconds"]
        per_seed[seed] = compare_runs(groups, out, teacher_accuracy=teacher_accuracy, extra_seconds=extra)
        runs[seed] = {m: {**run_facts(dirs[0]), "levels": levels_reached(dirs[0], teacher_accuracy)}
                      for m, dirs in groups.items()}
    return {"picks": {m: {"lr": p["lr"], "clip": p["clip"]} for m, p in picks.items()},
            "teacher_accuracy_test": teacher_accuracy, "per_seed": per_seed, "runs": runs,
            "level_fractions": LEVELS}


LEVELS = [0.5, 0.75, 0.9]  # accuracy levels, as fractions of the teacher's test accuracy


def levels_reached(run_dir: Path, teacher_accuracy: float) -> dict:
    """Per level (a fraction of the teacher's accuracy): the step and FLOPs (also with SFT's data
    paid) of the run's first evaluation at or above it; None where never reached."""
    from opd.compare import method_row

    out = {}
    for fraction in LEVELS:
        row = method_row("run", run_dir, fraction * teacher_accuracy)
        out[str(fraction)] = {"accuracy": fraction * teacher_accuracy, "step": row["steps_to_target"],
                              "flops": row["flops_to_target"], "flops_with_data": row["flops_with_data_to_target"]}
    return out


# ----------------------------------------------------------------------------------------------
# item 1: from SFT's plateau


def plateau_step(accuracy: list[tuple[int, float]], patience: int) -> tuple[int, float]:
    """The first evaluation after which `patience` further evaluations never beat it: where held-out
    accuracy stopped rising. (step, accuracy); the last evaluation when it never stopped."""
    for i, (step, acc) in enumerate(accuracy):
        later = accuracy[i + 1:i + 1 + patience]
        if len(later) == patience and all(a <= acc for _, a in later):
            return step, acc
    return accuracy[-1]


def plateau() -> dict:
    paths, (teacher, student) = splits(), demo_models()
    lr = chosen(load_results()["sweep"])["sft"]["lr"]
    p = PLATEAU
    cfg, written = sft_on_teacher_samples(method_config("sft", student, teacher, [
        f"optim.lr={lr}", "train.seed=0", f"train.steps={p['steps']}", f"eval.every={p['every']}",
        f"data.eval_prompts={paths['val']}", f"checkpoint.every={p['checkpoint_every']}",
        "checkpoint.keep_last=100"], SETUP.tree), console)
    long_dir = train_once(cfg, SETUP.out / "plateau" / "sft_long")
    facts = run_facts(long_dir)
    step, acc = plateau_step(facts["accuracy"], p["patience"])
    rows = [r for r in curve(long_dir) if r.get("step") == step and "flops_total" in r]
    at = {"step": step, "val_accuracy": acc, "flops_total": rows[-1]["flops_total"] if rows else None,
          "flops_total_with_data": rows[-1]["flops_total_with_data"] if rows else None}
    # The checkpoint at the plateau; at step 0 (SFT never beat the start) the start itself.
    start = student if step == 0 else long_dir / "checkpoints" / f"step_{step:06d}" / "model"
    if not start.is_dir():
        raise FileNotFoundError(f"no checkpoint at the plateau (step {step}): {start}")
    at["checkpoint"] = str(start)
    # From the plateau: fresh teacher samples (another sampling seed) vs on-policy distillation.
    out = SETUP.out / "plateau" / "from_plateau"
    distill_lr = chosen(load_results()["sweep"])["distill"]
    more_sft, written2 = run_config("sft", lr, True, 7, paths["test"], start, teacher, steps=p["more_steps"])
    distill, _ = run_config("distill", distill_lr["lr"], distill_lr["clip"], 7, paths["test"], start, teacher,
                            steps=p["more_steps"])
    groups = {"more sft": [train_once(more_sft, out / "more_sft")], "distill": [train_once(distill, out / "distill")]}
    comparison = compare_runs(groups, out, extra_seconds={"more sft": written2["seconds"]})
    return {"sft_lr": lr, "long_run": facts, "plateau": at, "data_seconds": written["seconds"],
            "from_plateau": comparison}


# ----------------------------------------------------------------------------------------------


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["facts", "sweep", "seeds", "long", "plateau", "write"])
    parser.add_argument("--task", choices=sorted(SETUPS), default="demo",
                        help="demo: the demo's arithmetic (results/blog_claims.json); sums: issue 31 item 3's task")
    parser.add_argument("--methods", default="sft,distill,rl")
    parser.add_argument("--seeds", default="1,2")
    args = parser.parse_args()
    global SETUP
    SETUP = SETUPS[args.task]
    command = " ".join(["OMP_NUM_THREADS=1 .venv/bin/python experiments/blog_claims.py", *sys.argv[1:]])
    started = time.time()
    if args.stage == "facts":
        save("facts", facts(), command, started)
    elif args.stage == "sweep":
        save("sweep", sweep(args.methods.split(",")), command, started)
    elif args.stage == "seeds":
        previous = load_results().get("seeds", {}).get("per_seed", {})
        result = seeds([int(s) for s in args.seeds.split(",")])
        result["per_seed"] = {**previous, **{str(k): v for k, v in result["per_seed"].items()}}
        previous_runs = load_results().get("seeds", {}).get("runs", {})
        result["runs"] = {**previous_runs, **{str(k): v for k, v in result["runs"].items()}}
        save("seeds", result, command, started)
    elif args.stage == "long":
        # One seed, a longer budget: do the methods separate given more steps? Saved after each
        # method (distillation first), so a cut-short stage keeps what it finished.
        order = ["distill", "rl", "sft"]
        for i in range(1, len(order) + 1):
            result = seeds([int(s) for s in args.seeds.split(",")], steps=LONG["steps"], every=LONG["every"],
                           folder="long", methods=order[:i])
            save("long", {**result, "steps": LONG["steps"]}, command, started)
    elif args.stage == "plateau":
        save("plateau", plateau(), command, started)
    else:
        from blog_claims_write import write
        write({name: load_results(setup) for name, setup in SETUPS.items()}, HERE / "RESULTS_blog_claims.md")


if __name__ == "__main__":
    main()
