"""Signs that an on-policy run is collapsing, watched every step so that a user hears of them while
the run goes on rather than from the final table.

Measured on a digit-sorting task: RL at distillation's learning rate (5e-4) collapsed. The
scratchpad degenerated into repetition that ran to the length limit while the grader, which reads
only the final answer, kept rewarding some of it. Two signs show such a collapse early:

* the truncation rate (samples that hit sampling.max_new_tokens) rises well above where it started;
* RL: every prompt's samples score the same for many steps in a row, so the group-centred
  advantage is zero and nothing is learned (all right, all wrong, or a degenerate answer).
"""

from __future__ import annotations

from collections import deque

WINDOW = 5  # steps averaged, so that one odd batch does not warn
TRUNCATION_LEVEL = 0.3  # the recent truncation rate at or above which a rise counts ...
TRUNCATION_RISE = 0.2  # ... when it is this far above the first WINDOW steps'
EQUAL_GROUPS_STEPS = 10  # RL steps in a row with every group scoring the same


class CollapseWatch:
    """Feed it each step's metrics (`truncated`, `groups_all_equal_frac`); it returns the warnings
    to print, each kind once per run."""

    def __init__(self, method: str):
        self.method = method
        self.early: list[float] = []
        self.recent: deque[float] = deque(maxlen=WINDOW)
        self.equal_in_a_row = 0
        self.warned: set[str] = set()

    def check(self, step: int, metrics: dict) -> list[str]:
        warnings = []
        if "truncated" in metrics:
            if len(self.early) < WINDOW:
                self.early.append(metrics["truncated"])
            self.recent.append(metrics["truncated"])
            start, now = sum(self.early) / len(self.early), sum(self.recent) / len(self.recent)
            if (len(self.early) == WINDOW and len(self.recent) == WINDOW and now >= TRUNCATION_LEVEL
                    and now - start >= TRUNCATION_RISE and "truncation" not in self.warned):
                self.warned.add("truncation")
                warnings.append(
                    f"step {step}: {now:.0%} of the samples now run to sampling.max_new_tokens (the first {WINDOW} "
                    f"steps: {start:.0%}): a sign of collapse (degenerate, repeating completions). Read the latest "
                    f"rollouts/; if they degenerate, lower optim.lr (RL usually needs a smaller one than "
                    f"distillation) and resume from an earlier checkpoint")
        if self.method == "rl" and "groups_all_equal_frac" in metrics:
            self.equal_in_a_row = self.equal_in_a_row + 1 if metrics["groups_all_equal_frac"] >= 1.0 else 0
            if self.equal_in_a_row >= EQUAL_GROUPS_STEPS and "equal_groups" not in self.warned:
                self.warned.add("equal_groups")
                warnings.append(
                    f"step {step}: for {self.equal_in_a_row} steps every prompt's samples scored the same, so the RL "
                    f"advantage is zero and nothing is learned (accuracy {metrics.get('accuracy', float('nan')):.2f}: "
                    f"all wrong, all right, or collapsed). Check the rollouts; lower optim.lr, raise "
                    f"sampling.samples_per_prompt, or use harder/easier prompts")
        return warnings
