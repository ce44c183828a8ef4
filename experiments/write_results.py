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
from pathlib import Path

HERE = Path(__file__).parent


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


def main() -> None:
    path = HERE / "RESULTS.md"
    text = path.read_text()
    for result_file in sorted((HERE / "results").glob("*.json")):
        result = json.loads(result_file.read_text())
        block = comparison_block(result) if "methods" in result else stages_block(result)
        name = result_file.stem
        pattern = re.compile(rf"(<!-- results:{re.escape(name)} -->\n).*?(<!-- /results:{re.escape(name)} -->)", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m: m.group(1) + block + "\n" + m.group(2), text)
        else:
            print(f"RESULTS.md has no block for {name}; add <!-- results:{name} --><!-- /results:{name} -->")
    path.write_text(text)


if __name__ == "__main__":
    main()
