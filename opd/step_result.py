"""What one training step returns (`StepResult`), and the run's cumulative counters that the loop
adds each step to (`RunTotals`: tokens, FLOPs, seconds per phase; logged every step, kept in
checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass

from opd.roles import TeacherScores
from opd.rollouts import Rollouts

TOTALS = ("tokens_sampled_total", "tokens_scored_total", "tokens_trained_total",
          "flops_student_total", "flops_teacher_total", "flops_total", "flops_data_total", "flops_total_with_data",
          "sample_s_total", "score_s_total", "train_s_total", "eval_s_total", "wall_s_total",
          "nonfinite_steps", "grad_clipped_steps")


@dataclass
class StepResult:
    """One optimizer step. `metrics` and the counters are of the whole (global) batch; `batch`,
    `scores` and `grades` are this rank's (all of it on one process)."""
    metrics: dict
    batch: Rollouts
    scores: TeacherScores | None
    grades: list
    tokens_sampled: int      # 0 when the batch was not sampled (sft, midtrain)
    tokens_scored: int       # 0 when the teacher did not score it
    tokens_trained: int
    flops_student: float     # sampling + training
    flops_teacher: float
    flops_data: float        # of making the batch (a midtrain corpus), outside the run's own FLOPs
    wall_s: float            # the slowest rank's
    skipped: int             # 1 when the update was skipped (non-finite)
    grad_clipped: int


class RunTotals:
    """The run's cumulative counters, by their logged names (`TOTALS`), from a checkpoint's on resume."""

    def __init__(self, saved: dict | None = None):
        self.values = {**dict.fromkeys(TOTALS, 0), **(saved or {})}

    def add(self, step: StepResult) -> None:
        v = self.values
        v["tokens_sampled_total"] += step.tokens_sampled
        v["tokens_scored_total"] += step.tokens_scored
        v["tokens_trained_total"] += step.tokens_trained
        v["flops_student_total"] += step.flops_student
        v["flops_teacher_total"] += step.flops_teacher
        v["flops_total"] = v["flops_student_total"] + v["flops_teacher_total"]
        v["flops_data_total"] += step.flops_data
        v["flops_total_with_data"] = v["flops_total"] + v["flops_data_total"]
        for phase in ("sample", "score", "train"):  # summed over ranks, like FLOPs
            v[f"{phase}_s_total"] += step.metrics[f"{phase}_s"]
        v["wall_s_total"] += step.wall_s
        v["nonfinite_steps"] += step.skipped
        v["grad_clipped_steps"] += step.grad_clipped

    def add_eval(self, seconds: float) -> None:
        self.values["eval_s_total"] += seconds

    def as_dict(self) -> dict:
        return dict(self.values)
