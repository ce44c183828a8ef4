"""Synthetic arithmetic answered step by step: "What is 12 + 7 - 4?" ->
"12 + 7 = 19. 19 - 4 = 15. The answer is 15."

Operators are applied strictly left to right (no precedence), so every step is one operation on
the previous result and the next operand; the prompt says so when there is more than one step.
"""

from __future__ import annotations

import operator
import random
import re
from typing import TYPE_CHECKING

from opd.tasks.base import Grade, GraderError, required_field, user_message

if TYPE_CHECKING:
    from opd.config import ArithmeticTaskConfig

APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}

ANSWER_PHRASE = re.compile(r"the answer is", re.IGNORECASE)
# An integer right after the phrase; a trailing period is fine, "15.5" or "1,500" is not an integer.
INTEGER = re.compile(r"\s*:?\s*(-?\d+)(?![\d.,]*\d)")


def draw_operand(rng: random.Random, max_digits: int) -> int:
    # Choosing the length first keeps short numbers common; one digit includes 0.
    digits = rng.randint(1, max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10 ** digits - 1)


def problem_count(cfg: ArithmeticTaskConfig) -> int:
    """How many different problems the config can produce."""
    operands = 10 ** cfg.digits  # every number from 0 to 10^digits - 1
    return operands ** (cfg.operations + 1) * len(set(cfg.operators)) ** cfg.operations


def check_problem_space(cfg: ArithmeticTaskConfig, split: str, count: int, eval_size: int) -> None:
    """A ValueError unless the config has enough different problems for the split: `count` for
    eval; for train, at least one beside the `eval_size` eval problems."""
    size = problem_count(cfg)
    needed = count if split == "eval" else eval_size + 1
    if needed > size:
        wanted = f"{count} eval problems" if split == "eval" else f"{eval_size} eval problems and training ones"
        raise ValueError(f"task.arithmetic ({cfg.digits} digits, {cfg.operations} operations, operators "
                         f"{cfg.operators!r}) has only {size} different problems, too few for {wanted}; "
                         f"allow more digits or operations, or lower task.eval_size")


def draw_problem(cfg: ArithmeticTaskConfig, rng: random.Random) -> dict:
    operands = [draw_operand(rng, cfg.digits) for _ in range(cfg.operations + 1)]
    operators = [rng.choice(cfg.operators) for _ in range(cfg.operations)]

    value = operands[0]
    steps = []
    for symbol, operand in zip(operators, operands[1:]):
        result = APPLY[symbol](value, operand)
        steps.append(f"{value} {symbol} {operand} = {result}.")
        value = result

    expression = str(operands[0]) + "".join(f" {s} {x}" for s, x in zip(operators, operands[1:]))
    how = "Work left to right, and end with" if cfg.operations > 1 else "End with"
    question = f'What is {expression}? {how} "The answer is <number>."'
    return {
        "messages": user_message(question),
        "task": "arithmetic",
        "answer": str(value),
        "completion": " ".join(steps) + f" The answer is {value}.",
        "digits": cfg.digits,
        "operations": cfg.operations,
    }


def final_integer(completion: str) -> int | None:
    """The integer right after the last "The answer is" (any case), or None."""
    phrases = list(ANSWER_PHRASE.finditer(completion))
    if not phrases:
        return None
    match = INTEGER.match(completion, phrases[-1].end())
    return int(match.group(1)) if match else None


def grade_arithmetic(record: dict, completion: str) -> Grade:
    answer = str(required_field(record, "answer", "arithmetic")).strip()
    if not re.fullmatch(r"-?\d+", answer):
        raise GraderError(f"arithmetic record answer must be an integer, found {answer!r}")
    return Grade(score=1.0 if final_integer(completion) == int(answer) else 0.0)
