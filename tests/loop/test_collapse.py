"""The collapse warnings: truncation rising past a threshold, RL groups all equal for many steps."""

from opd.collapse import EQUAL_GROUPS_STEPS, CollapseWatch


def test_rising_truncation_warns_once():
    watch = CollapseWatch("distill")
    warnings = []
    for step, truncated in enumerate([0.0] * 5 + [0.1, 0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.9], start=1):
        warnings += [(step, w) for w in watch.check(step, {"truncated": truncated})]
    assert len(warnings) == 1 and "sampling.max_new_tokens" in warnings[0][1]
    assert warnings[0][0] == 10  # the last 5 steps average 0.54, 0.54 above the first 5


def test_steady_truncation_does_not_warn():
    watch = CollapseWatch("rl")
    assert not any(watch.check(s, {"truncated": 0.4, "groups_all_equal_frac": 0.5}) for s in range(1, 40))


def test_rl_groups_all_equal_for_many_steps_warn():
    watch = CollapseWatch("rl")
    out = [watch.check(s, {"groups_all_equal_frac": 1.0, "accuracy": 1.0}) for s in range(1, EQUAL_GROUPS_STEPS + 3)]
    assert [bool(w) for w in out].index(True) == EQUAL_GROUPS_STEPS - 1 and sum(map(bool, out)) == 1
    assert "advantage is zero" in out[EQUAL_GROUPS_STEPS - 1][0]
    # distillation learns from the teacher's signal even when the grader scores every sample alike
    watch = CollapseWatch("distill")
    assert not any(watch.check(s, {"groups_all_equal_frac": 1.0}) for s in range(1, 30))
