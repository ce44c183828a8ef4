"""What ends a training run early, and how it ends resumable.

* Ctrl-C (`StopRequest`): the first asks the loop to stop after the current step and save a
  checkpoint; a second interrupts at once, without saving. `stop_after` (a test's or a script's
  "N steps this time") ends an invocation the same way.
* Non-finite steps (`NonFiniteWatch`): skipped by the learner; too many in a row stop the run.
* A teacher that fails mid-run (`resumable_error`): the error is raised again naming the checkpoint
  that was saved and what to do, so that `--resume` continues from it.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from opd.learner import distributed
from opd.learner.checkpoint import latest_checkpoint
from opd.teacher.errors import what_to_do


class StopRequest:
    """The first Ctrl-C asks the loop to stop after the current step (and save); a second one
    interrupts at once, without saving."""

    def __init__(self, console: Console):
        self.requested = False
        self.console = console

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.console.print("[yellow]interrupt: finishing this step, then saving a checkpoint "
                           "(Ctrl-C again to quit without saving)[/yellow]")

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)

    def stopping(self, step: int, start_step: int, stop_after: int | None) -> bool:
        """Whether the run stops after `step`: Ctrl-C on any rank stops every rank, and
        `stop_after` ends this invocation after that many steps."""
        return distributed.any_rank(self.requested) or (stop_after is not None and step - start_step >= stop_after)


class NonFiniteTrainingError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient."""


class NonFiniteWatch:
    """Counts the steps in a row that the learner skipped (non-finite loss or gradient)."""

    def __init__(self, limit: int, run_dir: Path):
        self.limit, self.run_dir, self.in_a_row = limit, run_dir, 0

    def count(self, skipped: bool) -> None:
        self.in_a_row = self.in_a_row + 1 if skipped else 0

    def check(self, step: int) -> None:
        """Stop the run once `limit` steps in a row were skipped (after the step is logged)."""
        if self.in_a_row >= self.limit:
            raise NonFiniteTrainingError(
                f"step {step}: the loss or gradient was not finite for {self.in_a_row} steps in a row "
                f"(train.max_nonfinite_steps={self.limit}); those updates were skipped. The last good "
                f"checkpoint is {latest_checkpoint(self.run_dir)}: lower optim.lr and run again with --resume")


def resumable_error(err: Exception, save, run_dir: Path, what_failed: str) -> Exception:
    """The teacher error `err` again, naming the checkpoint kept for --resume. `save()` writes one
    on a single process; with several, only this rank may have failed, so no save can be agreed
    on and the last checkpoint stays (torchrun ends the other ranks)."""
    saved = save() if not distributed.active() else latest_checkpoint(run_dir)
    return type(err)(f"{err}\n{what_failed.format(saved=saved)}: {what_to_do(err)}, then run again with --resume")
