"""Synthetic arithmetic answered step by step: "What is 12 + 7 - 4?" ->
"12 + 7 = 19. 19 - 4 = 15. The answer is 15."

Operators are applied strictly left to right (no precedence), so every step is one operation on
the previous result and the next operand; the prompt says so when there is more than one step.

With `words`, each problem is a short templated sentence instead ("Tom buys 23 tickets at 17
dollars each. How many dollars does he pay?"), answered and graded the same way; its record also
holds `expression`, what a calculator is asked ("23 * 17").
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


# Word problems: (operators applied left to right, sentence with one slot per operand).
WORD_TEMPLATES = [
    ("*", "A crate holds {0} boxes of {1} apples. How many apples are in the crate?"),
    ("*", "Tom buys {0} tickets at {1} dollars each. How many dollars does he pay?"),
    ("*", "A hall has {0} rows of {1} seats. How many seats are there?"),
    ("+", "Ann has {0} stamps and gets {1} more. How many stamps does she have now?"),
    ("+", "A bus carries {0} people and {1} more get on. How many people are on the bus?"),
    ("-", "A tank holds {0} liters and {1} liters leak out. How many liters are left?"),
    ("*+", "Tom buys {0} tickets at {1} dollars each and pays {2} dollars for parking. "
           "How many dollars does he pay in all?"),
    ("*-", "A farm has {0} rows of {1} trees and {2} trees are cut down. How many trees are left?"),
    ("++", "A shop sells {0} pens on Monday, {1} on Tuesday and {2} on Wednesday. How many pens does it sell?"),
    ("+*", "A team has {0} boys and {1} girls, and each child gets {2} stickers. How many stickers are given out?"),
]
SMALLEST_WORD_OPERAND = 2  # no "0 boxes of 1 apple"


def word_templates(cfg: ArithmeticTaskConfig) -> list[tuple[str, str]]:
    """The templates with `cfg.operations` operators, all of them among `cfg.operators`."""
    return [(ops, text) for ops, text in WORD_TEMPLATES if len(ops) == cfg.operations and set(ops) <= set(cfg.operators)]


def problem_count(cfg: ArithmeticTaskConfig) -> int:
    """How many different problems the config can produce (for word problems: at most, since a
    subtraction whose result would be negative is drawn again)."""
    if cfg.words:
        operands = 10 ** cfg.digits - SMALLEST_WORD_OPERAND
        return operands ** (cfg.operations + 1) * len(word_templates(cfg))
    operands = 10 ** cfg.digits  # every number from 0 to 10^digits - 1
    return operands ** (cfg.operations + 1) * len(set(cfg.operators)) ** cfg.operations


def check_problem_space(cfg: ArithmeticTaskConfig, split: str, count: int, eval_size: int) -> None:
    """A ValueError unless the config has enough different problems for the split: `count` for
    eval; for train, at least one beside the `eval_size` eval problems."""
    if cfg.words and not word_templates(cfg):
        have = sorted({ops for ops, _ in WORD_TEMPLATES if len(ops) == cfg.operations} or {ops for ops, _ in WORD_TEMPLATES})
        raise ValueError(f"task.arithmetic.words: no word problem has {cfg.operations} operation(s) using only "
                         f"{cfg.operators!r}; the templates use (left to right) {', '.join(have)}")
    size = problem_count(cfg)
    needed = count if split == "eval" else eval_size + 1
    if needed > size:
        wanted = f"{count} eval problems" if split == "eval" else f"{eval_size} eval problems and training ones"
        raise ValueError(f"task.arithmetic ({cfg.digits} digits, {cfg.operations} operations, operators "
                         f"{cfg.operators!r}) has only {size} different problems, too few for {wanted}; "
                         f"allow more digits or operations, or lower task.eval_size")


def left_to_right(operands: list[int], operators: list[str]) -> tuple[int, list[str]]:
    """The value and the worked steps ("12 + 7 = 19.")."""
    value, steps = operands[0], []
    for symbol, operand in zip(operators, operands[1:]):
        result = APPLY[symbol](value, operand)
        steps.append(f"{value} {symbol} {operand} = {result}.")
        value = result
    return value, steps


def draw_word_problem(cfg: ArithmeticTaskConfig, rng: random.Random) -> dict:
    ops, text = rng.choice(word_templates(cfg))
    while True:  # a count never goes below zero: draw again
        operands = [rng.randint(SMALLEST_WORD_OPERAND, 10 ** cfg.digits - 1) for _ in range(len(ops) + 1)]
        value, steps = left_to_right(operands, list(ops))
        if value >= 0:
            break
    # What a calculator (usual precedence) is asked: brackets where left to right differs from it.
    expression = str(operands[0])
    for symbol, operand in zip(ops, operands[1:]):
        if symbol == "*" and ("+" in expression or "-" in expression):
            expression = f"({expression})"
        expression += f" {symbol} {operand}"
    question = text.format(*operands) + ' End with "The answer is <number>."'
    return {
        "messages": user_message(question),
        "task": "arithmetic",
        "answer": str(value),
        "completion": " ".join(steps) + f" The answer is {value}.",
        "expression": expression,
        "digits": cfg.digits,
        "operations": cfg.operations,
    }


def draw_problem(cfg: ArithmeticTaskConfig, rng: random.Random) -> dict:
    if cfg.words:
        return draw_word_problem(cfg, rng)
    operands = [draw_operand(rng, cfg.digits) for _ in range(cfg.operations + 1)]
    operators = [rng.choice(cfg.operators) for _ in range(cfg.operations)]

    value, steps = left_to_right(operands, operators)
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


def grade_final_integer(record: dict, completion: str, task: str) -> Grade:
    """1 when the integer after the last "The answer is" equals the record's integer answer (the
    grader of every task answered by one number)."""
    answer = str(required_field(record, "answer", task)).strip()
    if not re.fullmatch(r"-?\d+", answer):
        raise GraderError(f"{task} record answer must be an integer, found {answer!r}")
    return Grade(score=1.0 if final_integer(completion) == int(answer) else 0.0)


def grade_arithmetic(record: dict, completion: str) -> Grade:
    return grade_final_integer(record, completion, "arithmetic")
