"""Graders for the user's own data: records with a prompt and a reference `answer`, graded by a
named grader (exact, numeric, regex, math) or by the user's own function (module:function).

Every grader is a function (completion, record) -> score: 0 or 1 for the named graders, the
user function's bool or number (as a float) for module:function.
"""

from __future__ import annotations

import importlib
import numbers
import os
import re
import sys
from fractions import Fraction
from typing import Callable

from opd.tasks.base import GraderError, required_field

Grader = Callable[[str, dict], float]

# "The answer is 42", "Final answer: 42", "answer is: 42".
ANSWER_MARKER = re.compile(r"answer\s*(?:is\b|:)\s*:?", re.IGNORECASE)


def final_answer(completion: str) -> str:
    """The text after the last answer marker, up to the end of its line or sentence; the whole
    completion when there is no marker."""
    markers = list(ANSWER_MARKER.finditer(completion))
    if not markers:
        return completion
    rest = completion[markers[-1].end():].strip()
    return re.split(r"\n|(?<=[.!?])\s", rest, maxsplit=1)[0]


def trim(text: str) -> str:
    """Without surrounding whitespace, quotes, `$`, markdown `*`, or trailing punctuation."""
    previous = None
    while text != previous:
        previous = text
        text = text.strip().strip("\"'`$*").rstrip(".,;:!?")
    return text


# ---------------------------------------------------------------------------------------------
# exact


def normalise_text(text: str) -> str:
    return " ".join(trim(text).lower().split())


def exact(completion: str, answer: str) -> float:
    return float(normalise_text(final_answer(completion)) == normalise_text(answer))


# ---------------------------------------------------------------------------------------------
# numeric

# A number not glued to a word: a fraction 3/4, 1,234.5 with thousands commas, 2.5e-3, .5.
NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d+\s*/\s*\d+|\d{1,3}(?:,\d{3})+(?:\.\d+)?"
                    r"|\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+)")


def parse_number(token: str) -> Fraction | None:
    """A NUMBER match as an exact rational (None for a zero denominator)."""
    token = token.replace(",", "").replace(" ", "")
    numerator, _, denominator = token.partition("/")
    if denominator and Fraction(denominator) == 0:
        return None
    return Fraction(numerator) / Fraction(denominator or 1)


def last_number(text: str) -> Fraction | None:
    matches = NUMBER.findall(text.replace("\u2212", "-"))  # a typographic minus is a minus
    return parse_number(matches[-1]) if matches else None


def numeric(completion: str, answer: str) -> float:
    reference = last_number(answer)
    if reference is None:
        raise GraderError(f"grader 'numeric': the record answer {answer!r} contains no number")
    given = last_number(final_answer(completion))
    if given is None:
        return 0.0
    return float(abs(given - reference) <= Fraction(1, 10 ** 6) * max(abs(given), abs(reference)))


# ---------------------------------------------------------------------------------------------
# regex


def regex(completion: str, answer: str) -> float:
    try:
        pattern = re.compile(answer)
    except re.error as err:
        raise GraderError(f"grader 'regex': the record answer {answer!r} is not a valid regular "
                          f"expression: {err}") from None
    return float(pattern.search(completion) is not None)


# ---------------------------------------------------------------------------------------------
# math: LaTeX answers compared as rationals when both are numbers, else as normalised strings


def braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the {...} group opening at text[start], and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1:i], i + 1
    return None


def last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    opening = text.find("{", start)
    if opening < 0 or text[start + len("\\boxed"):opening].strip():
        return None
    found = braced(text, opening)
    return found[0] if found else None


def frac_arguments(text: str, i: int) -> tuple[list[str], int] | None:
    """The two arguments of a \\frac whose name ends before text[i]: {braced} or one character
    (\\frac12)."""
    arguments = []
    for _ in range(2):
        while i < len(text) and text[i] == " ":
            i += 1
        if i >= len(text):
            return None
        if text[i] == "{":
            found = braced(text, i)
            if found is None:
                return None
            argument, i = found
        else:
            argument, i = text[i], i + 1
        arguments.append(argument)
    return arguments, i


def replace_fracs(text: str) -> str:
    r"""\frac{a}{b} -> a/b, parenthesising what is not a single token: \frac{x+1}{2} -> (x+1)/2."""
    def group(part: str) -> str:
        return part if re.fullmatch(r"-?[\w.]+", part) else f"({part})"

    out, i = "", 0
    while (start := text.find("\\frac", i)) >= 0:
        out += text[i:start]
        found = frac_arguments(text, start + len("\\frac"))
        if found is None:
            out += "\\frac"
            i = start + len("\\frac")
            continue
        (numerator, denominator), i = found
        fraction = f"{group(replace_fracs(numerator))}/{group(replace_fracs(denominator))}"
        # After a digit (a mixed number, 1\frac{1}{2}) keep it apart, or it would read as 11/2.
        out += f"({fraction})" if out[-1:].isdigit() else fraction
    return out + text[i:]


LATEX_NOISE = [  # (pattern, replacement), applied in order
    (r"\\[dt]frac", r"\\frac"),
    (r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\{([^{}]*)\}", r"\1"),
    (r"\\(?:left|right)(?![a-zA-Z])", ""),
    (r"\\[!,;: ]", ""),  # thin spaces
    (r"\\displaystyle", ""),
    (r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree|\u00b0", ""),  # degrees
    (r"\\?[%$]", ""),
]


def normalise_math(text: str) -> str:
    for pattern, replacement in LATEX_NOISE:
        text = re.sub(pattern, replacement, text)
    text = replace_fracs(text)
    text = re.sub(r"\s+", "", trim(text))
    text = re.sub(r"^[A-Za-z]=", "", text)  # "x = 3" -> "3"
    return re.sub(r"(\d)\.0+(?!\d)", r"\1", text)  # "3.0" -> "3"


def to_rational(text: str) -> Fraction | None:
    """An int, decimal or a/b (with an optional sign) as an exact rational; None otherwise."""
    if re.fullmatch(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", text):
        text = text.replace(",", "")
    parts = text.split("/")
    number = r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)"
    if len(parts) > 2 or not all(re.fullmatch(number, p) for p in parts):
        return None
    value = Fraction(parts[0])
    if len(parts) == 2:
        if Fraction(parts[1]) == 0:
            return None
        value /= Fraction(parts[1])
    return value


def math_equal(completion: str, answer: str) -> float:
    """1 when math-verify (Hugging Face's verifier: symbolic, intervals, sets) finds the two equal,
    or opd's own normaliser does (kept for what math-verify does not read the same way: a unit
    like 50\\% against 50, \\text{east} against east); 0 otherwise. Without math-verify installed,
    the normaliser alone."""
    if verified(completion, answer):
        return 1.0
    return normalised_equal(completion, answer)


def verified(completion: str, answer: str) -> bool:
    """math-verify's verdict, gold first (it is not symmetric); False when it is not installed or
    reads nothing on either side. A bare reference answer is read as LaTeX math ($...$)."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    import logging
    import threading

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call without a time limit
    # its time limits use SIGALRM, which exists only in the main thread (evaluation may run elsewhere)
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    reference = answer if ("\\boxed" in answer or "$" in answer) else f"${answer}$"
    gold = parse(reference, parsing_timeout=limit)
    given = parse(completion, parsing_timeout=limit)
    if not gold or not given:
        return False
    return bool(verify(gold, given, timeout_seconds=limit))


def normalised_equal(completion: str, answer: str) -> float:
    """opd's own comparison: the last \\boxed{} (or the final answer) normalised, as rationals
    when both are numbers, else as strings."""
    given = last_boxed(completion)
    given = normalise_math(given if given is not None else final_answer(completion))
    reference = last_boxed(answer)
    reference = normalise_math(reference if reference is not None else answer)
    given_value, reference_value = to_rational(given), to_rational(reference)
    if given_value is not None and reference_value is not None:
        return float(given_value == reference_value)
    return float(given == reference)


# ---------------------------------------------------------------------------------------------
# Resolving a grader spec

NAMED: dict[str, Callable[[str, str], float]] = {"exact": exact, "numeric": numeric, "regex": regex, "math": math_equal}


def with_answer(name: str, compare: Callable[[str, str], float]) -> Grader:
    def grade(completion: str, record: dict) -> float:
        answer = required_field(record, "answer", name)
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise GraderError(f"grader {name!r}: the record answer must be a string or a number, "
                              f"found {type(answer).__name__} {answer!r}")
        return compare(completion, str(answer))
    return grade


def user_grader(spec: str) -> Grader:
    """`module:function`, imported from sys.path (the current directory included)."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise GraderError(f"grader {spec!r}: write a user grader as module:function")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a grader.py next to the config, as in `python -m`
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any failure while importing user code is a bad grader spec
        raise GraderError(f"grader {spec!r}: cannot import module {module_name!r} "
                          f"({type(err).__name__}: {err})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise GraderError(f"grader {spec!r}: module {module_name!r} has no function {function_name!r}")

    def grade(completion: str, record: dict) -> float:
        result = function(completion, record)
        if not isinstance(result, (bool, numbers.Real)):
            raise GraderError(f"grader {spec!r} returned {result!r} ({type(result).__name__}); "
                              f"it must return a bool or a number")
        return float(result)
    return grade


def resolve_grader(spec: str) -> Grader:
    """The grader a spec names: exact | numeric | regex | math | module:function."""
    spec = spec.strip()
    if spec in NAMED:
        return with_answer(spec, NAMED[spec])
    if ":" in spec:
        return user_grader(spec)
    raise GraderError(f"unknown grader {spec!r}; use one of {sorted(NAMED)} or module:function "
                      f"(a function (completion, record) -> score in your own module)")
