"""Multi-turn episodes and tool use (opd.envs): the loss mask, the single-turn path kept bit for bit,
the calculator's safety, episodes rendered turn by turn, and Envs under the training loop."""

import copy
from dataclasses import fields

import pytest
import torch

from helpers import chat_ids, sampler, tiny
from opd.advantages import compute_advantages
from opd.config import ConfigError, LossConfig, OptimConfig
from opd.envs import SingleTurn, StepOutcome, env_factory
from opd.envs.calculator import CalcError, CalculatorEnv, calculate
from opd.envs.episodes import EpisodeSampler
from opd.envs.feedback import FeedbackEnv
from opd.learner.learner import Learner
from opd.run_dir import read_metrics
from opd.teacher.hf import HFTeacher

PROMPTS = ["What is 37*41?", "Hi", "Give three facts."]


class Echo:
    """Answers every turn with a tool message, for `turns` turns, then ends with a reward of 0.5."""

    def __init__(self, turns=2):
        self.turns, self.seen = turns, 0

    def reset(self, record):
        return list(record.get("messages") or [])

    def step(self, text):
        self.seen += 1
        if self.seen >= self.turns:
            return StepOutcome(done=True, reward=0.5)
        return StepOutcome([{"role": "tool", "content": f"result {self.seen}"}], done=False, tool_calls=1)


@pytest.fixture(scope="module")
def student():
    return tiny(hidden=32, seed=1)


@pytest.fixture(scope="module")
def multi_turn(student):
    return episodes(student)


@pytest.fixture(scope="module")
def teacher_scores(multi_turn):
    batch, tok = multi_turn
    teacher_model, _ = tiny(hidden=48, seed=5, init_std=0.2)
    return HFTeacher(teacher_model, tok, chunk_size=5).score(batch, keep_hidden=True)


def prompts_of(tok, texts):
    from opd.data import Prompt
    return [Prompt(ids, t, {"messages": [{"role": "user", "content": t}]}) for ids, t in zip(chat_ids(tok, texts), texts)]


def episodes(student, env=lambda: Echo(3), max_tokens=200, **kw):
    model, tok = student
    prompts = prompts_of(tok, PROMPTS)
    inner = sampler(model, tok, samples_per_prompt=2, max_new_tokens=8)
    return EpisodeSampler(inner, env, max_turns=4, max_tokens=max_tokens).sample(
        [p.ids for p in prompts], prompts=prompts, seed=3, **kw), tok


def test_calculator_computes_and_refuses_everything_else():
    assert calculate("37*41") == 1517 and calculate("(2+3)**2 - 7//2 % 2") == 24 and calculate("-10/4") == -2.5
    for bad in ["__import__('os').system('x')", "a+1", "[1]*3", "2**1000", "9**99**99", "1/0", "True+1",
                "'a'*3", "1e16*10", "(" * 300 + "1" + ")" * 300, "lambda: 1", "open('f')"]:
        with pytest.raises(CalcError):
            calculate(bad)
    env = CalculatorEnv()
    env.reset({"messages": [], "task": "arithmetic", "answer": "1517"})
    out = env.step("I compute <calc>37*41</calc> and <calc>x</calc>")
    assert not out.done and out.tool_calls == 2 and out.messages[0]["role"] == "tool"
    assert out.messages[0]["content"].startswith("37*41 = 1517\nx: error:")
    assert env.step("The answer is 1517").reward == 1.0 and env.step("The answer is 12").reward == 0.0


def test_feedback_env_gives_another_try_with_a_hint():
    env = FeedbackEnv(tries=2)
    env.reset({"messages": [], "task": "arithmetic", "answer": "42"})
    first = env.step("7")
    assert not first.done and "try again" in first.messages[0]["content"] and "2 characters" in first.messages[0]["content"]
    assert env.step("The answer is 42") == StepOutcome(done=True, reward=1.0)


def test_user_env_from_the_config_only_with_a_class_spec():
    made = env_factory("tests.envs.test_envs:Echo", {"turns": 1})()
    assert type(made).__name__ == "Echo" and made.turns == 1
    with pytest.raises(ConfigError, match="no class"):
        env_factory("tests.envs.test_envs:Nope", {})
    with pytest.raises(ConfigError, match="use one of"):
        env_factory("calc", {})
    with pytest.raises(ConfigError, match="unexpected keyword"):
        env_factory("tests.envs.test_envs:Echo", {"colour": 1})


def test_one_turn_env_is_the_single_turn_path_bit_for_bit(student):
    model, tok = student
    prompts = prompts_of(tok, PROMPTS)
    plain = sampler(model, tok, samples_per_prompt=2, max_new_tokens=8).sample([p.ids for p in prompts],
                                                                                prompts=prompts, seed=3)
    ran, _ = episodes(student, env=SingleTurn, max_tokens=512)
    for f in fields(plain):
        if f.name == "env_metrics":  # the episodes' counts (env/turns 1, ...) are added
            continue
        a, b = getattr(plain, f.name), getattr(ran, f.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, f.name
    assert ran.loss_mask is ran.completion_mask and not ran.multi_turn and ran.env_rewards is None


def test_episode_keeps_sampled_ids_and_renders_environment_turns(multi_turn):
    batch, tok = multi_turn
    assert batch.multi_turn and batch.env_rewards.tolist() == [0.5] * 6
    assert batch.env_metrics["env/turns"] == 3 and batch.env_metrics["env/tool_call_rate"] == 1.0
    environment = batch.completion_mask.bool() & ~batch.loss_mask.bool()
    assert bool((batch.behaviour_logprobs[environment] == 0).all()) and bool((batch.entropy[environment] == 0).all())
    for row in range(batch.batch_size):
        ids = batch.tokens[row][batch.completion_mask[row].bool()].tolist()
        text = tok.decode(ids)
        # the environment's messages, as the template renders them, between the sampled turns
        assert "<|tool|>result 1" in text and "<|tool|>result 2" in text
        sampled = batch.loss_mask[row][batch.completion_mask[row].bool()].tolist()
        spans, current = [], []
        for token, drawn in zip(ids, sampled):
            if not drawn:
                current.append(token)
            elif current:
                spans, current = spans + [current], []
        # each environment span is the template's text after the turn: its closing EOS when the
        # sample did not end with one, the tool message, the next generation prompt
        assert [tok.decode(span).removeprefix("</s>") for span in spans] == \
            ["<|tool|>result 1<|assistant|>", "<|tool|>result 2<|assistant|>"]
        # the sampled log-probs are those of the tokens the student drew: no re-tokenisation
        assert bool((batch.behaviour_logprobs[row][batch.loss_mask[row].bool()] < 0).all())


def test_token_limit_truncates_and_is_counted(student):
    batch, _ = episodes(student, max_tokens=12)
    assert batch.env_metrics["env/truncated"] == 1.0 and bool(batch.truncated.all())
    assert int(batch.completion_mask.sum(-1).max()) <= 12


@pytest.mark.parametrize("kind", ["sampled_reverse_kl", "reverse_kl", "forward_kl", "jsd", "cross_entropy"])
def test_every_loss_has_exactly_zero_gradient_on_environment_tokens(student, multi_turn, teacher_scores, kind):
    batch, tok = multi_turn
    scores = teacher_scores
    objective = "cross_entropy" if kind == "cross_entropy" else None
    loss_kind = "sampled_reverse_kl" if kind == "cross_entropy" else kind
    advantages = compute_advantages(batch.loss_mask, batch.behaviour_logprobs, scores.logprobs,
                                    rewards=batch.env_rewards, group_ids=batch.group_ids)
    assert bool((advantages[batch.loss_mask == 0] == 0).all())
    model = copy.deepcopy(student[0])
    learner = Learner(model, OptimConfig(warmup_steps=0, grad_clip=None), LossConfig(kind=loss_kind, chunk_size=4),
                      total_steps=1, micro_batch_size=6, objective=objective)
    seen = []
    states_of = learner.head.completion_states

    def spy(micro):  # d loss / d final hidden state of each micro-batch: position t-1 predicts token t
        hidden, selected = states_of(micro)
        hidden.retain_grad()
        seen.append((micro, hidden))
        return hidden, selected
    learner.head.completion_states = spy
    learner.train_step(batch, advantages if kind == "sampled_reverse_kl" else None,
                       scores if kind != "cross_entropy" else None)
    for micro, hidden in seen:
        predicts_env = (micro.completion_mask.bool() & ~micro.loss_mask.bool())[:, 1:]
        assert bool(predicts_env.any())
        assert bool((hidden.grad[:, :-1][predicts_env] == 0).all())
        assert float(hidden.grad[:, :-1][micro.loss_mask.bool()[:, 1:]].abs().sum()) > 0
    # and the teacher's log-probs there are never asked for
    assert bool((scores.logprobs[batch.loss_mask == 0] == 0).all())


@pytest.mark.parametrize("method", ["rl", "distill"])
def test_calculator_env_trains_under_distill_and_rl(tiny_config, method):
    from opd.loop import train
    overrides = [f"method={method}", "env.class=calculator", "env.max_turns=2", "env.max_tokens=24",
                 "task.name=arithmetic", "task.train_size=16", "task.eval_size=4", "train.steps=2",
                 "eval.every=0", "eval.teacher_accuracy=false", "train.prompts_per_step=2",
                 "sampling.samples_per_prompt=2", "sampling.max_new_tokens=8"]
    if method == "rl":
        overrides += ["teacher=null"]
    else:
        overrides += ["teacher.tiny.pretrain_steps=0"]  # a random teacher: the loop is what is tested
    cfg = tiny_config(*overrides)
    train(cfg)
    rows = read_metrics(f"{cfg.run_dir}/metrics.jsonl")
    steps = [r for r in rows if r.get("step", 0) > 0 and "env/turns" in r]
    assert len(steps) == 2 and all("env/tool_call_rate" in r and "accuracy" in r for r in steps)
    assert any("eval/env/turns" in r for r in rows)


def test_logged_rollouts_and_report_grey_out_environment_tokens(multi_turn):
    from opd.evaluation import rollout_metrics, rollout_records
    from opd.report import coloured_rollout
    batch, tok = multi_turn
    teacher = batch.behaviour_logprobs - 0.5 * batch.loss_mask  # k = 0.5 on every sampled token
    record = rollout_records(batch, type("S", (), {"logprobs": teacher, "chunks": None})(), tok, 1)[0]
    sampled = record["sampled"]
    assert 0 in sampled and len(sampled) == len(record["tokens"])
    assert [k for k, m in zip(record["teacher_kl"], sampled) if not m] == [0.0] * sampled.count(0)
    html = coloured_rollout(record)
    assert html.count('data-env="1"') == sampled.count(0)
    metrics = rollout_metrics(batch, teacher)
    assert metrics["teacher_kl"] == pytest.approx(0.5) and metrics["tokens"] == int(batch.loss_mask.sum())
    assert metrics["env/turns"] == 3
