"""Everyday chat requests with instructions a program can verify, in the spirit of IFEval:
"Explain why the sky is blue. Use at most 40 words. Do not use any commas."

Each check is a small function `(response, **params) -> bool` registered in CHECKS with a way to
draw its params and the instruction sentence that asks for it. A record lists its checks with
their params, so grading needs nothing but the record.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from opd.tasks.base import Grade, GraderError, required_field, user_message

if TYPE_CHECKING:
    from opd.config import InstructionTaskConfig

# A word: letters and digits, possibly joined by an apostrophe or hyphen ("don't", "well-known").
WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")
# A sentence ends at . ! or ? (or a run of them) followed by whitespace or the end: "3.5" does not end one.
SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
JSON_FENCE = re.compile(r"```(?:json)?\s*\n(.*?)\n?\s*```", re.DOTALL | re.IGNORECASE)


def count_words(text: str) -> int:
    return len(WORD.findall(text))


def count_sentences(text: str) -> int:
    return sum(1 for piece in SENTENCE_END.split(text) if WORD.search(piece))


def has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


# ---------------------------------------------------------------------------------------------
# The checks


def lowercase(response: str) -> bool:
    """Some letters, none of them uppercase."""
    return any(c.isalpha() for c in response) and not any(c.isupper() for c in response)


def uppercase(response: str) -> bool:
    """Some letters, none of them lowercase."""
    return any(c.isalpha() for c in response) and not any(c.islower() for c in response)


def max_words(response: str, n: int) -> bool:
    """At most n words; a word is a run of letters or digits, possibly joined by ' or -."""
    return count_words(response) <= n


def min_words(response: str, n: int) -> bool:
    """At least n words, counted as in max_words."""
    return count_words(response) >= n


def max_sentences(response: str, n: int) -> bool:
    """At most n sentences; a sentence is text with a word in it, ended by . ! or ? followed by
    whitespace (or by the end of the reply, with or without a mark)."""
    return count_sentences(response) <= n


def include_keywords(response: str, words: list[str]) -> bool:
    """Every word appears as a whole word, in any case."""
    return all(has_word(response, w) for w in words)


def exclude_keywords(response: str, words: list[str]) -> bool:
    """None of the words appears as a whole word, in any case."""
    return not any(has_word(response, w) for w in words)


def json_output(response: str) -> bool:
    """The whole reply parses as JSON, or is one ```json fenced block whose content does."""
    text = response.strip()
    fenced = JSON_FENCE.fullmatch(text)
    try:
        json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return False
    return True


def starts_with(response: str, phrase: str) -> bool:
    """The reply begins with the phrase exactly, leading whitespace ignored."""
    return response.lstrip().startswith(phrase)


def ends_with(response: str, phrase: str) -> bool:
    """The reply ends with the phrase exactly, trailing whitespace ignored."""
    return response.rstrip().endswith(phrase)


def bullet_points(response: str, n: int) -> bool:
    """Exactly n lines start with "* " or "- " (after any indentation)."""
    return sum(1 for line in response.splitlines() if line.lstrip().startswith(("* ", "- "))) == n


def no_commas(response: str) -> bool:
    """No comma anywhere."""
    return "," not in response


def quoted(response: str) -> bool:
    """The reply, stripped of surrounding whitespace, is wrapped in double quotes."""
    text = response.strip()
    return len(text) >= 2 and text[0] == '"' and text[-1] == '"'


def paragraphs(response: str, n: int) -> bool:
    """Exactly n paragraphs: non-blank blocks separated by one or more blank lines."""
    blocks = re.split(r"\n\s*\n", response.strip())
    return sum(1 for block in blocks if block.strip()) == n


# ---------------------------------------------------------------------------------------------
# The registry: each check with its params and its instruction sentence


@dataclass(frozen=True)
class Check:
    test: Callable[..., bool]  # (response, **params) -> passed
    draw: Callable[[random.Random], dict]  # random params for a new prompt
    describe: Callable[..., str]  # (**params) -> the instruction sentence


KEYWORDS = ["garden", "river", "window", "morning", "lantern", "pocket", "orange", "thunder",
            "pencil", "blanket", "harbor", "candle", "meadow", "compass", "kettle", "violin"]
FILLER_WORDS = ["very", "really", "just", "basically", "actually", "stuff", "things", "nice",
                "important", "definitely", "literally", "simply"]
OPENINGS = ["Great question.", "Here is my answer:", "Sure thing!"]
CLOSINGS = ["Is there anything else I can help with?", "Hope this helps!", "That is all."]


def no_params(rng: random.Random) -> dict:
    return {}


def count_from(*choices: int) -> Callable[[random.Random], dict]:
    return lambda rng: {"n": rng.choice(choices)}


def words_from(pool: list[str]) -> Callable[[random.Random], dict]:
    return lambda rng: {"words": rng.sample(pool, rng.randint(1, 2))}


def phrase_from(pool: list[str]) -> Callable[[random.Random], dict]:
    return lambda rng: {"phrase": rng.choice(pool)}


def quote_words(words: list[str], joiner: str) -> str:
    return f" {joiner} ".join(f'"{w}"' for w in words)


CHECKS: dict[str, Check] = {
    "lowercase": Check(lowercase, no_params,
                       lambda: "Write your entire reply in lowercase letters, with no capital letters at all."),
    "uppercase": Check(uppercase, no_params, lambda: "Write your entire reply in capital letters."),
    "max_words": Check(max_words, count_from(40, 60, 80, 100), lambda n: f"Use at most {n} words."),
    "min_words": Check(min_words, count_from(50, 80, 120), lambda n: f"Use at least {n} words."),
    "max_sentences": Check(max_sentences, count_from(2, 3, 4, 5), lambda n: f"Use no more than {n} sentences."),
    "include_keywords": Check(include_keywords, words_from(KEYWORDS),
                              lambda words: f"Include the word{'s' * (len(words) > 1)} {quote_words(words, 'and')}."),
    "exclude_keywords": Check(exclude_keywords, words_from(FILLER_WORDS),
                              lambda words: f"Do not use the word{'s' * (len(words) > 1)} {quote_words(words, 'or')}."),
    "json_output": Check(json_output, no_params, lambda: "Format your entire reply as valid JSON."),
    "starts_with": Check(starts_with, phrase_from(OPENINGS),
                         lambda phrase: f'Start your reply with the exact phrase "{phrase}"'),
    "ends_with": Check(ends_with, phrase_from(CLOSINGS),
                       lambda phrase: f'End your reply with the exact phrase "{phrase}"'),
    "bullet_points": Check(bullet_points, count_from(2, 3, 4, 5),
                           lambda n: f'Format your reply as exactly {n} bullet points, each on its own line '
                                     f'starting with "* ".'),
    "no_commas": Check(no_commas, no_params, lambda: "Do not use any commas."),
    "quoted": Check(quoted, no_params, lambda: "Wrap your entire reply in double quotation marks."),
    "paragraphs": Check(paragraphs, count_from(2, 3, 4),
                        lambda n: f"Write exactly {n} paragraphs, separated by blank lines."),
}

# Pairs of checks that no sensible reply satisfies together.
INCOMPATIBLE = {frozenset(pair) for pair in [
    ("lowercase", "uppercase"),
    ("max_words", "min_words"),
    ("min_words", "max_sentences"),  # 120 words in 2 sentences is no reasonable request
    ("lowercase", "starts_with"), ("lowercase", "ends_with"),  # the phrases have capitals...
    ("uppercase", "starts_with"), ("uppercase", "ends_with"),  # ...and lowercase letters
    ("json_output", "bullet_points"), ("json_output", "paragraphs"), ("json_output", "starts_with"),
    ("json_output", "ends_with"), ("json_output", "quoted"), ("json_output", "no_commas"),
    ("quoted", "starts_with"), ("quoted", "ends_with"), ("quoted", "bullet_points"),
    ("max_sentences", "paragraphs"), ("max_sentences", "bullet_points"),
]}


def required_words(check: dict) -> set[str]:
    """Words a reply must contain to pass `check` (lowercased)."""
    if check["name"] == "include_keywords":
        return {w.lower() for w in check.get("words", [])}
    if check["name"] in ("starts_with", "ends_with"):
        return {w.lower() for w in WORD.findall(check.get("phrase", ""))}
    return set()


def compatible(checks: list[dict]) -> bool:
    """Whether one reply can pass all of these checks: different names, no incompatible pair,
    and no word both required (a keyword, a word of a fixed phrase) and excluded."""
    names = [c["name"] for c in checks]
    if len(set(names)) < len(names):
        return False
    if any(frozenset(pair) in INCOMPATIBLE for pair in itertools.combinations(names, 2)):
        return False
    required = set().union(*(required_words(c) for c in checks))
    excluded = {w.lower() for c in checks if c["name"] == "exclude_keywords" for w in c.get("words", [])}
    return not required & excluded


# ---------------------------------------------------------------------------------------------
# Prompts


REQUESTS = [
    "Give me some tips for keeping houseplants alive.",
    "Explain how a rainbow forms.",
    "Suggest a plan for a relaxing weekend at home.",
    "Describe an ideal breakfast.",
    "How can I get better at remembering names?",
    "Write a short note thanking a neighbour for watering my plants.",
    "What should I pack for a weekend camping trip?",
    "Explain why the sky is blue.",
    "Give advice to someone starting to learn the guitar.",
    "Describe a good way to organise a small kitchen.",
    "How do I make a simple tomato soup?",
    "Suggest some ways to save money on groceries.",
    "Explain what a household budget is and why it helps.",
    "Write a short welcome message for a new coworker.",
    "What are some fun things to do on a rainy day?",
    "Give me tips for sleeping better.",
    "Describe how to care for a pet goldfish.",
    "Explain how a bicycle stays upright.",
    "Suggest a few names for a small bakery.",
    "What makes a good study routine?",
    "Describe winter to someone who has never seen snow.",
    "Give advice for a first job interview.",
    "How can I start running if I have never exercised?",
    "Explain how to plant a tree.",
    "Write a short invitation to a birthday picnic.",
    "What are the benefits of reading every day?",
    "Describe a walk through a busy market.",
    "Give me ideas for a homemade gift.",
    "Explain how to make a good cup of tea.",
    "Suggest ways to reduce stress at work.",
    "Describe how to clean a bicycle chain.",
    "What should I consider before adopting a dog?",
    "Explain how recycling works in a typical town.",
    "Give tips for taking better photos with a phone.",
    "Describe a cosy evening routine.",
    "How do I plan a small dinner party?",
    "Explain what makes bread rise.",
    "Suggest a few hobbies that can be done indoors.",
    "Give advice on keeping a tidy desk.",
    "Describe a seaside town in summer.",
]


def allowed_checks(cfg: InstructionTaskConfig) -> list[str]:
    """The checks prompts may use (in registry order), or a ValueError if the config names an
    unknown one or allows no compatible set of `checks_per_prompt`."""
    if cfg.checks is None:
        names = list(CHECKS)
    else:
        unknown = [name for name in cfg.checks if name not in CHECKS]
        if unknown:
            raise ValueError(f"task.instruction.checks: unknown check(s) {unknown}; known: {sorted(CHECKS)}")
        names = [name for name in CHECKS if name in cfg.checks]
    k = cfg.checks_per_prompt
    # Names alone decide: the word clashes that `compatible` also rejects are always avoidable.
    if not any(compatible([{"name": n} for n in combo]) for combo in itertools.combinations(names, k)):
        raise ValueError(f"task.instruction: no {k} of the checks {names} can be asked together; "
                         f"allow more checks or lower checks_per_prompt")
    return names


def prompt_drawer(cfg: InstructionTaskConfig) -> Callable[[random.Random], dict]:
    """A function that draws one record: a request with `checks_per_prompt` compatible checks."""
    names = allowed_checks(cfg)

    def draw(rng: random.Random) -> dict:
        while True:  # rejection sampling ends: a compatible choice exists (allowed_checks) and is likely
            chosen = rng.sample(names, cfg.checks_per_prompt)
            checks = [{"name": name, **CHECKS[name].draw(rng)} for name in chosen]
            if compatible(checks):
                break
        request = rng.choice(REQUESTS)
        sentences = [CHECKS[c["name"]].describe(**{k: v for k, v in c.items() if k != "name"}) for c in checks]
        return {"messages": user_message(" ".join([request, *sentences])), "task": "instruction", "checks": checks}

    return draw


# ---------------------------------------------------------------------------------------------
# Grading


def grade_instruction(record: dict, completion: str) -> Grade:
    """1 if every check passes, else 0; `checks` says which passed. A blank reply passes none
    (it would otherwise pass max_words, no_commas, exclude_keywords...)."""
    specs = required_field(record, "checks", "instruction")
    if not isinstance(specs, list) or not specs:
        raise GraderError(f"instruction record `checks` must be a non-empty list, found {specs!r}")
    results = {}
    for spec in specs:
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in CHECKS:
            raise GraderError(f"unknown instruction check {spec!r}; known: {sorted(CHECKS)}")
        params = {k: v for k, v in spec.items() if k != "name"}
        try:
            passed = CHECKS[name].test(completion, **params)
        except TypeError as err:
            raise GraderError(f"instruction check {name!r} cannot take params {params}: {err}") from None
        results[name] = bool(passed) and bool(completion.strip())
    return Grade(score=1.0 if all(results.values()) else 0.0, checks=results)
