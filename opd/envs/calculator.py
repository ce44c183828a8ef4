"""A tool-use Env: the model may write `<calc>37*41</calc>`; the Env evaluates the expression with a
safe evaluator (the expression is parsed with `ast`; only numbers and + - * / // % ** are allowed,
within bounds; nothing is ever executed) and appends the result as a tool message. An answer without
a call ends the episode, graded on the final answer by the record's grader."""

from __future__ import annotations

import ast
import operator
import re

from opd.envs import StepOutcome
from opd.tasks import grade

CALL = re.compile(r"<calc>(.*?)</calc>", re.S)
MAX_CHARS = 200  # an expression longer than this is refused
MAX_MAGNITUDE = 10**15  # any number (given or computed) beyond this is refused
MAX_EXPONENT = 64
MAX_NODES = 64

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class CalcError(ValueError):
    pass


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression, or CalcError saying why it is refused."""
    if len(expression) > MAX_CHARS:
        raise CalcError(f"expression longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise CalcError("not an arithmetic expression") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise CalcError("expression too long")
    return _value(tree.body)


def _bounded(x):
    if abs(x) > MAX_MAGNITUDE:
        raise CalcError("number too large")
    return x


def _value(node: ast.AST):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or (left == 0 and right < 0)):
            raise CalcError("exponent out of range")
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
            raise CalcError("division by zero")
        if isinstance(node.op, ast.Pow) and abs(left) > 1 and abs(right) * len(str(int(abs(left)))) > 16:
            raise CalcError("number too large")  # checked before computing a huge power
        result = _BINARY[type(node.op)](left, right)
        if isinstance(result, complex):
            raise CalcError("not a real number")
        return _bounded(result)
    raise CalcError(f"{type(node).__name__} is not allowed (numbers and + - * / // % ** only)")


def show(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return repr(round(value, 6)) if isinstance(value, float) else str(value)


class CalculatorEnv:
    """Arithmetic with a calculator tool. Turn by turn: the model's `<calc>` calls are answered in
    one tool message ("37*41 = 1517"); a turn without a call is the final answer."""

    def __init__(self, grader: str | None = None, role: str = "tool", **_):
        self.grader, self.role = grader, role
        self.record: dict = {}

    def reset(self, record: dict) -> list[dict]:
        self.record = record
        return list(record.get("messages") or [])

    def step(self, assistant_text: str) -> StepOutcome:
        calls = CALL.findall(assistant_text)
        if not calls:
            return StepOutcome(done=True, reward=grade(self.record, assistant_text, self.grader).score)
        lines = []
        for expression in calls:
            try:
                lines.append(f"{expression.strip()} = {show(calculate(expression))}")
            except CalcError as err:
                lines.append(f"{expression.strip()}: error: {err}")
        return StepOutcome([{"role": self.role, "content": "\n".join(lines)}], done=False, tool_calls=len(calls))
