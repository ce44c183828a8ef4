"""Writes the measured tables of experiments/RESULTS.md from experiments/results/*.json.

    .venv/bin/python experiments/write_results.py

RESULTS.md keeps its hand-written text (what each experiment asks, what we found, where it differs
from the blog); only the blocks between `<!-- results:NAME -->` and `<!-- /results:NAME -->` are
replaced, with tables built from the JSON that the experiment scripts wrote. No figure is typed in.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # run from a source tree: the opd beside this folder
# The demo's own start and teacher figures: the file whose step-0 row of every method is the demo's.
SETTING_SOURCE = "sft_vs_distill"


def _pm(stat: dict, spec: str = ".3f") -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:{spec}} ± {stat['std']:{spec}}"


def comparison_block(result: dict) -> str:
    """A compare_methods.py result: accuracy per method, then the steps and FLOPs to two targets
    (95% of the teacher; the highest accuracy every method reached, seed by seed)."""
    seeds = len(result["seeds"])
    # one method alone: its "common accuracy" would only be its own best
    common = result.get("common_target") if len(result["methods"]) > 1 else None
    lines = [
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs, torch "
        f"{result['machine']['torch']}, {result['machine']['threads']} threads; {result['seconds'] / 60:.1f} min "
        f"for {seeds} seeds.  ",
        f"Teacher accuracy {_pm(result['teacher_accuracy'])}; target = {result['target_fraction']:.0%} of it"
        + (f"; common accuracy (the highest every method reached) {_pm(common)}" if common else "") + ". "
        f"Mean ± std over {seeds} seeds; steps and FLOPs to a target are over the seeds that reached it.",
        "",
        "| method | start | final | best | reached target (seeds) | FLOPs in all | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in result["methods"].items():
        lines.append(f"| {name} | {_pm(m['start_accuracy'])} | {_pm(m['final_accuracy'])} | "
                     f"{_pm(m['best_accuracy'])} | {m['reached']}/{seeds} | {_pm(m['flops_total'], '.2e')} | "
                     f"{_pm(m['wall_s'], '.0f')} |")
    targets = [("target", "95% of the teacher")] + ([("common", "the common accuracy")] if common else [])
    # The blog states its claims as ratios against on-policy distillation: steps, FLOPs with the data
    # given, FLOPs with its sampling paid (ratios of the means over seeds).
    baseline = next((m for name, m in result["methods"].items() if name.startswith("distill")), None)

    def ratio(m: dict, key: str) -> str:
        mine, theirs = m.get(key, {}).get("mean"), (baseline or {}).get(key, {}).get("mean")
        return f"{mine / theirs:.2f}" if mine and theirs else "–"

    lines += ["", "| method | to | steps | FLOPs | FLOPs, data paid | ÷ distill's: steps / FLOPs / FLOPs, data paid |",
              "|---|---|---|---|---|---|"]
    for name, m in result["methods"].items():
        for suffix, label in targets:
            if f"steps_to_{suffix}" in m:
                keys = (f"steps_to_{suffix}", f"flops_to_{suffix}", f"flops_with_data_to_{suffix}")
                lines.append(f"| {name} | {label} | {_pm(m[keys[0]], '.0f')} | {_pm(m[keys[1]], '.2e')} | "
                             f"{_pm(m[keys[2]], '.2e')} | {' / '.join(ratio(m, k) for k in keys)} |")
    if result["experiment"] == "lora_vs_full":
        lines += ["", lora_gap_line(result)]
    return "\n".join(lines)


def lora_gap_line(result: dict) -> str:
    """Full fine-tuning's final accuracy minus LoRA's, paired seed by seed (blog: 13 points after
    SFT, 6 after distillation)."""
    gaps = {}
    for family in ("sft", "distill"):
        per_seed = []
        for seed in result["seeds"]:
            final = {r["method"]: r["final_accuracy"] for r in seed["table"]}
            per_seed.append(final[f"{family} full"] - final[f"{family} lora"])
        mean = statistics.fmean(per_seed)
        std = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
        gaps[family] = f"{100 * mean:+.1f} ± {100 * std:.1f} points"
    return (f"Full minus LoRA, final accuracy, paired by seed: after SFT {gaps['sft']}, after distillation "
            f"{gaps['distill']} (blog: 13 and 6 points).")


def stages_block(result: dict) -> str:
    """A forgetting_recovery.py result: instruction following and knowledge after each stage."""
    seeds = len(result["per_seed"])
    lines = [f"Command: `{result['command']}`  ", f"Machine: {json.dumps(result.get('machine', {}))}  ",
             f"Model: {result['model']}; mean ± std over {seeds} seed(s).", "",
             "| stage | instruction following (prompt-level) | instruction-level | knowledge QA |", "|---|---|---|---|"]
    for stage, m in result["summary"].items():
        lines.append(f"| {stage} | {_pm(m['instruction'])} | {_pm(m.get('instruction_level'))} | {_pm(m['knowledge'])} |")
    return "\n".join(lines)


def recipe_differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys where a result's recorded demo recipe differs from the code's."""
    out = []
    for key in sorted(recorded.keys() | current.keys()):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += recipe_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a} recorded, {b} in the code)")
    return out


def check_recipes(results: dict[str, dict], current: dict) -> list[str]:
    """Every result that recorded the demo's recipe must have the code's (else RESULTS.md would state
    a setting that did not produce its figures). Returns the results that recorded none."""
    unrecorded = []
    for name, result in results.items():
        if not result.get("recipe"):
            unrecorded.append(name)
            continue
        differences = recipe_differences(result["recipe"], current)
        if differences:
            raise SystemExit(f"experiments/results/{name}.json was made with another demo recipe than "
                             f"opd/cli/demo.py's: {'; '.join(differences)}. Rerun the experiment (or restore the "
                             f"recipe) before writing RESULTS.md")
    return unrecorded


def setting_block(recipe: dict, source: dict | None, unrecorded: list[str]) -> str:
    """The demo's setting as RESULTS.md states it, from opd/cli/demo.py's recipe (demo_recipe) and,
    for the student start's and teacher's accuracy, from the results file that measured them."""
    task, arithmetic = recipe["task"], recipe["task"]["arithmetic"]
    teacher, student = recipe["teacher"], recipe["student_start"]
    measured = ""
    if source is not None:
        start = source["methods"][next(iter(source["methods"]))]["start_accuracy"]["mean"]
        measured = (f" (held-out accuracy {start:.3f} against the teacher's {source['teacher_accuracy']['mean']:.3f}, "
                    f"in `results/{SETTING_SOURCE}.json`)")
    lines = [
        f"- **Task:** held-out arithmetic, {arithmetic['operations']} operations (`{arithmetic['operators']}`) on "
        f"{arithmetic['digits']}-digit operands worked left to right with a written chain of thought; "
        f"{task['train_size']} training problems.",
        "- **Models:**",
        f"  - The teacher is a {teacher['hidden_size']}-wide, {teacher['num_layers']}-layer Llama trained by SFT "
        f"for {teacher['steps']:,} steps (lr {teacher['lr']:g}, cosine decay).",
        f"  - The student start has the same shape and is trained for {student['steps']:,} steps, also with cosine "
        f"decay{measured}.",
        f"- **Accuracy:** sampled pass@1 (temperature 1) on {task['eval_size']} held-out problems × "
        f"{recipe['eval']['samples_per_prompt']} samples.",
        f"- **The methods:** {recipe['steps']} steps each; learning rates "
        + ", ".join(f"{name} {lr:g}" for name, lr in recipe["lr"].items())
        + f". The tiny tokenizer's fingerprint is `{recipe['tokenizer_sha256']}` (`opd.cli.demo.demo_recipe`): "
        "the `tokenizers` library trains it, so another version can give other merges, other models and other "
        "figures; so can another torch or transformers, or a GPU (`train.device: auto` trains the builds on "
        "CUDA, with other kernels and another random stream). `opd demo` writes its recipe and library versions "
        "into `comparison.json`, to compare with these.",
    ]
    if unrecorded:
        lines.append(f"- Made before results recorded their recipe, so not checked against it automatically: "
                     f"{', '.join(unrecorded)} (rerunning an experiment records it).")
    return "\n".join(lines)


def expected_setting() -> str:
    """The setting block for the current code and results (also what tests/docs/test_results_doc.py checks)."""
    from opd.cli.demo import demo_recipe

    results = {f.stem: json.loads(f.read_text()) for f in sorted((HERE / "results").glob("*.json"))}
    comparisons = {name: r for name, r in results.items() if "methods" in r}  # the demo-based experiments
    unrecorded = check_recipes(comparisons, demo_recipe())
    return setting_block(demo_recipe(), results.get(SETTING_SOURCE), unrecorded)


def replace_block(text: str, name: str, block: str) -> str:
    pattern = re.compile(rf"(<!-- results:{re.escape(name)} -->\n).*?(<!-- /results:{re.escape(name)} -->)", re.S)
    if not pattern.search(text):
        print(f"RESULTS.md has no block for {name}; add <!-- results:{name} --><!-- /results:{name} -->")
        return text
    return pattern.sub(lambda m: m.group(1) + block + "\n" + m.group(2), text)


def main() -> None:
    path = HERE / "RESULTS.md"
    text = replace_block(path.read_text(), "setting", expected_setting())
    for result_file in sorted((HERE / "results").glob("*.json")):
        result = json.loads(result_file.read_text())
        block = comparison_block(result) if "methods" in result else stages_block(result)
        text = replace_block(text, result_file.stem, block)
    path.write_text(text)


if __name__ == "__main__":
    main()
