"""Several methods trained from one start under one budget, and compared: the machinery of
`opd demo` and of the experiments in experiments/.

    cached_model(cfg)            a run trained once and cached: returns its final model directory
    cached_teacher_samples(cfg)  teacher completions written once and cached (SFT's data)
    sft_on_teacher_samples(cfg)  an SFT config pointed at as many teacher completions as it trains on
    model_accuracy(cfg, model)   pass@1 of any model on cfg's eval prompts, with cfg's eval settings
    run_comparison(...)          each method's run in out_dir/<name>, then comparison.json and a table
    reach(rows, target)          the first evaluation at accuracy >= target: its step and FLOPs

Every method is evaluated on the same prompts with the same seed, so their start rows are equal and
their curves differ only by training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from opd.config import ModelConfig, RunConfig
from opd.models import cache_root

# Keys that do not change what a run computes: left out of cache keys.
_COSMETIC = ("run_dir", "log", "checkpoint")
TARGET_FRACTION = 0.95  # of the teacher's accuracy: what "reaching the teacher" means in a comparison


def config_key(cfg: RunConfig, *extra, only: tuple[str, ...] = ()) -> str:
    """A hash of everything that decides what a run computes (or of the sections `only`), and of
    the tiny tokenizer, which the code builds, so a change to it invalidates cached tiny models."""
    tree = {k: v for k, v in cfg.model_dump(mode="json").items()
            if k not in _COSMETIC and (not only or k in only)}
    tokenizer = ""
    if any(spec is not None and spec.tiny is not None for spec in (cfg.student, cfg.teacher)):
        from opd.tiny import _tokenizer_json

        tokenizer = hashlib.sha256(_tokenizer_json(768).encode()).hexdigest()
    return hashlib.sha256(json.dumps([tree, tokenizer, *extra], sort_keys=True).encode()).hexdigest()[:16]


def cached_model(cfg: RunConfig, console: Console | None = None, label: str = "") -> tuple[Path, dict]:
    """Train `cfg` once (its run_dir is ignored: the run lives under $OPD_CACHE/runs/<key>) and
    return (its final model directory, its summary). An interrupted build resumes from its last
    checkpoint the next time; a finished one is reused."""
    from opd.learner.checkpoint import latest_checkpoint
    from opd.loop import train

    console = console or Console()
    key = config_key(cfg)
    done = cache_root() / "runs" / key
    if not (done / "summary.json").is_file():
        partial = done.with_name(key + ".partial")
        resume = latest_checkpoint(partial) is not None
        if partial.exists() and not resume:
            shutil.rmtree(partial)
        console.print(f"building {label or cfg.method} ({'resuming' if resume else 'once, then cached'} in {partial})")
        run_cfg = cfg.model_copy(update={"run_dir": str(partial),
                                         "checkpoint": cfg.checkpoint.model_copy(update={"keep_last": 1})})
        summary = train(run_cfg, resume=resume, console=console)
        if summary["interrupted"]:
            raise KeyboardInterrupt
        os.replace(partial, done)
    summary = json.loads((done / "summary.json").read_text())
    return latest_checkpoint(done) / "model", summary


def cached_teacher_samples(cfg: RunConfig, console: Console | None = None) -> tuple[Path, dict]:
    """`opd sample` for cfg's training prompts, once: (the JSONL, what writing it cost)."""
    from opd.sample_command import write_teacher_samples

    console = console or Console()
    # What the samples depend on: not the student, nor how SFT will train on them.
    key = config_key(cfg, cfg.train.seed, only=("teacher", "task", "sampling", "data"))
    target = cache_root() / "samples" / f"{key}.jsonl"
    info_path = target.with_suffix(".json")
    if not info_path.is_file():
        console.print(f"the teacher writes SFT's data ({target}, once, then cached)")
        info = write_teacher_samples(cfg, target, "train", console=console)
        info_path.write_text(json.dumps(info))
    return target, json.loads(info_path.read_text())


def sft_on_teacher_samples(sft_cfg: RunConfig, console: Console | None = None) -> tuple[RunConfig, dict]:
    """`sft_cfg` training on teacher completions (off-policy distillation): the teacher answers as
    many training prompts, `sampling.samples_per_prompt` times each, as the run's steps consume.
    Returns the config with data.completions set, and what writing the samples cost."""
    per_prompt = sft_cfg.sampling.samples_per_prompt
    needed = -(-sft_cfg.train.steps * sft_cfg.train.prompts_per_step // per_prompt)  # ceiling
    samples, written = cached_teacher_samples(
        sft_cfg.model_copy(update={"task": sft_cfg.task.model_copy(update={"train_size": needed})}), console)
    return sft_cfg.model_copy(update={"data": sft_cfg.data.model_copy(update={"completions": str(samples)})}), written


def model_accuracy(cfg: RunConfig, model: ModelConfig) -> float:
    """pass@1 of `model` on cfg's eval prompts, sampled exactly as the runs'
    evaluations are (same prompts, seed, k and length), so it is comparable with their curves."""
    from opd.data import encode_prompts
    from opd.evaluation import evaluate_prompts
    from opd.data.sources import prompt_records
    from opd.models import load_model, pick_device
    from opd.sampler.hf import HFSampler

    loaded, tokenizer = load_model(model, pick_device(cfg.train.device))
    prompts, _ = encode_prompts(prompt_records(cfg, "eval"), tokenizer, cfg.data.max_prompt_tokens, cfg.data.overlong)
    metrics, _ = evaluate_prompts(prompts, HFSampler(loaded, tokenizer, cfg.sampling), cfg.eval,
                                  cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens,
                                  default_grader=cfg.data.grader)
    if "accuracy" not in metrics:
        raise ValueError("model_accuracy needs graded eval prompts (a task or data.grader)")
    return metrics["accuracy"]


@dataclass
class Reached:
    step: int
    flops: float  # student + teacher FLOPs of training (data given)
    flops_with_data: float  # plus what writing the training data cost (SFT on teacher samples)


def eval_rows(run_dir: Path) -> list[dict]:
    from opd.run_dir import read_metrics

    return [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "eval/accuracy" in r]


def reach(rows: list[dict], target: float) -> Reached | None:
    """The first evaluation whose accuracy is at least `target` (None: never within the run)."""
    for r in rows:
        if r["eval/accuracy"] >= target - 1e-9:
            return Reached(r["step"], r["flops_total"], r["flops_total_with_data"])
    return None


def reached_fields(rows: list[dict], target: float, suffix: str) -> dict:
    """steps_to_<suffix>, flops_to_<suffix> and flops_with_data_to_<suffix> (None: not reached)."""
    reached = reach(rows, target)
    return {f"steps_to_{suffix}": reached.step if reached else None,
            f"flops_to_{suffix}": reached.flops if reached else None,
            f"flops_with_data_to_{suffix}": reached.flops_with_data if reached else None}


def method_row(name: str, run_dir: Path, target: float, extra_seconds: float = 0.0) -> dict:
    """One line of the comparison table, from a finished run's files."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    rows = eval_rows(run_dir)
    return {
        "method": name,
        "run_dir": str(run_dir),
        "start_accuracy": rows[0]["eval/accuracy"] if rows else None,
        "final_accuracy": rows[-1]["eval/accuracy"] if rows else None,
        "best_accuracy": max(r["eval/accuracy"] for r in rows) if rows else None,
        "steps": summary["steps_done"],
        **reached_fields(rows, target, "target"),
        "flops_total": summary["flops_total"],
        "flops_total_with_data": summary["flops_total_with_data"],
        # Time in the steps (sampling, scoring, training), not in evaluations; SFT adds the time
        # the teacher took to write its data.
        "wall_s": summary["wall_s_total"] + extra_seconds,
    }


def run_comparison(out_dir: Path, runs: dict[str, RunConfig], teacher_accuracy: float,
                   target_fraction: float = TARGET_FRACTION,
                   extra_seconds: dict[str, float] | None = None, console: Console | None = None,
                   notes: dict | None = None) -> dict:
    """Train every config into out_dir/<name> and write out_dir/comparison.json: per method,
    final accuracy and the steps and FLOPs to reach target_fraction of the teacher's accuracy."""
    from opd.loop import train

    console = console or Console()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = target_fraction * teacher_accuracy
    for name, cfg in runs.items():
        summary = train(cfg.model_copy(update={"run_dir": str(out_dir / name)}), console=console)
        if summary["interrupted"]:
            raise KeyboardInterrupt
    table = [method_row(name, out_dir / name, target, (extra_seconds or {}).get(name, 0.0)) for name in runs]
    common = add_common_target(table)
    comparison = {"teacher_accuracy": teacher_accuracy, "target_fraction": target_fraction, "target": target,
                  "common_target": common, "runs": {name: name for name in runs}, "table": table, **(notes or {})}
    (out_dir / "comparison.json").write_text(json.dumps(comparison, indent=2))
    return comparison


def add_common_target(table: list[dict]) -> float:
    """The blog compares compute "to reach the same accuracy". When a target fixed in advance (95%
    of the teacher) is out of reach in the budget, the highest accuracy that every method reached
    (the lowest of their best evaluations) still gives one: each row gets the steps and FLOPs at
    which it first got there. Returns that accuracy."""
    common = min(r["best_accuracy"] for r in table)
    for r in table:
        r.update(reached_fields(eval_rows(r["run_dir"]), common, "common"))
    return common
