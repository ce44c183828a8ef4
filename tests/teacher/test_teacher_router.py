"""Several teachers: each prompt's samples are scored by its own teacher (opd.teacher.router), the
sources are mixed by weight from the step, and every misrouting is refused before any work."""

import json

import pytest
import torch

from helpers import TINY_RUN, chat_ids, sampler, tiny
from opd.config import ConfigError, LossConfig, OptimConfig, load_config
from opd.data import MixedSchedule, Prompt, PromptDataError
from opd.learner.learner import Learner
from opd.loop import train
from opd.roles import Teacher as TeacherContract
from opd.teacher.hf import HFTeacher
from opd.teacher.router import RoutingTeacher
from opd.tokenizer_check import TokenizerMismatchError

STUDENT_ONLY = [o for o in TINY_RUN if not o.startswith("teacher.")]
TWO_TEACHERS = ["teachers.math.tiny.hidden_size=48", "teachers.math.tiny.seed=5", "teachers.math.tiny.init_std=0.2",
                "teachers.chat.tiny.hidden_size=32", "teachers.chat.tiny.seed=6", "teachers.chat.tiny.init_std=0.2"]
SOURCES = ("data.sources=[{task: arithmetic, teacher: math, weight: 3}, "
           "{task: instruction, teacher: chat, weight: 1}]")
SMALL_TASKS = ["task.train_size=64", "task.eval_size=4"]


def routed_config(tmp_path, *overrides, run_dir="run"):
    return load_config(None, [f"run_dir={tmp_path / run_dir}", *STUDENT_ONLY, *TWO_TEACHERS, *SMALL_TASKS,
                              *overrides])


@pytest.fixture(scope="module")
def two_teachers():
    """Two random tiny teachers of different widths that disagree, and a student sampling for prompts
    routed to one or the other (or to none: a reward-only prompt)."""
    student, tok = tiny(hidden=32, seed=1)
    teachers = {"math": HFTeacher(tiny(hidden=48, seed=5, init_std=0.2)[0], tok, chunk_size=7, micro_batch_size=3),
                "chat": HFTeacher(tiny(hidden=32, seed=6, init_std=0.2)[0], tok, chunk_size=7, micro_batch_size=3)}
    texts = ["what is 2 + 3?", "write a haiku", "7 - 4 = ?", "name a colour", "say hi"]
    routes = ["math", "chat", "math", "chat", None]
    prompts = [Prompt(ids, t, {}, teacher=r) for ids, t, r in zip(chat_ids(tok, texts), texts, routes)]
    torch.manual_seed(0)
    rollouts = sampler(student, tok, max_new_tokens=12, samples_per_prompt=2).sample([p.ids for p in prompts],
                                                                                       prompts=prompts)
    return student, tok, teachers, rollouts


def rows_of(rollouts, name):
    routes = [rollouts.prompts[g].teacher for g in rollouts.group_ids.tolist()]
    return torch.tensor([i for i, r in enumerate(routes) if r == name])


def test_each_row_is_scored_by_its_own_teacher_exactly(two_teachers):
    student, tok, teachers, rollouts = two_teachers
    router = RoutingTeacher(teachers)
    assert isinstance(router, TeacherContract)
    scores = router.score(rollouts)
    metrics = router.take_metrics()
    mask = rollouts.completion_mask
    for name, teacher in teachers.items():
        rows = rows_of(rollouts, name)
        part = rollouts.rows(rows)
        own = teacher.score(part).logprobs
        assert torch.equal(scores.logprobs[rows], own)  # the same numbers, bit for bit
        kl = float(((part.behaviour_logprobs - own) * part.completion_mask).sum() / part.completion_mask.sum())
        assert metrics[f"teacher_kl/{name}"] == pytest.approx(kl, rel=1e-6)
        assert metrics[f"tokens/{name}"] == pytest.approx(float(part.completion_mask.sum() / mask.sum()))
    # the teachers disagree: scoring the math rows with the chat teacher gives other numbers
    math_rows = rollouts.rows(rows_of(rollouts, "math"))
    gap = (teachers["chat"].score(math_rows).logprobs - scores.logprobs[rows_of(rollouts, "math")]).abs()
    assert float((gap * math_rows.completion_mask).sum() / math_rows.completion_mask.sum()) > 0.1
    # a reward-only row: the teacher's log-prob is the student's own, so its KL term is exactly 0
    none = rows_of(rollouts, None)
    assert torch.equal(scores.logprobs[none], rollouts.behaviour_logprobs[none] * mask[none])
    assert scores.rows is not None and not scores.rows[none].any() and scores.rows.sum() == rollouts.batch_size - 2
    assert sum(v for k, v in metrics.items() if k.startswith("tokens/")) == pytest.approx(1.0)
    assert router.take_metrics() == {}  # counters since the last call


def test_exact_divergence_over_two_heads_of_different_widths(two_teachers):
    """The reassembled hidden states carry each row's teacher, and each position is projected by its
    own teacher's head: the full-vocabulary KL equals each part's KL with its own teacher."""
    student, tok, teachers, rollouts = two_teachers
    routed = rollouts.rows(torch.cat([rows_of(rollouts, "math"), rows_of(rollouts, "chat")]))
    learner = Learner(student, OptimConfig(), LossConfig(kind="reverse_kl", chunk_size=64), 1, 4, "divergence")
    scores = RoutingTeacher(teachers).score(routed, keep_hidden=True)
    assert scores.hidden.shape[-1] == 48 + 1
    total, tokens = 0.0, 0.0
    for name, teacher in teachers.items():
        part = routed.rows(rows_of(routed, name))
        n = float(part.completion_mask.sum())
        total += learner.divergence(part, teacher.score(part, keep_hidden=True)) * n
        tokens += n
    assert learner.divergence(routed, scores) == pytest.approx(total / tokens, rel=1e-5)


def test_sources_mix_by_weight_from_the_step_alone():
    schedule = MixedSchedule([40, 10, 7], [2.0, 1.0, 1.0], per_step=8, seed=3)
    counts = [0, 0, 0]
    for step in range(50):
        for source in schedule.sources(step):
            counts[source] += 1
        if step < 5:
            assert schedule.sources(step).count(0) == 4  # every step: 4 + 2 + 2
    assert counts == [200, 100, 100]
    again = MixedSchedule([40, 10, 7], [2.0, 1.0, 1.0], per_step=8, seed=3)
    assert again.indices(37) == schedule.indices(37)  # computed from the step, as on resume
    indices = schedule.indices(2)
    assert all(0 <= i < 40 for i, s in zip(indices, schedule.sources(2)) if s == 0)
    assert all(50 <= i < 57 for i, s in zip(indices, schedule.sources(2)) if s == 2)


def test_misrouting_is_refused_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"data.sources\[1\] \(instruction\): teacher 'cook' is not one of the "
                                          r"teachers: math, chat"):
        routed_config(tmp_path, "data.sources=[{task: arithmetic, teacher: math}, {task: instruction, teacher: cook}]")
    with pytest.raises(ConfigError, match=r"data.sources\[0\] \(arithmetic\): no teacher, and there are several"):
        routed_config(tmp_path, "data.sources=[{task: arithmetic}]")
    with pytest.raises(ConfigError, match="served teacher \\(teachers.math\\)"):
        load_config(None, [*STUDENT_ONLY, "teachers.math.url=http://127.0.0.1:9", "teachers.chat.tiny.seed=1",
                           "loss.kind=reverse_kl"])
    with pytest.raises(ConfigError, match="every teacher's top-k log-probs: set teachers.chat.top_k"):
        load_config(None, [*STUDENT_ONLY, "teachers.math.url=http://127.0.0.1:9", "teachers.math.top_k=5",
                           "teachers.chat.url=http://127.0.0.1:9", "loss.kind=topk_forward_kl"])
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, [*TINY_RUN, *TWO_TEACHERS])

    import opd.components

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the data was checked")

    monkeypatch.setattr(opd.components, "load_model", no_weights)
    prompts = tmp_path / "mixed.jsonl"
    prompts.write_text(json.dumps({"prompt": "1 + 1 =", "expert": "math"}) + "\n" +
                       json.dumps({"prompt": "hello", "expert": "cook"}) + "\n")
    cfg = routed_config(tmp_path, f"data.prompts={prompts}", "data.teacher_field=expert", "data.eval_holdout=0")
    with pytest.raises(PromptDataError, match=rf"^{prompts}:2: expert='cook' names no teacher; the teachers are "
                                              rf"math, chat$"):
        opd.components.build(cfg)
    prompts.write_text(json.dumps({"prompt": "1 + 1 =", "expert": "math"}) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(PromptDataError, match=rf"^{prompts}:2: no teacher for this prompt among math, chat"):
        opd.components.build(cfg)


def test_each_teachers_tokenizer_is_checked_with_its_own_message(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("zebra quagga okapi " * 50)
    cfg = routed_config(tmp_path, f"teachers.chat.tiny.tokenizer_corpus=[{corpus}]", SOURCES)
    from opd.components import build

    with pytest.raises(TokenizerMismatchError, match="^teachers.chat: "):
        build(cfg)


def metrics_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


TIMINGS = ("sample_s", "score_s", "train_s", "sync_s", "eval_s_total")


@pytest.mark.parametrize("staleness", [0, 1])
def test_a_routed_run_logs_each_teacher_and_resumes_exactly(tmp_path, staleness):
    run = ["train.steps=3", f"train.max_staleness={staleness}", SOURCES, "log.rollouts_every=0"]
    straight = train(routed_config(tmp_path, *run, run_dir="straight"))
    train(routed_config(tmp_path, *run, run_dir="split"), stop_after=2)
    train(routed_config(tmp_path, *run, run_dir="split"), resume=True)
    rows = metrics_of(tmp_path / "straight")
    assert [{k: v for k, v in r.items() if not k.endswith(TIMINGS) and "_s_" not in k} for r in rows] == \
        [{k: v for k, v in r.items() if not k.endswith(TIMINGS) and "_s_" not in k} for r in metrics_of(tmp_path / "split")]
    step = rows[1]
    # weight 3 : 1 over 4 prompts a step -> 3 arithmetic prompts (math), 1 instruction prompt (chat)
    assert step["tokens/math"] + step["tokens/chat"] == pytest.approx(1.0)
    assert step["tokens/math"] > 0 and step["tokens/chat"] > 0
    mean = step["tokens/math"] * step["teacher_kl/math"] + step["tokens/chat"] * step["teacher_kl/chat"]
    assert step["teacher_kl"] == pytest.approx(mean, rel=1e-5)
    assert step["teacher_kl/math"] != pytest.approx(step["teacher_kl/chat"], rel=1e-2)
    for source in ("arithmetic", "instruction"):
        assert f"eval/{source}/accuracy" in straight["last_eval"] and f"eval/{source}/teacher_kl" in straight["last_eval"]
        assert f"eval/{source}/teacher_accuracy" in rows[0]  # each in-process teacher's own ceiling at step 0
