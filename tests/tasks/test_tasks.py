"""Built-in tasks and graders: records, splits, documents, and every grader and instruction check
on hand-written passing and failing replies."""

import itertools
import json
import operator
import random
import re

import pytest

from opd.config import TaskConfig
from opd.tasks import Grade, GraderError, documents, grade, is_graded, make_records, resolve_grader
from opd.tasks import instruction, knowledge
from opd.tasks.instruction import CHECKS, INCOMPATIBLE, compatible, count_sentences, count_words


def task(name, **fields):
    return TaskConfig(name=name, **fields)


def prompt_of(record):
    return record["messages"][0]["content"]


# ---------------------------------------------------------------------------------------------
# Records: determinism, splits, counts, JSON


@pytest.mark.parametrize("name", ["arithmetic", "knowledge", "instruction"])
def test_records_are_deterministic_and_json_round_trip(name):
    cfg = task(name, train_size=40, eval_size=20)
    for split in ("train", "eval"):
        records = make_records(cfg, split)
        assert records == make_records(cfg, split)
        assert json.loads(json.dumps(records)) == records
        for r in records:
            assert r["task"] == name and r["messages"][0]["role"] == "user" and prompt_of(r).isascii()
            assert r.get("completion", "").isascii()
    assert make_records(task(name, seed=1), "eval", 10) != make_records(cfg, "eval", 10)


@pytest.mark.parametrize("name", ["arithmetic", "instruction"])
def test_train_and_eval_never_share_a_prompt(name):
    cfg = task(name, eval_size=50)
    train, evaluation = make_records(cfg, "train", 300), make_records(cfg, "eval")
    assert len(train) == 300 and len(evaluation) == 50
    assert len({prompt_of(r) for r in evaluation}) == 50  # eval prompts are distinct
    assert not {prompt_of(r) for r in train} & {prompt_of(r) for r in evaluation}
    assert make_records(cfg, "eval", 7) == evaluation[:7]  # a smaller eval set is a prefix


def test_knowledge_split_is_by_fact():
    cfg = task("knowledge")  # 24 people x 5 facts, half held out
    evaluation, train = make_records(cfg, "eval"), make_records(cfg, "train", 200)
    assert len(evaluation) == 60  # eval_size 100 asks for more than there are: all of them
    assert len(make_records(cfg, "eval", 10)) == 10
    assert len(train) == 200  # training questions cycle through the 60 training facts
    facts = lambda records: {(r["person"], r["attribute"]) for r in records}
    assert len(facts(evaluation)) == 60 and len(facts(train)) == 60
    assert not facts(evaluation) & facts(train)


def test_errors_for_tasks_without_records_or_documents():
    with pytest.raises(ValueError, match="no built-in task"):
        make_records(task("none"), "eval")
    with pytest.raises(ValueError, match="'train' or 'eval'"):
        make_records(task("arithmetic"), "test")
    with pytest.raises(ValueError, match="'arithmetic' has no documents"):
        documents(task("arithmetic"))


def test_arithmetic_space_too_small():
    small = {"digits": 1, "operations": 1, "operators": "+"}  # 10 x 10 = 100 problems
    with pytest.raises(ValueError, match="only 100 different problems"):
        make_records(task("arithmetic", arithmetic=small), "eval", 101)
    with pytest.raises(ValueError, match="only 100 different problems"):
        make_records(task("arithmetic", arithmetic=small, eval_size=100), "train", 5)
    # One problem is left for training: train repeats it.
    train = make_records(task("arithmetic", arithmetic=small, eval_size=99), "train", 20)
    assert len({prompt_of(r) for r in train}) == 1 and len(train) == 20


# ---------------------------------------------------------------------------------------------
# Arithmetic


def evaluate_left_to_right(expression):
    tokens = expression.split()
    value = int(tokens[0])
    for symbol, operand in zip(tokens[1::2], tokens[2::2]):
        value = {"+": operator.add, "-": operator.sub, "*": operator.mul}[symbol](value, int(operand))
    return value


def test_arithmetic_records():
    cfg = task("arithmetic", arithmetic={"digits": 3, "operations": 3, "operators": "+*"})
    widths = set()
    for r in make_records(cfg, "eval", 50):
        expression = re.match(r"What is (.*?)\?", prompt_of(r)).group(1)
        tokens = expression.split()
        widths |= {len(x) for x in tokens[::2]}
        assert len(tokens) == 7 and set(tokens[1::2]) <= {"+", "*"}
        assert all(0 <= int(x) < 1000 for x in tokens[::2])
        assert r["answer"] == str(evaluate_left_to_right(expression))
        assert "left to right" in prompt_of(r)
        assert r["completion"].endswith(f"The answer is {r['answer']}.") and r["completion"].count(" = ") == 3
        assert grade(r, r["completion"]).score == 1.0
        assert (r["digits"], r["operations"]) == (3, 3)
    assert widths == {1, 2, 3}
    one_step = make_records(task("arithmetic"), "eval", 100)
    assert all("left to right" not in prompt_of(r) for r in one_step)
    operands = {int(x) for r in one_step for x in re.match(r"What is (.*?)\?", prompt_of(r)).group(1).split()[::2]}
    assert operands == set(range(10))  # one digit, 0 included


def word_problems(operations, operators, count=200, split="eval", seed=0):
    cfg = task("arithmetic", seed=seed, arithmetic={"digits": 2, "operations": operations, "operators": operators,
                                                    "words": True})
    return make_records(cfg, split, count)


@pytest.mark.parametrize("operations, operators", [(1, "*"), (1, "+-*"), (2, "+-*")])
def test_word_problems_are_deterministic_and_their_answers_right(operations, operators):
    from opd.envs.calculator import calculate
    from opd.tasks.arithmetic import WORD_TEMPLATES

    records = word_problems(operations, operators)
    assert records == word_problems(operations, operators)  # the same seed: the same problems
    assert records != word_problems(operations, operators, seed=1)
    train = word_problems(operations, operators, split="train")
    assert not {prompt_of(r) for r in records} & {prompt_of(r) for r in train}  # held out
    used = set()
    for r in records:
        numbers = [int(x) for x in re.findall(r"\d+", prompt_of(r))]
        assert len(numbers) == operations + 1 and all(2 <= x <= 99 for x in numbers)
        # The sentence is one of the templates with these numbers in its slots.
        template = next(t for ops, t in WORD_TEMPLATES if t.format(*numbers) in prompt_of(r))
        used.add(template)
        assert prompt_of(r).endswith('End with "The answer is <number>."')
        # The answer, computed here independently: the calculator on the record's expression, whose
        # numbers are the sentence's, in order.
        assert [int(x) for x in re.findall(r"\d+", r["expression"])] == numbers
        assert str(calculate(r["expression"])) == r["answer"] and int(r["answer"]) >= 0
        assert r["completion"].endswith(f"The answer is {r['answer']}.") and r["completion"].count(" = ") == operations
    ops_used = {ops for ops, t in WORD_TEMPLATES if t in used}
    assert ops_used == {ops for ops, _ in WORD_TEMPLATES if len(ops) == operations and set(ops) <= set(operators)}


def test_word_problems_by_hand():
    # "Tom buys 23 tickets at 17 dollars each and pays 12 dollars for parking": 23 * 17 + 12 = 403;
    # "a team of 3 boys and 4 girls, 5 stickers each": (3 + 4) * 5 = 35, not 3 + 4 * 5.
    records = word_problems(2, "+*", count=400)
    team = next(r for r in records if r["messages"][0]["content"].startswith("A team"))
    boys, girls, stickers = map(int, re.findall(r"\d+", prompt_of(team)))
    assert team["answer"] == str((boys + girls) * stickers)
    assert team["expression"] == f"({boys} + {girls}) * {stickers}"
    tickets = next(r for r in records if "parking" in prompt_of(r))
    count, price, parking = map(int, re.findall(r"\d+", prompt_of(tickets)))
    assert tickets["answer"] == str(count * price + parking)


def test_word_problems_graded_on_the_final_answer():
    record = word_problems(1, "*", count=1)[0]
    answer = int(record["answer"])
    assert grade(record, record["completion"]).score == 1.0
    assert grade(record, f"<calc>{record['expression']}</calc> The answer is {answer}.").score == 1.0
    assert grade(record, f"The answer is {answer + 1}.").score == 0.0
    assert grade(record, f"The answer is {answer}. No, the answer is {answer - 10}.").score == 0.0  # the last one
    assert grade(record, f"{answer}").score == 0.0  # no phrase


def test_word_problems_need_a_template_for_the_operators():
    with pytest.raises(ValueError, match="no word problem has 3 operation"):
        word_problems(3, "+-*")
    with pytest.raises(ValueError, match=r"no word problem has 2 operation\(s\) using only '-'"):
        word_problems(2, "-")
    # bare problems are untouched by the option's default
    assert "expression" not in make_records(task("arithmetic"), "eval", 1)[0]


@pytest.mark.parametrize("completion, answer, score", [
    ("12 + 7 = 19. 19 - 4 = 15. The answer is 15.", "15", 1.0),
    ("the answer is -3", "-3", 1.0),
    ("THE ANSWER IS 15.\n", "15", 1.0),
    ("The answer is 14. No wait: the answer is 15", "15", 1.0),
    ("15", "15", 0.0),  # no phrase: a bare number does not count
    ("The answer is 15. Actually the answer is 16.", "15", 0.0),  # the last one counts
    ("The answer is 15.5", "15", 0.0),
    ("The answer is 1,500", "1500", 0.0),
    ("The answer is fifteen, i.e. 15", "15", 0.0),
])
def test_arithmetic_grader(completion, answer, score):
    assert grade({"task": "arithmetic", "answer": answer}, completion).score == score


# ---------------------------------------------------------------------------------------------
# Knowledge


def sentences(text):
    return re.split(r"(?<=[.!?])\s+", text)


def test_documents_state_every_eval_fact_in_differently_worded_sentences():
    cfg = task("knowledge")
    docs = documents(cfg)
    assert docs == documents(cfg)
    assert 1000 < sum(len(d.split()) for d in docs) < 5000  # with the FAQ pages
    all_sentences = [s for d in docs for s in sentences(d)]
    for r in make_records(cfg, "eval"):
        stating = {s for s in all_sentences if r["person"] in s and knowledge.mentions(s, r["answer"])}
        assert len(stating) >= cfg.knowledge.paraphrases, (r["person"], r["attribute"], stating)


def test_knowledge_values_never_contain_one_another():
    for pool in (knowledge.ROLES, knowledge.PROJECTS, knowledge.ROOMS):
        for a, b in itertools.permutations(pool, 2):
            assert not knowledge.mentions(a, b), (a, b)
    names = [p.name for p in knowledge.build_company(task("knowledge", knowledge={"people": 500}).knowledge)]
    assert len(set(names)) == 500


def test_knowledge_reference_completions_pass():
    cfg = task("knowledge", knowledge={"people": 10, "paraphrases": 2})
    records = make_records(cfg, "eval") + make_records(cfg, "train", 60)
    assert {r["attribute"] for r in records} == set(knowledge.ATTRIBUTES)
    for r in records:
        assert grade(r, r["completion"]).score == 1.0
        assert r["person"] in prompt_of(r) and r["answer"] not in r["distractors"]


def test_knowledge_grader():
    record = {"task": "knowledge", "answer": "B12", "distractors": ["A3", "C7", "B123"], "person": "Ada Varga"}
    assert grade(record, "Ada Varga works in room B12.").score == 1.0
    assert grade(record, "ada varga sits in  b12").score == 1.0  # case and spacing ignored
    assert grade(record, "Ada Varga works in room C7.").score == 0.0
    assert grade(record, "Room B123.").score == 0.0  # whole words only
    assert grade(record, "One of A3, B12 or C7.").score == 0.0  # listing every room fails
    with pytest.raises(GraderError, match="distractors"):
        grade({"task": "knowledge", "answer": "B12"}, "B12")


def test_knowledge_manager_question_names_the_person_asked_about():
    # Someone who manages others is asked about their own manager: their name is no distractor.
    cfg = task("knowledge", knowledge={"people": 6})
    records = make_records(cfg, "eval") + make_records(cfg, "train", 30)
    managers = [r for r in records if r["attribute"] == "manager"]
    assert managers and all(r["person"] not in r["distractors"] for r in managers)
    assert all(grade(r, r["completion"]).score == 1.0 for r in managers)


# ---------------------------------------------------------------------------------------------
# Instruction checks


CHECK_CASES = [  # (check, params, a reply that passes, a reply that fails)
    ("lowercase", {}, "all good here", "All good"),
    ("uppercase", {}, "ALL GOOD HERE!", "ALL GOOD here"),
    ("max_words", {"n": 3}, "one two three.", "one two three four"),
    ("min_words", {"n": 3}, "don't stop now", "well-known fact"),
    ("max_sentences", {"n": 2}, "It costs 3.5 euros. That is cheap!", "One. Two. Three?"),
    ("include_keywords", {"words": ["river", "garden"]}, "The River runs by the garden.", "The riverside garden."),
    ("exclude_keywords", {"words": ["very", "just"]}, "Everything is fine, justly so.", "It is Very fine."),
    ("json_output", {}, '```json\n{"a": [1, 2]}\n```', 'Here you go: {"a": 1}'),
    ("json_output", {}, ' {"a": null} ', "{'a': 1}"),
    ("starts_with", {"phrase": "Sure thing!"}, "  Sure thing! Here it is.", "Well, Sure thing!"),
    ("ends_with", {"phrase": "That is all."}, "Done. That is all.  \n", "That is all. Bye."),
    ("bullet_points", {"n": 2}, "Intro:\n* one\n  - two\nOutro", "* one\n* two\n* three"),
    ("no_commas", {}, "No commas here.", "Yes, one comma."),
    ("quoted", {}, ' "Hello there." ', 'Hello "there"'),
    ("paragraphs", {"n": 2}, "First part.\n\n  \nSecond part.\n", "Only one\nparagraph here."),
]


@pytest.mark.parametrize("name, params, passing, failing", CHECK_CASES)
def test_instruction_check(name, params, passing, failing):
    record = {"task": "instruction", "checks": [{"name": name, **params}]}
    assert CHECKS[name].test(passing, **params) is True
    assert CHECKS[name].test(failing, **params) is False
    assert grade(record, passing) == Grade(1.0, {name: True})
    assert grade(record, failing) == Grade(0.0, {name: False})


def test_word_and_sentence_counts():
    assert count_words("Don't stop: well-known facts, 42 of them!") == 7
    assert count_sentences("Is it? Yes... it is 3.5 m tall! And more") == 4
    assert count_sentences("") == 0


def test_every_check_is_tested_and_described():
    assert {case[0] for case in CHECK_CASES} == set(CHECKS)
    rng = random.Random(0)
    for check in CHECKS.values():
        assert check.describe(**check.draw(rng)).isascii()


def test_excluded_words_never_clash_with_required_ones():
    # Otherwise drawing a compatible set of checks could reject params over and over.
    phrase_words = {w.lower() for p in instruction.OPENINGS + instruction.CLOSINGS for w in p.split()}
    assert not set(instruction.FILLER_WORDS) & (set(instruction.KEYWORDS) | {w.strip(".!?:") for w in phrase_words})


def test_instruction_grade_reports_each_check_and_fails_blank_replies():
    record = {"task": "instruction", "checks": [{"name": "no_commas"}, {"name": "max_words", "n": 3}]}
    assert grade(record, "a b c d") == Grade(0.0, {"no_commas": True, "max_words": False})
    assert grade(record, "a b c") == Grade(1.0, {"no_commas": True, "max_words": True})
    assert grade(record, "  \n") == Grade(0.0, {"no_commas": False, "max_words": False})
    with pytest.raises(GraderError, match="unknown instruction check.*shout"):
        grade({"task": "instruction", "checks": [{"name": "shout"}]}, "HI")


def test_multi_check_prompts_are_compatible():
    cfg = task("instruction", instruction={"checks_per_prompt": 3})
    records = make_records(cfg, "eval", 100) + make_records(cfg, "train", 200)
    for r in records:
        names = [c["name"] for c in r["checks"]]
        assert len(set(names)) == 3 and compatible(r["checks"])
        assert not any(frozenset(pair) in INCOMPATIBLE for pair in itertools.combinations(names, 2))
        assert "lowercase" not in names or "uppercase" not in names
        for c in r["checks"]:
            assert CHECKS[c["name"]].describe(**{k: v for k, v in c.items() if k != "name"}) in prompt_of(r)
    assert len({n for r in records for n in (c["name"] for c in r["checks"])}) == len(CHECKS)


def test_compatibility_rules():
    assert not compatible([{"name": "lowercase"}, {"name": "uppercase"}])
    assert not compatible([{"name": "include_keywords", "words": ["river"]},
                           {"name": "exclude_keywords", "words": ["River"]}])
    assert not compatible([{"name": "ends_with", "phrase": "That is all."},
                           {"name": "exclude_keywords", "words": ["all"]}])
    assert compatible([{"name": "include_keywords", "words": ["river"]},
                       {"name": "exclude_keywords", "words": ["very"]}])
    assert not compatible([{"name": "no_commas"}, {"name": "no_commas"}])


def test_instruction_config_restrictions():
    cfg = task("instruction", instruction={"checks_per_prompt": 2, "checks": ["quoted", "no_commas"]})
    assert all({c["name"] for c in r["checks"]} == {"quoted", "no_commas"} for r in make_records(cfg, "eval", 20))
    with pytest.raises(ValueError, match="unknown check.*'shout'.*known.*lowercase"):
        make_records(task("instruction", instruction={"checks": ["shout"]}), "eval")
    with pytest.raises(ValueError, match="can be asked together"):
        make_records(task("instruction", instruction={"checks_per_prompt": 2, "checks": ["lowercase", "uppercase"]}),
                     "eval")
    with pytest.raises(ValueError, match="too small"):  # 40 requests x 1 check: 40 prompts
        make_records(task("instruction", instruction={"checks": ["no_commas"]}), "eval", 41)


# ---------------------------------------------------------------------------------------------
# Named graders for user records


def user_grade(spec, completion, answer):
    return grade({"prompt": "q", "answer": answer}, completion, default_grader=spec).score


@pytest.mark.parametrize("completion, answer, score", [
    ("The answer is Paris.", "paris", 1.0),
    ('Final answer: "New   York"', " New York ", 1.0),
    ("**Paris**", "Paris", 1.0),
    ("$42$", 42, 1.0),
    ("The answer is London.", "Paris", 0.0),
    ("Paris is lovely, but the answer is Rome.", "Paris", 0.0),
    ("Paris, I think", "Paris", 0.0),
])
def test_exact_grader(completion, answer, score):
    assert user_grade("exact", completion, answer) == score


@pytest.mark.parametrize("completion, answer, score", [
    ("The answer is 1,234.5 dollars.", "1234.5", 1.0),
    ("so x = -3/4", "-0.75", 1.0),
    ("We get 2 then 42", 42, 1.0),
    ("The answer is 2.0000000001", "2", 1.0),  # relative tolerance 1e-6
    ("Answer: +1.5e3", "1500", 1.0),
    ("The answer is 43", "42", 0.0),
    ("42, then 41", "42", 0.0),  # the last number counts
    ("The answer is 2.001", "2", 0.0),
    ("no number here", "42", 0.0),
    ("version v2", "2", 0.0),  # glued to a word: not a number
])
def test_numeric_grader(completion, answer, score):
    assert user_grade("numeric", completion, answer) == score


def test_numeric_grader_needs_a_numeric_reference():
    with pytest.raises(GraderError, match="contains no number"):
        user_grade("numeric", "42", "forty-two")


def test_regex_grader():
    assert user_grade("regex", "It is in room B12.", r"\bB12\b") == 1.0
    assert user_grade("regex", "It is in room B123.", r"\bB12\b") == 0.0
    with pytest.raises(GraderError, match=r"'\(unclosed' is not a valid regular expression"):
        user_grade("regex", "x", "(unclosed")


@pytest.mark.parametrize("completion, answer, score", [
    ("so the result is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),
    ("The answer is 1/2", "\\frac{1}{2}", 1.0),
    ("\\boxed{3}", "3", 1.0),
    ("The answer is x = 3.", "3", 1.0),
    ("The answer is $\\dfrac{3}{4}$.", "0.75", 1.0),
    ("\\boxed{-\\tfrac12}", "-0.5", 1.0),
    ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)", 1.0),
    ("\\boxed{90^\\circ}", "90", 1.0),
    ("\\boxed{50\\%}", "50", 1.0),
    ("\\boxed{3.0}", "3", 1.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1.0),
    ("\\boxed{\\text{east}}", "east", 1.0),
    ("first \\boxed{2}, then \\boxed{\\frac{x+1}{2}}", "\\boxed{(x+1)/2}", 1.0),
    ("\\boxed{\\frac{1}{3}}", "0.33", 0.0),
    ("\\boxed{4}", "3", 0.0),
    ("\\boxed{-3}", "x=3", 0.0),
    ("1\\frac{1}{2}", "11/2", 0.0),  # a mixed number is not 11/2
    ("\\boxed{\\frac{1}{0}}", "1/0", 1.0),  # no rational: compared as strings
])
def test_math_grader(completion, answer, score):
    assert user_grade("math", completion, answer) == score


@pytest.mark.parametrize("completion, answer, score", [
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),  # equal as expressions, not as strings
    ("The answer is $\\boxed{\\sqrt{8}}$", "2\\sqrt{2}", 1.0),
    ("the answer is \\boxed{\\frac{1}{\\frac{1}{2}}}", "2", 1.0),  # a \\frac nested in a \\frac in a \\boxed
    ("\\boxed{x \\in [1, 3]}", "[1,3]", 1.0),  # an interval named by its variable
    ("\\boxed{(-2, 2)}", "[-2,2]", 0.0),  # open and closed intervals differ
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\boxed{\\frac{3}{4}}}", "0.75", 1.0),
])
def test_math_grader_uses_math_verify(completion, answer, score):
    from opd.tasks.graders import normalised_equal, verified

    pytest.importorskip("math_verify")
    assert user_grade("math", completion, answer) == score
    assert verified(completion, answer) == bool(score)
    if completion.startswith(("\\boxed{\\frac{\\sqrt", "The answer is $", "the answer", "\\boxed{x")):
        assert normalised_equal(completion, answer) == 0.0  # what opd's own normaliser missed


def test_math_verify_grades_outside_the_main_thread():
    """Its time limit is a SIGALRM, which only the main thread has; the grader runs without it there."""
    import threading

    from opd.tasks.graders import verified

    pytest.importorskip("math_verify")
    found = []
    worker = threading.Thread(target=lambda: found.append(verified("\\boxed{\\sqrt{8}}", "2\\sqrt{2}")))
    worker.start()
    worker.join()
    assert found == [True]


# ---------------------------------------------------------------------------------------------
# Dispatch and errors


def test_dispatch():
    arithmetic = {"task": "arithmetic", "answer": "4"}
    assert is_graded(arithmetic, None) and grade(arithmetic, "The answer is 4.").score == 1.0
    own = {"prompt": "2+2?", "answer": "4", "grader": "numeric"}
    assert is_graded(own, None) and grade(own, "4", default_grader="exact").score == 1.0
    foreign_task = {"task": "summarization", "answer": "yes"}  # not a built-in task: graded by the default
    assert not is_graded(foreign_task, None) and is_graded(foreign_task, "exact")
    assert grade(foreign_task, "Yes.", default_grader="exact").score == 1.0
    with pytest.raises(GraderError, match="no grader.*`grader` field.*data.grader"):
        grade({"prompt": "2+2?", "answer": "4"}, "4")


def test_grader_spec_errors():
    with pytest.raises(GraderError, match="unknown grader 'fuzzy'.*exact.*module:function"):
        resolve_grader("fuzzy")
    with pytest.raises(GraderError, match=r"needs the record field 'answer'.*\['grader', 'prompt'\]"):
        grade({"prompt": "q", "grader": "exact"}, "x")
    with pytest.raises(GraderError, match="cannot import module 'opd_no_such_module'"):
        resolve_grader("opd_no_such_module:score")
    with pytest.raises(GraderError, match="module 'json' has no function 'no_such_function'"):
        resolve_grader("json:no_such_function")


def test_user_function_grader(tmp_path, monkeypatch):
    (tmp_path / "opd_test_user_grader.py").write_text(
        "def contains(completion, record):\n    return record['answer'] in completion\n"
        "def length(completion, record):\n    return min(len(completion) / 10, 1.0)\n"
        "def verdict(completion, record):\n    return 'correct'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    record = {"prompt": "q", "answer": "yes"}
    assert grade(record, "yes!", default_grader="opd_test_user_grader:contains") == Grade(1.0)
    assert grade(record, "no", default_grader="opd_test_user_grader:contains") == Grade(0.0)
    assert grade(record, "12345", default_grader="opd_test_user_grader:length").score == 0.5
    with pytest.raises(GraderError, match="returned 'correct' \\(str\\).*bool or a number"):
        grade(record, "yes", default_grader="opd_test_user_grader:verdict")


@pytest.mark.parametrize("name", ["arithmetic", "knowledge", "instruction"])
def test_grades_survive_a_json_round_trip(name):
    replies = ["The answer is 3.", "all good here", "Room B12.", '{"a": 1}', ""]
    for record in make_records(task(name, eval_size=10), "eval"):
        copy = json.loads(json.dumps(record))
        for reply in replies + [record.get("completion", "")]:
            assert grade(copy, reply) == grade(record, reply)
        if "completion" in record:
            assert grade(copy, copy["completion"]).score == 1.0
