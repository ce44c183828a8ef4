"""`opd pipeline --config pipeline.yaml`: several ordinary runs in order, each in its own folder,
where a phase may start from (or learn from) an earlier phase's model. The continual-learning
workflow of the blog is one such file (configs/pipeline_personalize.yaml):

    base      eval      the model as it is: knowledge and instruction following
    midtrain  midtrain  student: {phase: base}; the knowledge base's documents, 30% chat rows
    restore   distill   student: {phase: midtrain}, teacher: {phase: base}; chat prompts only
    final     eval      student: {phase: restore}

A pipeline file:

    run_dir: runs/personalize      # each phase writes run_dir/<phase name>
    common: {...}                  # a run config merged into every phase (task, eval, sampling, ...)
    phases:                        # in order; each an ordinary run config plus `method`
      base: {method: eval, student: {path: models/base}}
      midtrain: {method: midtrain, student: {phase: base}, ...}

`method` is distill, rl, sft, midtrain or eval (evaluate the student only). A model given as
`{phase: NAME}` is the final model of that earlier phase (for an eval phase: the model it evaluated);
other keys beside `phase` (dtype, lora, ...) are kept. Every phase's eval sets are named by task
(the phase's own task, and eval.tasks), so the final table lines up the same evaluation across phases.

run_dir/pipeline.json records each finished phase, its model and its evaluations: `--resume` skips
finished phases and continues an unfinished run phase from its last checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from opd.config import METHODS, ConfigError, RunConfig, _deep_merge, load_config, split_prefixed_overrides

PHASE_METHODS = (*METHODS, "eval")
STATE = "pipeline.json"


class PipelineInterrupted(RuntimeError):
    """A phase stopped before its end (Ctrl-C, or `stop_after`): `--resume` continues it."""


def read_pipeline(path: Path) -> dict:
    if not Path(path).is_file():
        raise ConfigError(f"pipeline file not found: {Path(path).resolve()}")
    tree = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(tree) - {"run_dir", "common", "phases"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; a pipeline file has run_dir, "
                          f"common and phases")
    if not isinstance(tree.get("phases"), dict) or not tree["phases"]:
        raise ConfigError(f"{path}: `phases` must map phase names to run configs (in the order they run)")
    return tree


def split_overrides(overrides: list[str], phases: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(overrides for every phase, per phase): `midtrain:train.steps=10` is the midtrain phase's."""
    return split_prefixed_overrides(list(overrides), phases, "phase of this pipeline")


def _model_reference(spec) -> str | None:
    return spec.get("phase") if isinstance(spec, dict) else None


def phase_config(name: str, tree: dict, common: dict, run_dir: Path, outputs: dict[str, dict],
                 overrides: list[str]) -> tuple[str, RunConfig]:
    """(method, RunConfig) of one phase, its model references replaced by earlier phases' models.
    `outputs` holds the models of the phases before it (a placeholder path while validating)."""
    tree = _deep_merge(_deep_merge({}, common), tree)  # copies: neither file tree is changed
    method = tree.pop("method", None)
    if method not in PHASE_METHODS:
        raise ConfigError(f"phase {name}: method must be one of {', '.join(PHASE_METHODS)} (got {method!r})")
    for role in ("student", "teacher"):
        ref = _model_reference(tree.get(role))
        if ref is None:
            continue
        if ref not in outputs:
            raise ConfigError(f"phase {name}: {role}: {{phase: {ref}}} names no earlier phase "
                              f"(earlier: {', '.join(outputs) or 'none'})")
        rest = {k: v for k, v in tree[role].items() if k != "phase"}
        tree[role] = {**outputs[ref], **rest}
    # the phase's own task is evaluated as its own set: not a second time under eval.tasks
    own_task = (tree.get("task") or {}).get("name", "none")
    if own_task in (tree.get("eval") or {}).get("tasks", []):
        tree["eval"]["tasks"] = [t for t in tree["eval"]["tasks"] if t != own_task]
    tree["method"] = "sft" if method == "eval" else method  # an eval phase only needs the model settings
    tree["run_dir"] = str(run_dir / name)
    try:
        return method, load_config(None, list(overrides), base=tree)
    except ConfigError as err:
        raise ConfigError(f"phase {name}: {err}") from None


def named_evals(metrics: dict, own_task: str) -> dict[str, float]:
    """eval/<set>/<metric> keys as '<set>/<metric>', the run's own set named by its task."""
    out = {}
    for key, value in metrics.items():
        if not key.startswith("eval/") or not isinstance(value, (int, float)):
            continue
        rest = key.removeprefix("eval/")
        out[rest if "/" in rest and not rest.startswith("check/") else f"{own_task}/{rest}"] = value
    return out


def _finished_model(method: str, cfg: RunConfig) -> dict:
    """The model a phase hands on: a training phase's last checkpoint; an eval phase's own student."""
    if method == "eval":
        return cfg.student.model_dump(mode="json", exclude_none=True)
    from opd.learner.checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(Path(cfg.run_dir))
    return {"path": str(checkpoint / "model"), "dtype": cfg.student.dtype}


def run_phase(method: str, cfg: RunConfig, resume: bool, console: Console, stop_after: int | None,
              trust_checkpoint: bool = False) -> dict:
    """One phase: an ordinary run (returns its last evaluation), or an evaluation of its student."""
    own_task = cfg.task.name if cfg.task.name != "none" else "eval"
    if method == "eval":
        from opd.eval_command import evaluate_config

        tasks = list(dict.fromkeys(([cfg.task.name] if cfg.task.name != "none" else []) + list(cfg.eval.tasks)))
        results = evaluate_config(cfg, None, tasks, f"phase {Path(cfg.run_dir).name}", console)
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        return {f"{name}/{k}": v for name, metrics in results["sets"].items() for k, v in metrics.items()
                if isinstance(v, (int, float)) and k != "prompts"}
    from opd.loop import train

    summary = train(cfg, resume=resume, console=console, stop_after=stop_after, trust_checkpoint=trust_checkpoint)
    if summary["interrupted"]:
        raise PipelineInterrupted(f"phase {Path(cfg.run_dir).name} stopped after step {summary['steps_done']} of "
                                  f"{summary['steps_planned']} (checkpoint saved)")
    ceiling = {k: v for k, v in (summary.get("start_eval") or {}).items() if "teacher_accuracy" in k}  # step 0 only
    return named_evals({**(summary.get("last_eval") or {}), **ceiling}, own_task)


def check_pipeline(spec: dict, run_dir: Path, overrides: list[str]) -> dict[str, tuple[str, RunConfig]]:
    """Every phase's (method, config), each earlier model a placeholder path (an eval phase hands on
    its own model): a bad key, value or phase reference is refused before any phase runs."""
    names = list(spec["phases"])
    shared, per_phase = split_overrides(overrides, names)
    outputs: dict[str, dict] = {}
    configs = {}
    for name in names:
        method, cfg = phase_config(name, spec["phases"][name], spec.get("common") or {}, Path(run_dir), outputs,
                                   [*shared, *per_phase[name]])
        for role in ("student", "teacher"):
            ref = _model_reference(spec["phases"][name].get(role))
            if ref is not None and configs[ref][0] != "eval" and configs[ref][1].student.lora is not None:
                raise ConfigError(f"phase {name}: {role}: {{phase: {ref}}} is a LoRA adapter, which a later phase "
                                  f"cannot load as its model yet: train phase {ref} without student.lora")
        configs[name] = (method, cfg)
        outputs[name] = cfg.student.model_dump(mode="json", exclude_none=True) if method == "eval" else \
            {"path": str(Path(run_dir) / name / "checkpoints" / "<last>" / "model")}
    return configs


def read_state(path: Path) -> dict:
    """pipeline.json: {"phases": {name: {...}}}; anything else (torn, edited) is one ConfigError."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        raise ConfigError(f"{path} cannot be read ({type(err).__name__}: {err}): it is not the state of a pipeline; "
                          f"move it away to run the pipeline from its first phase") from None
    phases = state.get("phases") if isinstance(state, dict) else None
    if not isinstance(phases, dict) or not all(isinstance(p, dict) and (not p.get("finished") or isinstance(
            p.get("model"), dict)) for p in phases.values()):
        raise ConfigError(f"{path} is not the state of a pipeline (expected {{\"phases\": {{name: {{...}}}}}}); "
                          f"move it away to run the pipeline from its first phase")
    return state


def write_state(path: Path, state: dict) -> None:
    """Replaced atomically: a crash mid-write leaves the previous state, never a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


def run_pipeline(path: Path, overrides: list[str] = (), resume: bool = False, console: Console | None = None,
                 run_dir: Path | None = None, stop_after: tuple[str, int] | None = None,
                 trust_checkpoint: bool = False) -> dict:
    """Every phase in order; returns (and writes to run_dir/pipeline.json) each phase's model and
    evaluations. `stop_after=(phase, n)` stops that phase after n steps as a Ctrl-C would (tests).
    `trust_checkpoint`: a phase may resume from an older opd's pickled checkpoint."""
    console = console or Console()
    spec = read_pipeline(path)
    run_dir = Path(run_dir or spec.get("run_dir") or "runs/pipeline")
    names = list(spec["phases"])
    shared, per_phase = split_overrides(list(overrides), names)
    common = spec.get("common") or {}

    check_pipeline(spec, run_dir, list(overrides))  # every phase, before anything runs

    state_path = run_dir / STATE
    state = read_state(state_path) if state_path.is_file() else {"phases": {}}
    if state["phases"] and not resume:
        raise ConfigError(f"{run_dir} holds a pipeline already ({state_path}): pass --resume to continue it, or "
                          f"choose another run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, dict] = {}
    for name in names:
        method, cfg = phase_config(name, spec["phases"][name], common, run_dir, outputs, [*shared, *per_phase[name]])
        done = state["phases"].get(name)
        if done and done.get("finished"):
            if done.get("config") != cfg.model_dump(mode="json"):
                console.print(f"[yellow]phase {name} finished earlier with another config; its model is kept "
                              f"(start a new run_dir to redo it)[/yellow]")
            console.print(f"phase {name}: finished earlier, skipped")
            outputs[name] = done["model"]
            continue
        console.print(f"[bold]phase {name}[/bold] ({method}) in {cfg.run_dir}")
        state["phases"][name] = {"method": method, "finished": False, "config": cfg.model_dump(mode="json")}
        write_state(state_path, state)
        steps = stop_after[1] if stop_after and stop_after[0] == name else None
        evals = run_phase(method, cfg, resume and done is not None, console, steps, trust_checkpoint)
        outputs[name] = _finished_model(method, cfg)
        state["phases"][name].update(finished=True, model=outputs[name], evals=evals)
        write_state(state_path, state)
    print_pipeline(state, console)
    return state


def print_pipeline(state: dict, console: Console) -> None:
    """Every evaluation (set/metric) after every phase, side by side."""
    phases = {name: p.get("evals") or {} for name, p in state["phases"].items()}
    shown = ("accuracy", "instruction_accuracy", "teacher_kl", "teacher_accuracy")
    keys = list(dict.fromkeys(k for evals in phases.values() for k in evals if k.rpartition("/")[2] in shown))
    table = Table(title="opd pipeline: held-out evaluations after each phase")
    table.add_column("set / metric", no_wrap=True, min_width=max(map(len, keys), default=12))
    for name in phases:
        table.add_column(f"{name}\n({state['phases'][name]['method']})", justify="right")
    for key in sorted(keys):
        table.add_row(key, *(f"{phases[n][key]:.3f}" if key in phases[n] else "-" for n in phases))
    console.print(table)
