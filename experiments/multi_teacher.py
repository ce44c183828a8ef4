"""Two skills from two specialist teachers into one student, against learning them in turn and
against one teacher for both.

    .venv/bin/python experiments/multi_teacher.py --seeds 3            # the full experiment
    .venv/bin/python experiments/multi_teacher.py --seeds 1 --quick    # a small budget (checks the path)

The skills are two arithmetic tasks the tiny tokenizer already handles: `add` (two + or - steps on
one-digit operands) and `mul` (two * steps). From one student start (a tiny Llama given a short SFT
on both), every arm runs `opd distill` with the exact reverse KL for the same number of steps:

* routed:     teachers {add: the add specialist, mul: the mul specialist}; data.sources mix the two
              skills 1 : 1 and route each prompt to its specialist (opd.teacher.router);
* sequential: the add specialist on add prompts for half the steps, then the mul specialist on
              mul prompts for the other half (from the first half's model): forgetting shows as the
              add accuracy falling in the second half;
* one:        one generalist teacher (the same shape, SFT on both skills for as many steps as the
              two specialists together) on the same 1 : 1 mix.

Every model is measured the same way at half and at all of the steps (the checkpoints), by `opd
eval`'s evaluate_config on each skill's held-out prompts (sampled pass@1, its own seed). The
teachers and the student start are built once and cached under $OPD_CACHE. Results go to
experiments/results/multi_teacher.json and experiments/RESULTS_multi_teacher.md (generated, never
edited by hand).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from rich.console import Console

from opd.cli.demo import environment
from opd.compare import cached_model
from opd.config import TaskConfig, load_config
from opd.eval_command import evaluate_config
from opd.tasks import make_records

HERE = Path(__file__).parent
console = Console()
SKILLS = {"add": {"digits": 1, "operations": 2, "operators": "+-"},
          "mul": {"digits": 1, "operations": 2, "operators": "*"}}
FULL = {"hidden": 96, "teacher_steps": 600, "start_steps": 120, "steps": 80, "lr": 5e-4, "train_size": 900,
        "eval_size": 64}
QUICK = {"hidden": 48, "teacher_steps": 150, "start_steps": 40, "steps": 12, "lr": 5e-4, "train_size": 300,
         "eval_size": 24}


def write_skill_files(root: Path, budget: dict) -> dict[str, dict[str, Path]]:
    """Each skill's train and eval records as JSONL (the train records hold reference solutions,
    which SFT builds the teachers from), and both skills' train records together."""
    root.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Path]] = {}
    mixed = []
    for name, arithmetic in SKILLS.items():
        task = TaskConfig(name="arithmetic", train_size=budget["train_size"], eval_size=budget["eval_size"],
                          arithmetic=arithmetic)
        files[name] = {}
        for split in ("train", "eval"):
            records = make_records(task, split)
            path = root / f"{name}_{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
            files[name][split] = path
            if split == "train":
                mixed += records
    mixed_path = root / "both_train.jsonl"
    mixed_path.write_text("".join(json.dumps(r) + "\n" for r in sorted(mixed, key=json.dumps)))
    files["both"] = {"train": mixed_path}
    return files


def sft_build(data: Path, seed: int, steps: int, hidden: int) -> dict:
    return {"method": "sft", "run_dir": "unused", "student": {"tiny": {"hidden_size": hidden, "num_layers": 2,
                                                                        "seed": seed}},
            "data": {"completions": str(data), "eval_holdout": 16}, "sampling": {"max_new_tokens": 40},
            "optim": {"lr": 3e-3, "warmup_steps": 20, "schedule": "cosine", "min_lr_ratio": 0.1},
            "train": {"steps": steps, "prompts_per_step": 32, "micro_batch_size": 32},
            "eval": {"samples_per_prompt": 1, "max_new_tokens": 40, "every": 0},
            "log": {"progress": False, "tensorboard": False}, "checkpoint": {"every": 0}}


def build_models(files: dict, budget: dict) -> dict[str, Path]:
    """The two specialists, the generalist (both skills, as many steps as the two together) and the
    student start (both skills, briefly), cached."""
    hidden, steps = budget["hidden"], budget["teacher_steps"]
    builds = {"add": sft_build(files["add"]["train"], 0, steps, hidden),
              "mul": sft_build(files["mul"]["train"], 0, steps, hidden),
              "both": sft_build(files["both"]["train"], 0, 2 * steps, hidden),
              "start": sft_build(files["both"]["train"], 1, budget["start_steps"], hidden)}
    return {name: cached_model(load_config(None, [], base=tree), console, f"the {name} model")[0]
            for name, tree in builds.items()}


def source(files: dict, skill: str, teacher: str) -> dict:
    return {"name": skill, "prompts": str(files[skill]["train"]), "eval_prompts": str(files[skill]["eval"]),
            "teacher": teacher}


def distill_tree(run_dir: Path, student: Path, teachers: dict[str, Path], sources: list[dict], steps: int,
                 seed: int, lr: float = 5e-4) -> dict:
    return {"method": "distill", "run_dir": str(run_dir), "student": {"path": str(student)},
            "teachers": {name: {"path": str(path)} for name, path in teachers.items()},
            "data": {"sources": sources}, "loss": {"kind": "reverse_kl"},
            "sampling": {"samples_per_prompt": 4, "max_new_tokens": 40},
            "optim": {"lr": lr, "warmup_steps": 5, "schedule": "constant"},
            "train": {"steps": steps, "prompts_per_step": 8, "micro_batch_size": 32, "seed": seed},
            "eval": {"samples_per_prompt": 1, "max_new_tokens": 40, "every": 0, "teacher_accuracy": False},
            "log": {"progress": False, "tensorboard": False, "rollouts_every": 0},
            "checkpoint": {"every": max(steps // 2, 1), "keep_last": 2}}


REUSED: list[str] = []  # runs found already trained under --out (their time is not in this invocation's)


def train_tree(tree: dict) -> None:
    from opd.loop import train

    if not (Path(tree["run_dir"]) / "summary.json").is_file():
        train(load_config(None, [], base=tree), console=console)
    else:
        REUSED.append(tree["run_dir"])


def checkpoint_model(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}" / "model"


def measure(files: dict, models: dict, model_dir: Path, seed: int) -> dict[str, float]:
    """Each skill's held-out accuracy of the model at model_dir, measured alike for every arm: the
    model as the student of a config whose sources are the two skills (no teacher is loaded:
    method rl without teachers only grades)."""
    tree = distill_tree(Path("unused"), model_dir, {}, [source(files, "add", "add"), source(files, "mul", "mul")],
                        1, seed)
    tree.update(method="rl", teachers={}, loss={"kind": "sampled_reverse_kl"})
    tree["data"]["sources"] = [{k: v for k, v in s.items() if k != "teacher"} for s in tree["data"]["sources"]]
    sets = evaluate_config(load_config(None, [], base=tree), None, [], str(model_dir))["sets"]
    return {skill: sets[skill]["accuracy"] for skill in SKILLS}


def kl_trend(run_dir: Path, window: int = 10) -> dict[str, list[float]]:
    """The training teacher KL (overall and per teacher) as the mean of the first and of the last
    `window` steps: whether the student moved toward its teachers at all."""
    from opd.run_dir import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("step", 0) > 0 and "teacher_kl" in r]
    keys = [k for k in rows[0] if k == "teacher_kl" or k.startswith("teacher_kl/")] if rows else []
    return {k: [statistics.mean(r[k] for r in rows[:window]), statistics.mean(r[k] for r in rows[-window:])]
            for k in keys}


def run_seed(out: Path, files: dict, models: dict, budget: dict, seed: int) -> dict:
    steps, lr = budget["steps"], budget["lr"]
    half = steps // 2
    both = [source(files, "add", "add"), source(files, "mul", "mul")]
    arms = {
        "routed": [distill_tree(out / "routed", models["start"], {"add": models["add"], "mul": models["mul"]},
                                both, steps, seed, lr)],
        "one": [distill_tree(out / "one", models["start"], {"both": models["both"]},
                             [{**s, "teacher": "both"} for s in both], steps, seed, lr)],
    }
    first = distill_tree(out / "sequential_add", models["start"], {"add": models["add"]},
                         [source(files, "add", "add")], half, seed, lr)
    second = distill_tree(out / "sequential_mul", checkpoint_model(out / "sequential_add", half),
                          {"mul": models["mul"]}, [source(files, "mul", "mul")], steps - half, seed, lr)
    results = {"start": measure(files, models, models["start"], seed)}
    for name, trees in arms.items():
        train_tree(trees[0])
        run_dir = Path(trees[0]["run_dir"])
        results[name] = {"half": measure(files, models, checkpoint_model(run_dir, half), seed),
                         "end": measure(files, models, checkpoint_model(run_dir, steps), seed),
                         "kl": kl_trend(run_dir)}
    train_tree(first)
    train_tree(second)
    results["sequential"] = {"half": measure(files, models, checkpoint_model(out / "sequential_add", half), seed),
                             "end": measure(files, models, checkpoint_model(out / "sequential_mul", steps - half),
                                            seed),
                             "kl": {f"{k} ({part})": v for part in ("add", "mul")
                                    for k, v in kl_trend(out / f"sequential_{part}").items()}}
    for name in ("add", "mul", "both"):
        results[f"teacher_{name}"] = measure(files, models, models[name], seed)
    return results


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def write_results(per_seed: list[dict], budget: dict, command: str, seconds: float, tag: str = "",
                  generated: str | None = None) -> None:
    (HERE / "results").mkdir(exist_ok=True)
    record = {"per_seed": per_seed, "budget": budget, "command": command, "seconds": seconds,
              "environment": environment(), "machine": platform.machine()}
    (HERE / "results" / f"multi_teacher{tag}.json").write_text(json.dumps(record, indent=1) + "\n")
    generated = generated or (
        f"Generated by `{command}` ({len(per_seed)} seed(s), {seconds / 60:.0f} min"
        + (f" measuring {len(REUSED)} runs trained by an earlier invocation" if REUSED else "") + f", {budget}); "
        f"do not edit. Sampled pass@1 on each skill's held-out prompts, mean ± sd over seeds.")
    lines = ["# Several teachers: two skills into one student", "", generated, "",
             "| model | step | add | mul |", "|---|---|---|---|"]
    for name in ("teacher_add", "teacher_mul", "teacher_both", "start"):
        lines.append(f"| {name} | - | {mean_sd([r[name]['add'] for r in per_seed])} | "
                     f"{mean_sd([r[name]['mul'] for r in per_seed])} |")
    steps = budget["steps"]
    for arm in ("routed", "sequential", "one"):
        for at, step in (("half", steps // 2), ("end", steps)):
            lines.append(f"| {arm} | {step} | {mean_sd([r[arm][at]['add'] for r in per_seed])} | "
                         f"{mean_sd([r[arm][at]['mul'] for r in per_seed])} |")
    has_kl = any(r[arm].get("kl") for r in per_seed for arm in ("routed", "sequential", "one"))
    if has_kl:  # (results of an earlier version of this script have no KL trend)
        lines += ["", "Training teacher KL (nats per token), mean of the first 10 and of the last 10 steps of each "
                  "arm (sequential: each half), mean over seeds:", "", "| arm | KL | first 10 steps | last 10 steps |",
                  "|---|---|---|---|"]
    for arm in ("routed", "sequential", "one"):
        for key in per_seed[0][arm].get("kl", {}):
            first = statistics.mean(r[arm]["kl"][key][0] for r in per_seed)
            last = statistics.mean(r[arm]["kl"][key][1] for r in per_seed)
            lines.append(f"| {arm} | {key} | {first:.3f} | {last:.3f} |")
    lines += ["", *reading(per_seed, budget, has_kl)]
    (HERE / f"RESULTS_multi_teacher{tag}.md").write_text("\n".join(lines) + "\n")


def reading(per_seed: list[dict], budget: dict, has_kl: bool) -> list[str]:
    """What the table shows, written from its figures: how far each arm got, and what each skill
    kept while the other was learnt (forgetting)."""
    mean = lambda model, at, skill: statistics.mean(  # noqa: E731
        (r[model][at] if at else r[model])[skill] for r in per_seed)
    steps, half = budget["steps"], budget["steps"] // 2
    eval_size = budget["eval_size"]
    # the binomial standard error of one evaluation at the start's accuracy: what a difference must beat
    p = max(mean("start", None, "add"), mean("start", None, "mul"))
    noise = (p * (1 - p) / eval_size) ** 0.5
    ends = {arm: (mean(arm, "end", "add"), mean(arm, "end", "mul")) for arm in ("routed", "sequential", "one")}
    text = (f"Reading: the specialist teachers score {mean('teacher_add', None, 'add'):.3f} (add) and "
            f"{mean('teacher_mul', None, 'mul'):.3f} (mul), the student starts at {mean('start', None, 'add'):.3f} / "
            f"{mean('start', None, 'mul'):.3f}; after {steps} steps the arms end at "
            + ", ".join(f"{arm} {a:.3f} / {m:.3f}" for arm, (a, m) in ends.items())
            + f" (add / mul). One evaluation of {eval_size} prompts has a standard error of about {noise:.3f} "
            f"here. Forgetting: the sequential student's add accuracy went from "
            f"{mean('sequential', 'half', 'add'):.3f} after its add phase (step {half}) to "
            f"{mean('sequential', 'end', 'add'):.3f} after the mul phase, while its mul went "
            f"{mean('sequential', 'half', 'mul'):.3f} -> {mean('sequential', 'end', 'mul'):.3f}; the routed student, "
            f"trained on both at once, went {mean('routed', 'half', 'add'):.3f} -> {mean('routed', 'end', 'add'):.3f} "
            f"(add) and {mean('routed', 'half', 'mul'):.3f} -> {mean('routed', 'end', 'mul'):.3f} (mul) over the same "
            f"steps.")
    drops = [f"{arm} {skill} {mean(arm, 'half', skill):.3f} -> {mean(arm, 'end', skill):.3f}"
             for arm in ("routed", "sequential", "one") for skill in ("add", "mul")
             if mean(arm, "half", skill) - mean(arm, "end", skill) > 2 * noise]
    text += (f" Falls of more than two standard errors from step {half} to {steps}: "
             + ("; ".join(drops) if drops else "none") + ".")
    text += (" At this budget the students stay far below their teachers: the experiment shows the routing running"
             + (" and each teacher's KL falling (second table)" if has_kl else "")
             + ", not yet which arm keeps both skills best.")
    return [text]


def write_only(tag: str) -> None:
    """Rewrite RESULTS_multi_teacher<tag>.md from its saved results (no training)."""
    record = json.loads((HERE / "results" / f"multi_teacher{tag}.json").read_text())
    # the run's own header line (its command, time and budget) is kept as it was written
    header = [line for line in (HERE / f"RESULTS_multi_teacher{tag}.md").read_text().splitlines()
              if line.startswith("Generated by")]
    write_results(record["per_seed"], record["budget"], record["command"], record["seconds"], tag,
                  header[0] if header else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a small budget: checks the path, not the result")
    parser.add_argument("--out", type=Path, default=Path("runs/experiments/multi_teacher"))
    parser.add_argument("--steps", type=int, help="distillation steps per arm (default: the budget's)")
    parser.add_argument("--lr", type=float, help="distillation learning rate (default: the budget's)")
    parser.add_argument("--tag", default="", help="results go to multi_teacher<tag>.json / RESULTS_multi_teacher<tag>.md")
    parser.add_argument("--write-only", action="store_true", help="rewrite the results file from its saved JSON")
    args = parser.parse_args()
    if args.write_only:
        return write_only(args.tag)
    budget = dict(QUICK if args.quick else FULL)
    budget.update({k: v for k, v in (("steps", args.steps), ("lr", args.lr)) if v is not None})
    started = time.time()
    files = write_skill_files(args.out / "data", budget)
    models = build_models(files, budget)
    per_seed = []
    for seed in range(args.seeds):
        per_seed.append(run_seed(args.out / f"seed_{seed}", files, models, budget, seed))
        console.print(f"seed {seed}: {json.dumps(per_seed[-1])}")
    command = f"experiments/multi_teacher.py --seeds {args.seeds}" + (" --quick" if args.quick else "") + \
        (f" --steps {args.steps}" if args.steps else "") + (f" --lr {args.lr}" if args.lr else "") + \
        (f" --tag {args.tag}" if args.tag else "")
    write_results(per_seed, budget, command, time.time() - started, args.tag)


if __name__ == "__main__":
    main()
