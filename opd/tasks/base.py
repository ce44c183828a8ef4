"""What every task and grader shares: the Grade a grader returns, the error it raises, and a
helper to read a field of a record with an error that says what the record holds instead."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Grade:
    score: float  # in [0, 1]; the RL reward and the accuracy
    checks: dict[str, bool] = field(default_factory=dict)  # per-check results (instruction task), else empty


class GraderError(ValueError):
    """A record or grader spec that cannot be graded; the message says what is wrong and what was found."""


def required_field(record: dict, key: str, grader: str):
    """record[key], or a GraderError naming the grader that needs it and the keys the record has."""
    if key not in record:
        raise GraderError(f"grader {grader!r} needs the record field {key!r}; "
                          f"the record has keys {sorted(record)}")
    return record[key]


def user_message(content: str) -> list[dict]:
    """The chat `messages` of a single-turn prompt."""
    return [{"role": "user", "content": content}]
