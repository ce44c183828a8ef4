"""The sums task: deterministic records whose worked answers are right, take several orders, hold
corrected slips at the configured rate, and fit the length budget; a grader on the final number."""

import random
import re

import pytest

from opd.config import TaskConfig
from opd.tasks import grade, make_records
from opd.tasks.sums import CORRECTION, worked_answer
from opd.tiny import build_tiny_tokenizer

MAX_NEW_TOKENS = 110  # what experiments/blog_claims.py --task sums samples with
STEP = re.compile(r"(\d+)\+(\d+)=(\d+)")


def records(count=2000, **sums):
    return make_records(TaskConfig(name="sums", train_size=count, eval_size=64, sums=sums), "train")


def numbers(record):
    return [int(x) for x in re.findall(r"\d+", record["messages"][0]["content"])]


def test_records_are_deterministic_and_split():
    assert records(50) == records(50)
    cfg = TaskConfig(name="sums", train_size=200, eval_size=64)
    held_out = {r["messages"][0]["content"] for r in make_records(cfg, "eval")}
    assert len(held_out) == 64
    assert not held_out & {r["messages"][0]["content"] for r in make_records(cfg, "train")}
    assert make_records(cfg, "eval", 5)[0]["messages"][0]["content"].startswith("Add ")


def test_every_step_adds_a_number_left_and_the_answer_is_the_sum():
    for r in records(500):
        nums = numbers(r)
        assert len(nums) == 5 and all(0 <= n <= 9 for n in nums)
        assert r["answer"] == str(sum(nums)) and r["completion"].endswith(f"The answer is {sum(nums)}.")
        # Drop each slip: what is left is a chain of right sums that uses every number once.
        steps = [s.split(CORRECTION)[-1] for s in r["completion"].split("; ")]
        total, rest = nums[0], nums[1:]
        for step in steps:
            a, b, c = map(int, STEP.match(step).groups())
            assert a == total and b in rest and c == a + b
            rest.remove(b)
            total = c
            if rest:
                assert step.endswith(", left " + " ".join(map(str, [total, *rest])))
        assert not rest


def test_grader_reads_the_final_number():
    r = records(1)[0]
    assert grade(r, r["completion"]).score == 1.0
    assert grade(r, f"The answer is {int(r['answer']) + 1}.").score == 0.0
    assert grade(r, "4+1=5. The answer is").score == 0.0
    wrong_then_right = f"The answer is {int(r['answer']) + 1}. No. The answer is {r['answer']}."
    assert grade(r, wrong_then_right).score == 1.0  # the last "The answer is" counts


def test_answers_fit_the_length_budget():
    tokenizer = build_tiny_tokenizer()
    lengths = [len(tokenizer(r["completion"])["input_ids"]) + 1 for r in records(2000)]  # + end of turn
    assert min(lengths) >= 60 and max(lengths) <= MAX_NEW_TOKENS


def test_corrections_occur_at_the_configured_rate_and_are_off_by_one():
    corrected = [r for r in records(2000) if r["corrected"]]
    assert 0.08 < len(corrected) / 2000 < 0.12  # correction_rate 0.1
    for r in corrected:
        assert r["completion"].count(CORRECTION) == 1
        before, after = r["completion"].split(CORRECTION)
        wrong = int(STEP.findall(before)[-1][2])
        right = int(STEP.match(after).group(3))
        assert abs(wrong - right) == 1
    assert not any(r["corrected"] or CORRECTION in r["completion"] for r in records(300, correction_rate=0.0))


def test_several_orders_occur():
    # The same numbers, answered many times: the numbers are added in many different orders.
    orders = {tuple(int(b) for _, b, _ in STEP.findall(worked_answer([4, 1, 2, 3, 5], random.Random(seed), 0.0)[0]))
              for seed in range(200)}
    assert len(orders) == 24  # every order of the four numbers after the first
    # and across records, the first number added is not always the next one in the prompt
    firsts = [STEP.match(r["completion"]).group(2) == str(numbers(r)[1]) for r in records(500)]
    assert 0.2 < sum(firsts) / len(firsts) < 0.5


@pytest.mark.parametrize("bad", [{"operands": 1}, {"correction_rate": 1.5}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        TaskConfig(name="sums", sums=bad)
