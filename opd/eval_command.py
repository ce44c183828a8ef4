"""`opd eval`: accuracy (per task, per check) and teacher KL for any run, checkpoint or model.

    opd eval runs/x                       # the run's latest checkpoint on the run's own eval sets
    opd eval runs/x/checkpoints/step_000100 --task instruction --task knowledge
    opd eval models/smollm2 --task arithmetic task.arithmetic.digits=2 --samples 4
"""

from __future__ import annotations

from pathlib import Path

import yaml
from rich.console import Console

from opd.config import ConfigError, load_config
from opd.data import encode_prompts
from opd.components import load_teachers
from opd.data.sources import load_data, task_records, task_teacher
from opd.evaluation import evaluate_prompts
from opd.hardware import set_threads
from opd.learner.checkpoint import has_trainer_state, latest_checkpoint
from opd.learner.learner import Learner
from opd.resume import seed_everything
from opd.models import load_model, load_tokenizer, pick_device
from opd.sampler import with_env
from opd.sampler.hf import HFSampler


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path.resolve()}")
    return yaml.safe_load(path.read_text()) or {}


def resolve_model(model: str, config: Path | None) -> tuple[dict, Path | None]:
    """(config tree, checkpoint weights directory or None) for a run directory, a checkpoint
    directory, or a model path."""
    path = Path(model)
    if (path / "comparison.json").is_file() and not (path / "config.yaml").is_file():  # `opd demo`'s folder
        runs = sorted(p.name for p in path.iterdir() if (p / "config.yaml").is_file())
        raise ConfigError(f"{path} is a comparison of runs, not one run: evaluate one of them, e.g. "
                          f"`opd eval {path / (runs[0] if runs else 'distill')}` (runs here: {', '.join(runs) or 'none'})")
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():  # a run directory
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise FileNotFoundError(f"{path}: the run has no complete checkpoint under {path / 'checkpoints'}")
        tree, weights = _read_yaml(path / "config.yaml"), checkpoint / "model"
    elif has_trainer_state(path):  # one checkpoint of a run: run_dir/checkpoints/step_N
        tree, weights = _read_yaml(path.parent.parent / "config.yaml"), path / "model"
    else:  # a model: its settings come from --config (if any), the model from the argument
        tree = _read_yaml(config) if config is not None else {}
        tree = {**tree, "method": tree.get("method", "sft"), "student": {"path": model}}
        return tree, None
    if config is not None:
        from opd.config import _deep_merge

        tree = _deep_merge(tree, _read_yaml(config))
    return tree, weights


def run_eval(model: str, tasks: list[str], config: Path | None, overrides: list[str],
             console: Console | None = None) -> dict:
    tree, weights = resolve_model(model, config)
    cfg = load_config(None, [*overrides, "log.progress=false"], base=tree)
    return evaluate_config(cfg, weights, tasks, model, console)


def evaluate_config(cfg, weights: Path | None, tasks: list[str], label: str, console: Console | None = None) -> dict:
    """`opd eval` of cfg.student (with `weights` loaded over it when given) on `tasks`, or on cfg's
    own eval sets when none are named; also an eval phase of `opd pipeline`."""
    seed_everything(cfg.train.seed)
    set_threads(cfg.train.threads)  # the cores this process may use (opd.hardware)
    device = pick_device(cfg.train.device)
    student_tokenizer = load_tokenizer(cfg.student)
    teacher = None
    if cfg.teacher_specs and not cfg.eval.greedy:  # teacher KL needs the student's own samples
        teacher = load_teachers(cfg, device, student_tokenizer)  # several: each prompt scored by its own
    student, tokenizer = load_model(cfg.student, device, student_tokenizer)
    learner = Learner(student, cfg.optim, cfg.loss, 1, cfg.train.micro_batch_size)  # measures exact KL; never steps
    if weights is not None:
        learner.load_weights(weights)

    if tasks:
        known = ("arithmetic", "knowledge", "instruction", "sums")
        unknown = [t for t in tasks if t not in known]
        if unknown:
            raise ConfigError(f"--task {unknown[0]}: unknown task (known: {', '.join(known)})")
        sets = {t: encode_prompts(task_records(cfg, "eval", t), tokenizer, cfg.data.max_prompt_tokens,
                                  cfg.data.overlong, lambda w, r, name=task_teacher(cfg, t): name)[0] for t in tasks}
    elif weights is not None or cfg.task.name != "none" or cfg.data.eval_prompts is not None or cfg.data.sources:
        sets = {name or (cfg.task.name if cfg.task.name != "none" else "eval"): prompts
                for name, prompts in load_data(cfg, tokenizer).eval_sets.items()}
    else:
        raise ConfigError("nothing to evaluate on: pass --task (arithmetic, knowledge, instruction, sums) or a --config "
                          "with task.name or data.eval_prompts")

    sampler = with_env(cfg, HFSampler(student, tokenizer, cfg.sampling))  # env: Env episodes
    results = {"model": label, "checkpoint": str(weights.parent) if weights is not None else None,
               "samples_per_prompt": 1 if cfg.eval.greedy else cfg.eval.samples_per_prompt,
               "greedy": cfg.eval.greedy, "seed": cfg.eval.seed, "sets": {}}
    for name, prompts in sets.items():
        if console is not None:
            console.print(f"evaluating {name}: {len(prompts)} prompts")
        metrics, _ = evaluate_prompts(prompts, sampler, cfg.eval, cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens,
                                      teacher, cfg.data.grader, learner)
        results["sets"][name] = {"prompts": len(prompts), **metrics}
    return results
