"""Step time vs train.max_staleness (0, 1, 2) on a tiny pair: how much sampling ahead overlaps.

    .venv/bin/python benchmarks/staleness.py [--steps 8] [--rounds 2] [--out benchmarks/RESULTS_staleness.md]

Each configuration is a real `opd.loop.train` distill run (no evaluation, one checkpoint at the
end): student Llama hidden 64 / 2 layers, teacher hidden 128 / 4 layers, 8 prompts x 4 samples,
64 new tokens, the HF sampler (its own copy of the student when staleness > 0). A step's time is
the increase of `wall_s_total` (sample + score + train, sync included; the sampling ahead runs
beside score and train); the figure is the median over the steps after the first max(2, k+1) (the
queue filling). The runs are alternated over `--rounds`, the order rotated, and every ratio is to
staleness 0 in the same run of this script: this machine's speed swings between runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from opd.config import load_config
from opd.loop import train
from opd.run_dir import read_metrics

PAIR = ["student.tiny.hidden_size=64", "student.tiny.num_layers=2", "student.tiny.seed=1",
        "teacher.tiny.hidden_size=128", "teacher.tiny.num_layers=4", "teacher.tiny.seed=2",
        "train.prompts_per_step=8", "sampling.samples_per_prompt=4", "sampling.max_new_tokens=64",
        "train.micro_batch_size=16", "eval.every=0", "log.progress=false", "log.tensorboard=false",
        "log.rollouts_every=0", "checkpoint.every=0"]
STALENESS = (0, 1, 2)


def one_run(root: Path, staleness: int, steps: int, name: str) -> dict:
    cfg = load_config(None, [f"run_dir={root / name}", *PAIR, f"train.steps={steps}",
                             f"train.max_staleness={staleness}"])
    train(cfg)
    rows = [r for r in read_metrics(root / name / "metrics.jsonl") if r.get("step", 0) >= 1 and "staleness" in r]
    walls = [b["wall_s_total"] - a["wall_s_total"] for a, b in zip([{"wall_s_total": 0.0}, *rows], rows)]
    warm = max(2, staleness + 1)
    return {"step_s": walls[warm:], "sample_s": [r["sample_s"] for r in rows[warm:]],
            "staleness_seen": sorted({r["staleness"] for r in rows})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS_staleness.md"))
    args = parser.parse_args()
    results = {k: {"step_s": [], "sample_s": [], "staleness_seen": []} for k in STALENESS}
    with tempfile.TemporaryDirectory(prefix="opd-bench-staleness-") as tmp:
        for round_ in range(args.rounds):
            order = STALENESS[round_ % 3:] + STALENESS[:round_ % 3]
            for k in order:
                out = one_run(Path(tmp), k, args.steps, f"s{k}-r{round_}")
                results[k]["step_s"] += out["step_s"]
                results[k]["sample_s"] += out["sample_s"]
                results[k]["staleness_seen"] = out["staleness_seen"]
    median = {k: statistics.median(results[k]["step_s"]) for k in STALENESS}
    lines = ["# Step time vs train.max_staleness (tiny pair, HF sampler)", "",
             f"`python benchmarks/staleness.py --steps {args.steps} --rounds {args.rounds}`; "
             f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
             f"{args.rounds} round(s) x {args.steps} steps per setting, alternated.", "",
             "| max_staleness | staleness seen | s/step, median (min-max) | sample_s (waiting for the batch) | x staleness 0 |",
             "|---|---|---|---|---|"]
    for k in STALENESS:
        s = results[k]["step_s"]
        lines.append(f"| {k} | {results[k]['staleness_seen']} | {median[k]:.3f} ({min(s):.3f}-{max(s):.3f}) | "
                     f"{statistics.median(results[k]['sample_s']):.3f} | {median[k] / median[0]:.2f} |")
    lines += ["", "Raw figures:", "", "```json", json.dumps(results, indent=None), "```", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines[:len(STALENESS) + 6]))


if __name__ == "__main__":
    main()
