"""Progress of a long stage: a rich bar on a terminal, a line at a steady interval elsewhere.

Under `make` with its output going to a file, or in a CI log, a rich bar draws nothing until the
stage ends (a teacher build said only "building the teacher" for 17 minutes). Off a terminal,
`LineProgress` prints the step, the rate and the time left every `OPD_PROGRESS_INTERVAL_S` seconds
(30 by default) and when the stage ends:

    distill: step 40/150 (27%), 0.52 steps/s, 3m 32s left  teacher KL 0.1234  len 12.0
"""

from __future__ import annotations

import os
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

DEFAULT_INTERVAL_S = 30.0


def interval_s() -> float:
    try:
        return max(0.0, float(os.environ.get("OPD_PROGRESS_INTERVAL_S", DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {seconds:02d}s" if minutes else f"{seconds}s"


class LineProgress:
    """The part of rich's Progress that opd's stages use (`add_task`, `update`, a context manager),
    printed as one line per interval rather than drawn."""

    def __init__(self, label: str, console: Console, unit: str = "step", every_s: float | None = None,
                 disable: bool = False):
        self.label, self.console, self.unit, self.disable = label, console, unit, disable
        self.every_s = interval_s() if every_s is None else every_s
        self.tasks: dict[int, dict] = {}

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def add_task(self, description: str, total: int, completed: int = 0, **fields) -> int:
        now = time.monotonic()
        task = len(self.tasks)
        self.tasks[task] = {"total": total, "completed": completed, "first": completed, "started": now,
                            "printed": now, "fields": fields}
        return task

    def update(self, task: int, completed: int | None = None, **fields) -> None:
        state = self.tasks[task]
        if completed is not None:
            state["completed"] = completed
        state["fields"].update(fields)
        now = time.monotonic()
        finished = state["completed"] >= state["total"]
        if not self.disable and (finished or now - state["printed"] >= self.every_s):
            state["printed"] = now
            self.console.print(escape(self.line(state, now)), highlight=False, soft_wrap=True)

    def line(self, state: dict, now: float) -> str:
        done, total = state["completed"], state["total"]
        parts = [f"{self.label}: {self.unit} {done}/{total} ({100 * done / max(total, 1):.0f}%)"]
        elapsed, progressed = now - state["started"], done - state["first"]
        if progressed > 0 and elapsed > 0:
            rate = progressed / elapsed
            parts.append(f"{rate:.3g} {self.unit}s/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
            parts.append(f"{duration((total - done) / rate)} left" if done < total else f"{duration(elapsed)} in all")
        status = state["fields"].get("status")
        return ", ".join(parts) + (f"  {status}" if status else "")


def stage_progress(label: str, console: Console, disable: bool = False, unit: str = "step"):
    """A rich bar (label, bar, n/total, `status` field, elapsed) on a terminal; LineProgress elsewhere."""
    if not console.is_terminal:
        return LineProgress(label, console, unit=unit, disable=disable)
    return Progress(TextColumn(f"[bold]{label}[/bold]"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console, disable=disable)


def status_line(metrics: dict) -> str:
    """The progress bar's figures: of this step's training batch (held-out ones are in the tables)."""
    parts = []
    if "teacher_kl" in metrics:
        parts.append(f"teacher KL {metrics['teacher_kl']:.4f}")
    if "accuracy" in metrics:
        parts.append(f"train-batch accuracy {metrics['accuracy']:.3f}")
    if "cross_entropy" in metrics:
        parts.append(f"loss {metrics['cross_entropy']:.4f}")
    if "completion_len" in metrics:
        parts.append(f"len {metrics['completion_len']:.1f}")
    return "  ".join(parts)
