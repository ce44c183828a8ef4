"""Synthetic sums worked as pairwise partial sums, with several valid orders and self-corrections:
"Add 4, 1, 2, 2, 2." -> "4+2=6, left 6 1 2 2; 6+1=7, left 7 2 2; 7+2=9, left 9 2; 9+2=11. The answer is 11."

A task where on-policy states matter (issue 31, item 3): the answer is long (tens of tokens of
worked steps), every step may add any of the numbers still left (so a teacher trained on these
answers is uncertain at each choice, not near-deterministic), and in `correction_rate` of the
answers one partial sum is first written wrong and then corrected ("5+2=8, no: 5+2=7"), so a good
continuation exists after a slip. Graded on the final number only, as arithmetic is.

Each step adds the running total (the first number, at the start) and one number chosen from the
rest; "left" lists the running total first, then the numbers not yet added, in the prompt's order.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from opd.tasks.arithmetic import grade_final_integer
from opd.tasks.base import Grade, user_message

if TYPE_CHECKING:
    from opd.config import SumsTaskConfig

CORRECTION = ", no: "  # what a corrected slip looks like: "5+2=8, no: 5+2=7"


def problem_count(cfg: SumsTaskConfig) -> int:
    """How many different prompts the config can produce (ordered operand lists)."""
    return (cfg.max_operand + 1) ** cfg.operands


def check_problem_space(cfg: SumsTaskConfig, split: str, count: int, eval_size: int) -> None:
    needed = count if split == "eval" else eval_size + 1
    if needed > problem_count(cfg):
        raise ValueError(f"task.sums ({cfg.operands} operands of 0..{cfg.max_operand}) has only "
                         f"{problem_count(cfg)} different problems, too few for {needed}; allow more "
                         f"operands or lower task.eval_size")


def worked_answer(numbers: list[int], rng: random.Random, correction_rate: float) -> tuple[str, bool]:
    """The teacher-style answer for `numbers`, and whether it holds a corrected slip."""
    slip_at = rng.randrange(len(numbers) - 1) if rng.random() < correction_rate else None
    total, rest = numbers[0], list(numbers[1:])
    steps = []
    for i in range(len(numbers) - 1):
        pick = rest[rng.randrange(len(rest))]  # any number still left: several valid orders
        rest.remove(pick)  # its first copy, so that one choice is always written one way
        new = total + pick
        step = f"{total}+{pick}={new}"
        if i == slip_at:  # off by one, then the right sum
            wrong = new + rng.choice([-1, 1]) if new > 0 else new + 1
            step = f"{total}+{pick}={wrong}{CORRECTION}{step}"
        total = new
        steps.append(step + (", left " + " ".join(map(str, [total, *rest])) if rest else ""))
    return "; ".join(steps) + f". The answer is {total}.", slip_at is not None


def draw_problem(cfg: SumsTaskConfig, rng: random.Random) -> dict:
    numbers = [rng.randint(0, cfg.max_operand) for _ in range(cfg.operands)]
    completion, corrected = worked_answer(numbers, rng, cfg.correction_rate)
    return {
        "messages": user_message("Add " + ", ".join(map(str, numbers)) + "."),
        "task": "sums",
        "answer": str(sum(numbers)),
        "completion": completion,
        "corrected": corrected,
    }


def grade_sums(record: dict, completion: str) -> Grade:
    return grade_final_integer(record, completion, "sums")
