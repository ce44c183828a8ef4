"""What a run checks and sets before any model loads: loading (or de-quantising) a real model takes
minutes, and a missing prompts file or a run directory that already holds a run should be refused
in a second, not after that.

    check_before_loading(cfg, resume)   # raises PromptDataError / RunDirectoryError; sets threads
"""

from __future__ import annotations

from pathlib import Path

from opd import hardware
from opd.config import RunConfig
from opd.data import PromptDataError
from opd.models import pick_device
from opd.run_dir import RunDirectoryError


def data_files(cfg: RunConfig) -> dict[str, str]:
    """The data files this run's method will read, by their config key."""
    wanted = ["eval_prompts"]
    if cfg.on_policy:
        wanted.append("prompts")
    elif cfg.method == "sft":
        wanted.append("completions")
    else:  # midtrain
        wanted.append("documents")
        if cfg.data.chat_ratio > 0:
            wanted.append("chat")
    return {f"data.{key}": getattr(cfg.data, key) for key in wanted if getattr(cfg.data, key) is not None}


def check_data_files(cfg: RunConfig) -> None:
    for key, path in data_files(cfg).items():
        if not Path(path).exists():
            raise PromptDataError(f"{key}: file not found: {Path(path).resolve()}")


def check_run_dir(cfg: RunConfig, resume: bool) -> None:
    """The same refusal as RunLog's, before the models load rather than after."""
    metrics = Path(cfg.run_dir) / "metrics.jsonl"
    if not resume and metrics.is_file() and metrics.stat().st_size > 0:
        raise RunDirectoryError(f"{cfg.run_dir} already holds a run (metrics.jsonl is not empty): pass --resume "
                                f"to continue it, or choose another run_dir")


def check_before_loading(cfg: RunConfig, resume: bool) -> int:
    """Refuse what needs no model to refuse; choose torch's threads (returned) and warn about a bf16
    setting this CPU has no units for (opd.hardware)."""
    check_run_dir(cfg, resume)
    check_data_files(cfg)
    threads = hardware.set_threads(cfg.train.threads)
    hardware.check_bf16(cfg, pick_device(cfg.train.device))
    return threads
