"""What a run leaves behind (DESIGN.md §6), readable without opd:

    config.yaml        the resolved configuration
    metrics.jsonl      one JSON object per optimizer step (plus step 0: the evaluation before training)
    events.*           TensorBoard events (tensorboard --logdir RUN_DIR)
    rollouts/step_N.jsonl  sampled completions with per-token teacher KL
    checkpoints/       see opd.learner.checkpoint
    summary.json       written at the end
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from opd.config import RunConfig


class RunDirectoryError(RuntimeError):
    pass


def _clean(value):
    """JSON has no NaN/inf: write null instead so every line parses everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog:
    def __init__(self, cfg: RunConfig, resume_step: int | None):
        self.path = Path(cfg.run_dir)
        self.metrics_path = self.path / "metrics.jsonl"
        if resume_step is None and self.metrics_path.exists() and self.metrics_path.stat().st_size > 0:
            raise RunDirectoryError(f"{self.path} already holds a run (metrics.jsonl is not empty): pass --resume "
                                    f"to continue it, or choose another run_dir")
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.yaml").write_text(cfg.to_yaml())
        if resume_step is not None and self.metrics_path.exists():
            # rows written after the checkpoint we resume from would be repeated: drop them
            kept = [line for line in self.metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.metrics_path.write_text("".join(line + "\n" for line in kept))
        self._metrics = self.metrics_path.open("a")

        self.tensorboard = None
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resume_step + 1 if resume_step is not None else None
            self.tensorboard = SummaryWriter(str(self.path), purge_step=purge)
        self.wandb = None
        if cfg.log.wandb:
            try:
                import wandb
            except ImportError:
                raise RunDirectoryError("log.wandb=true needs the wandb package: pip install 'opd[wandb]'") from None
            self.wandb = wandb.init(project=cfg.log.wandb_project, name=self.path.name, dir=str(self.path),
                                    config=cfg.model_dump(mode="json"), resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if self.tensorboard is not None:
                    self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def logged_evals(self) -> list[dict]:
        """The evaluations already in metrics.jsonl, oldest first (for the summary of a resumed run)."""
        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if k.startswith("eval/")} for r in rows
                if any(k.startswith("eval/") for k in r)]

    def write_rollouts(self, step: int, records: list[dict]) -> Path:
        folder = self.path / "rollouts"
        folder.mkdir(exist_ok=True)
        path = folder / f"step_{step:06d}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path

    def write_summary(self, summary: dict) -> None:
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def close(self) -> None:
        self._metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
