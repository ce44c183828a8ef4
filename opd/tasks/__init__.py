"""Tasks with graders, used both as RL rewards and for evaluation.

Built-in tasks generate their own records (arithmetic, sums, knowledge, instruction); the user's own
records are graded by a named grader or a user function (graders.py). `grade` picks the grader
a record calls for:
  - a `task` field naming a built-in task -> that task's grader;
  - else a `grader` field, or the run's default (`data.grader`) -> that grader, with `answer`.
A record's own `grader` may name only a built-in grader (exact, numeric, regex, math): a data file
is not the user's code, so a `module:function` grader, which imports and calls anything, comes
only from the run config (`data.grader`).

Every record is a JSON-serialisable dict with `messages` (one user turn), `task`, what its grader
needs, and, where a reference solution exists, `completion`: what an ideal assistant writes.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable

from opd.tasks import arithmetic, instruction, knowledge, sums
from opd.tasks.base import Grade, GraderError
from opd.tasks.graders import NAMED, resolve_grader
from opd.tasks.streams import split_records

if TYPE_CHECKING:
    from opd.config import TaskConfig

__all__ = ["Grade", "GraderError", "make_records", "documents", "grade", "is_graded", "resolve_grader", "TASK_GRADERS",
           "check_record_graders"]

TASK_GRADERS: dict[str, Callable[[dict, str], Grade]] = {
    "arithmetic": arithmetic.grade_arithmetic,
    "knowledge": knowledge.grade_knowledge,
    "instruction": instruction.grade_instruction,
    "sums": sums.grade_sums,
}


def make_records(task: TaskConfig, split: str, count: int | None = None) -> list[dict]:
    """The records of a split ("train" or "eval"); `count` defaults to task.train_size / eval_size.

    Deterministic from the config. Train and eval never share a prompt: the train split skips
    the first `task.eval_size` eval prompts (for knowledge: the held-out facts).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    if task.name not in TASK_GRADERS:
        raise ValueError(f"task.name is {task.name!r}: no built-in task to make records from "
                         f"(choose one of {sorted(TASK_GRADERS)})")
    if count is None:
        count = task.train_size if split == "train" else task.eval_size
    if count < 0:
        raise ValueError(f"count must be >= 0, not {count}")

    if task.name == "knowledge":
        return knowledge.make_knowledge_records(task, split, count)
    if task.name == "arithmetic":
        arithmetic.check_problem_space(task.arithmetic, split, count, task.eval_size)
        draw, what = partial(arithmetic.draw_problem, task.arithmetic), "arithmetic problems"
    elif task.name == "sums":
        sums.check_problem_space(task.sums, split, count, task.eval_size)
        draw, what = partial(sums.draw_problem, task.sums), "sums problems"
    else:
        draw, what = instruction.prompt_drawer(task.instruction), "instruction prompts"
    return split_records(task.name, task.seed, draw, split, count, task.eval_size, what)


def documents(task: TaskConfig) -> list[str]:
    """Plain-text documents for mid-training; only the knowledge task has them."""
    if task.name != "knowledge":
        raise ValueError(f"task {task.name!r} has no documents: only the knowledge task does "
                         f"(set task.name=knowledge, or give data.documents)")
    return knowledge.documents(task.knowledge)


def built_in_task(record: dict) -> str | None:
    """The record's `task` if it names a built-in task (user data may have a `task` column of its own)."""
    task = record.get("task")
    return task if isinstance(task, str) and task in TASK_GRADERS else None


def grader_spec(record: dict, default_grader: str | None) -> str | None:
    """The grader a record is graded by: its own `grader` (built-in names only), else the config's."""
    own = record.get("grader")
    if not own:
        return default_grader
    if not isinstance(own, str) or own.strip() not in NAMED:
        raise GraderError(f"a record names the grader {own!r}, and a data file may name only a built-in grader "
                          f"({', '.join(sorted(NAMED))}): a module:function grader runs code, so it is taken only "
                          f"from the run config (data.grader); record keys: {sorted(record)}")
    return own


def check_record_graders(records) -> None:
    """Refuse, before any work, a record whose `grader` is not a built-in grader."""
    for record in records:
        if built_in_task(record) is None:
            grader_spec(record, None)


def grade(record: dict, completion: str, default_grader: str | None = None) -> Grade:
    """Grade one completion of the record's prompt."""
    task = built_in_task(record)
    if task is not None:
        return TASK_GRADERS[task](record, completion)
    spec = grader_spec(record, default_grader)
    if not spec:
        task_note = f" (its task {record['task']!r} is not a built-in one)" if "task" in record else ""
        raise GraderError(f"record has no grader{task_note}: give the record a `grader` field or set data.grader "
                          f"(exact, numeric, regex, math or module:function); record keys: {sorted(record)}")
    return Grade(score=resolve_grader(spec)(completion, record))


def is_graded(record: dict, default_grader: str | None) -> bool:
    """Whether `grade` would find a grader for the record."""
    return built_in_task(record) is not None or bool(grader_spec(record, default_grader))
