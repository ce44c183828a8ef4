"""Writes the measured tables of experiments/RESULTS.md from experiments/results/*.json.

    .venv/bin/python experiments/write_results.py

RESULTS.md keeps its hand-written text (what each experiment asks, what we found, where it differs
from the blog); only the blocks between `<!-- results:NAME -->` and `<!-- /results:NAME -->` are
replaced, with tables built from the JSON that the experiment scripts wrote. No figure is typed in.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).parent


def _pm(stat: dict, spec: str = ".3f") -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:{spec}} ± {stat['std']:{spec}}"


def comparison_block(result: dict) -> str:
    """A compare_methods.py result: one row per method."""
    seeds = len(result["seeds"])
    lines = [
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs, torch "
        f"{result['machine']['torch']}, {result['machine']['threads']} threads; {result['seconds'] / 60:.1f} min "
        f"for {seeds} seeds.  ",
        f"Teacher accuracy {_pm(result['teacher_accuracy'])}; target = {result['target_fraction']:.0%} of it. "
        f"Mean ± std over {seeds} seeds; steps and FLOPs to the target are over the seeds that reached it.",
        "",
        "| method | start | final | best | reached (seeds) | steps to target | FLOPs to target | "
        "FLOPs to target, data paid | FLOPs in all | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in result["methods"].items():
        lines.append(
            f"| {name} | {_pm(m['start_accuracy'])} | {_pm(m['final_accuracy'])} | {_pm(m['best_accuracy'])} | "
            f"{m['reached']}/{seeds} | {_pm(m['steps_to_target'], '.0f')} | {_pm(m['flops_to_target'], '.2e')} | "
            f"{_pm(m['flops_with_data_to_target'], '.2e')} | {_pm(m['flops_total'], '.2e')} | {_pm(m['wall_s'], '.0f')} |")
    return "\n".join(lines)


def stages_block(result: dict) -> str:
    """A forgetting_recovery.py result: instruction following and knowledge after each stage."""
    seeds = len(result["per_seed"])
    lines = [f"Command: `{result['command']}`  ", f"Machine: {json.dumps(result.get('machine', {}))}  ",
             f"Model: {result['model']}; mean ± std over {seeds} seed(s).", "",
             "| stage | instruction following | knowledge QA |", "|---|---|---|"]
    for stage, m in result["summary"].items():
        lines.append(f"| {stage} | {_pm(m['instruction'])} | {_pm(m['knowledge'])} |")
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
