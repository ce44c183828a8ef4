"""Small-scale checks of the blog's claims that compare methods from one student start, over seeds.

    .venv/bin/python experiments/compare_methods.py rl_vs_distill  --seeds 3
    .venv/bin/python experiments/compare_methods.py sft_vs_distill --seeds 3
    .venv/bin/python experiments/compare_methods.py single_prompt  --seeds 3
    .venv/bin/python experiments/compare_methods.py lora_vs_full   --seeds 3

Every experiment starts from the demo's student and teacher (opd/cli/demo.py: tiny Llamas trained
on the arithmetic task, cached under $OPD_CACHE) and varies `train.seed` (sampling, data order).
Each seed's runs go to runs/experiments/<experiment>/seed_<n>/ (with report.html); the figures,
their mean and spread over seeds, the command and the machine go to
experiments/results/<experiment>.json, from which experiments/RESULTS.md's tables are written
(`experiments/write_results.py`). Nothing is entered by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console

from opd.cli.demo import STUDENT_BUILD, TEACHER_BUILD, demo_recipe, environment, method_config
from opd.compare import add_common_target, cached_model, model_accuracy, run_comparison, sft_on_teacher_samples
from opd.config import load_config
from opd.report import build_comparison_report

RESULTS = Path(__file__).parent / "results"
console = Console()


def demo_models() -> tuple[Path, Path]:
    teacher, _ = cached_model(load_config(None, [], base=TEACHER_BUILD), console, "the demo teacher")
    student, _ = cached_model(load_config(None, [], base=STUDENT_BUILD), console, "the demo student start")
    return teacher, student


# ----------------------------------------------------------------------------------------------
# The experiments: each returns (teacher accuracy, {name: config}, extra seconds per run)


def budget(steps: int, seed: int) -> list[str]:
    """Overrides every run of an experiment shares: its length, its seed, ten evaluations."""
    return [f"train.steps={steps}", f"train.seed={seed}", f"eval.every={max(steps // 10, 1)}"]


def rl_vs_distill(seed: int, steps: int):
    """The blog's matched setting: RL trains the student start into a teacher; on-policy
    distillation from that teacher, back into the same start, is timed against the RL run itself
    (a fresh RL run with another seed, so the curve is not the teacher's own)."""
    _, student = demo_models()
    rl_teacher, _ = cached_model(method_config("rl", student, None, budget(2 * steps, seed=1000)), console,
                                 "the RL-trained teacher")
    runs = {"rl": method_config("rl", student, rl_teacher, budget(2 * steps, seed)),
            "distill": method_config("distill", student, rl_teacher, budget(steps, seed))}
    return model_accuracy(runs["distill"], runs["distill"].teacher), runs, {}


def sft_vs_distill(seed: int, steps: int):
    """SFT on teacher samples (off-policy distillation) vs on-policy distillation from the same
    start, to the same accuracy: FLOPs with the SFT data given, and with its sampling paid."""
    teacher, student = demo_models()
    sft, written = sft_on_teacher_samples(method_config("sft", student, teacher, budget(steps, seed)), console)
    runs = {"distill": method_config("distill", student, teacher, budget(steps, seed)), "sft": sft}
    return model_accuracy(runs["distill"], runs["distill"].teacher), runs, {"sft": written["seconds"]}


def single_prompt(seed: int, steps: int):
    """One training prompt, 20 steps x 64 samples, evaluated on the held-out problems (blog: a
    single prompt trained 20 steps x 256 samples nearly matches the teacher), next to the demo's
    distillation (16 prompts x 4 samples per step) for the same steps and sequences."""
    teacher, student = demo_models()
    every = ["eval.every=2", f"train.steps={steps}", f"train.seed={seed}"]
    one_prompt = ["task.train_size=1", "train.prompts_per_step=1", "sampling.samples_per_prompt=64"]
    runs = {"distill (1 prompt)": method_config("distill", student, teacher, [*every, *one_prompt]),
            "distill (16 prompts x 4)": method_config("distill", student, teacher, every)}
    return model_accuracy(runs["distill (1 prompt)"], runs["distill (1 prompt)"].teacher), runs, {}


def lora_vs_full(seed: int, steps: int):
    """Full fine-tuning vs LoRA (rank 8), after SFT on teacher samples and after on-policy
    distillation (blog: the gap shrinks from 13 points after SFT to 6 after distillation)."""
    teacher, student = demo_models()
    lora = {"student": {"lora": {"rank": 8, "alpha": 16}}, "optim": {"lr": 3e-3}}
    sft_full, written = sft_on_teacher_samples(method_config("sft", student, teacher, budget(steps, seed)), console)
    sft_lora, _ = sft_on_teacher_samples(method_config("sft", student, teacher, budget(steps, seed), lora), console)
    runs = {"sft full": sft_full, "sft lora": sft_lora,
            "distill full": method_config("distill", student, teacher, budget(steps, seed)),
            "distill lora": method_config("distill", student, teacher, budget(steps, seed), lora)}
    return (model_accuracy(runs["distill full"], runs["distill full"].teacher), runs,
            {"sft full": written["seconds"], "sft lora": written["seconds"]})


EXPERIMENTS = {"rl_vs_distill": (rl_vs_distill, 150), "sft_vs_distill": (sft_vs_distill, 150),
               "single_prompt": (single_prompt, 20), "lora_vs_full": (lora_vs_full, 150)}


def spread(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: the experiment's)")
    parser.add_argument("--out", type=Path, default=Path("runs/experiments"))
    parser.add_argument("--summarize-only", action="store_true",
                        help="train nothing: rewrite the results file from the seeds' comparison.json already in --out")
    args = parser.parse_args()
    build, default_steps = EXPERIMENTS[args.experiment]
    steps = args.steps or default_steps

    per_seed = []
    started = time.time()
    for seed in range(args.seeds):
        out = args.out / args.experiment / f"seed_{seed}"
        if args.summarize_only:
            comparison = json.loads((out / "comparison.json").read_text())
            comparison["common_target"] = add_common_target(comparison["table"])  # recomputed from the runs' files
        else:
            teacher_accuracy, runs, extra = build(seed, steps)
            comparison = run_comparison(out, runs, teacher_accuracy, extra_seconds=extra, console=console)
            build_comparison_report(out)
        per_seed.append(comparison)
        console.print(f"seed {seed}: " + ", ".join(
            f"{r['method']} final {r['final_accuracy']:.3f} reached at {r['steps_to_target']}" for r in comparison["table"]))

    names = [r["method"] for r in per_seed[0]["table"]]
    rows = {name: [next(r for r in c["table"] if r["method"] == name) for c in per_seed] for name in names}
    fields = ("start_accuracy", "final_accuracy", "best_accuracy", "steps_to_target", "flops_to_target",
              "flops_with_data_to_target", "steps_to_common", "flops_to_common", "flops_with_data_to_common",
              "flops_total", "flops_total_with_data", "wall_s")
    previous = json.loads((RESULTS / f"{args.experiment}.json").read_text()) if args.summarize_only else {}
    command = " ".join([".venv/bin/python", "experiments/compare_methods.py",
                        *(a for a in sys.argv[1:] if a != "--summarize-only")])
    summary = {
        "experiment": args.experiment,
        # a summary of runs made earlier keeps the command, machine and time of the run that made them
        "command": previous.get("command", command),
        "machine": previous.get("machine", {"platform": platform.platform(), "cpus": os.cpu_count(),
                                            "torch": torch.__version__, "threads": torch.get_num_threads()}),
        "seconds": previous.get("seconds", time.time() - started),
        # what RESULTS.md's setting is checked against (experiments/write_results.py); a summary of
        # older runs keeps what they recorded (nothing, before recipes were kept)
        "recipe": previous.get("recipe") if args.summarize_only else demo_recipe(),
        "environment": previous.get("environment") if args.summarize_only else environment(),
        "teacher_accuracy": spread([c["teacher_accuracy"] for c in per_seed]),
        "target_fraction": per_seed[0]["target_fraction"],
        "common_target": spread([c["common_target"] for c in per_seed]),
        "methods": {name: {
            **{f: spread([r[f] for r in rows[name]]) for f in fields},
            "reached": sum(r["steps_to_target"] is not None for r in rows[name]),
        } for name in names},
        "seeds": per_seed,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.experiment}.json").write_text(json.dumps(summary, indent=2))
    console.print(f"wrote {RESULTS / (args.experiment + '.json')}")


if __name__ == "__main__":
    main()
