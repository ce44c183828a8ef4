"""Train and eval records from seeded random streams that never share a prompt.

Each split draws from its own stream of the task seed. The eval split is the first `count`
distinct prompts of the eval stream. The train split draws from the train stream and skips every
prompt of the eval split (the first `eval_size` of the eval stream); repeats within train are
allowed, so a small problem space still gives as many training records as asked.
"""

from __future__ import annotations

import random
from typing import Callable

Draw = Callable[[random.Random], dict]  # one random record from a random generator


def stream(task_name: str, seed: int, split: str) -> random.Random:
    # A string seed is hashed with SHA-512: the same on every machine and Python run.
    return random.Random(f"opd.tasks/{task_name}/{split}/{seed}")


def prompt_key(record: dict) -> str:
    """What makes two records the same problem: their prompt text."""
    return record["messages"][0]["content"]


def patience(size: int) -> int:
    """How many useless draws in a row mean the space has nothing more to give. Generous: a
    false alarm needs hundreds of misses in a row, which a space with room left does not produce."""
    return 1000 + 50 * size


def distinct_records(draw: Draw, rng: random.Random, count: int, what: str) -> list[dict]:
    found: dict[str, dict] = {}
    misses = 0
    while len(found) < count:
        record = draw(rng)
        key = prompt_key(record)
        if key not in found:
            found[key] = record
            misses = 0
            continue
        misses += 1
        if misses > patience(count):
            raise ValueError(f"asked for {count} distinct {what} but found only {len(found)}: the space of "
                             f"{what} is too small; lower the count or make the task larger")
    return list(found.values())


def records_outside(draw: Draw, rng: random.Random, count: int, excluded: set[str], what: str) -> list[dict]:
    records = []
    misses = 0
    while len(records) < count:
        record = draw(rng)
        if prompt_key(record) not in excluded:
            records.append(record)
            misses = 0
            continue
        misses += 1
        if misses > patience(len(excluded)):
            raise ValueError(f"no training {what} left: the {len(excluded)} eval {what} use up (nearly) the "
                             f"whole space; lower task.eval_size or make the task larger")
    return records


def split_records(task_name: str, seed: int, draw: Draw, split: str, count: int, eval_size: int,
                  what: str) -> list[dict]:
    eval_stream = stream(task_name, seed, "eval")
    if split == "eval":
        return distinct_records(draw, eval_stream, count, what)
    held_out = {prompt_key(r) for r in distinct_records(draw, eval_stream, eval_size, what)}
    return records_outside(draw, stream(task_name, seed, "train"), count, held_out, what)
