"""Resuming a run exactly where it stopped: which checkpoint, whether this config may continue
it, and the progress (step, RNG, totals) read back from it. The seeds that make a fresh run
repeatable are set here too."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from opd.config import ConfigError
from opd.learner import distributed
from opd.learner.checkpoint import latest_checkpoint, load_trainer_state, set_rng_state
from opd.roles import Learner


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dumps."""
    keys = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(prefix + key)
    return keys


# Settings a checkpoint cannot continue under: the weights it holds are of this student, trained by
# this method. Everything else may change on --resume and takes effect from the resumed step.
FIXED_ON_RESUME = ("method", "student.", "train.strategy")


def check_resumable(old: dict, new: dict, console: Console) -> None:
    changed = config_differences(old, new)
    fixed = [key for key in changed if any(key == f or key.startswith(f) for f in FIXED_ON_RESUME)]
    if fixed:
        raise ConfigError(f"--resume: {', '.join(fixed)} cannot change on resume (the checkpoint holds that "
                          f"model, trained by that method); start a new run_dir instead")
    if changed:
        console.print(f"[yellow]resuming with a config that differs from the checkpoint's in: {', '.join(changed)}"
                      f" (in effect from the resumed step on; config.yaml records them)[/yellow]")


def checkpoint_to_resume(run_dir: Path, config: dict, console: Console,
                         trust_checkpoint: bool) -> tuple[Path | None, dict | None]:
    """The run's latest checkpoint and its trainer state, checked against this run's `config`
    (a dump); (None, None) when there is none yet, and the run starts from step 0."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        console.print(f"[yellow]--resume: no checkpoint in {run_dir / 'checkpoints'} yet; starting the run "
                      f"from step 0[/yellow]")
        return None, None
    state = load_trainer_state(checkpoint, trust_checkpoint)
    check_resumable(state["config"], config, console)
    return checkpoint, state


def restore_progress(learner: Learner, checkpoint: Path, state: dict, console: Console) -> tuple[int, dict]:
    """The learner's weights and optimizer, and the RNG, as they were after the checkpoint's step;
    returns that step and the run's totals then."""
    rng = distributed.rng_of(state)  # this rank's; a checkpoint of another number of processes is refused
    learner.load_weights(checkpoint / "model")
    learner.load_state_dict(state["learner"])
    set_rng_state(rng)
    console.print(f"resuming from {checkpoint} (step {state['step']})")
    return state["step"], state["totals"]
