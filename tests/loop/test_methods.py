"""RL, SFT and mid-training on the one loop: advantages, the cross-entropy loss, batching of fixed
sequences, and FLOP/token accounting in the run directory."""

import json

import numpy as np
import pytest
import torch

from opd.advantages import group_centred_rewards
from opd.config import LossConfig, OptimConfig, load_config
from opd.data import Example, LengthBucketedSchedule, SequenceBatches, SequencePool, encode_examples, pack_documents
from opd.evaluation import reward_metrics
from opd.learner.learner import Learner
from opd.loop import step_advantages, train
from opd.rollouts import Rollouts, sequence_batch
from opd.tasks import Grade
from opd.teacher.hf import TeacherScores
from tests.helpers import tiny


def small_rollouts(rewards_per_group=None):
    """Three groups of four rows, three completion tokens each after a two-token prompt."""
    torch.manual_seed(0)
    B, T = 12, 5
    mask = torch.zeros(B, T)
    mask[:, 2:] = 1
    mask[3, 4] = 0  # a shorter completion
    return Rollouts(tokens=torch.randint(10, (B, T)), attention_mask=torch.ones(B, T, dtype=torch.long),
                    completion_mask=mask, behaviour_logprobs=-torch.rand(B, T) * mask, entropy=torch.zeros(B, T),
                    truncated=torch.zeros(B, dtype=torch.bool), group_ids=torch.arange(3).repeat_interleave(4),
                    prompt_width=2)


def config(method, *overrides):
    teacher = [] if method == "rl" else ["teacher.tiny.hidden_size=32"]
    return load_config(None, [f"method={method}", "student.tiny.hidden_size=32", *teacher, *overrides])


REWARDS = torch.tensor([1., 0., 1., 1., 0., 0., 0., 0., 1., 1., 0., 0.])


def test_group_centring_and_the_std_option():
    groups = torch.arange(3).repeat_interleave(4)
    centred = group_centred_rewards(REWARDS, groups)
    assert torch.allclose(centred, torch.tensor([.25, -.75, .25, .25, 0, 0, 0, 0, .5, .5, -.5, -.5]))
    scaled = group_centred_rewards(REWARDS, groups, divide_by_std=True)
    std_a = np.std([1, 0, 1, 1], ddof=1)  # sample std within the group
    assert scaled[0].item() == pytest.approx(0.25 / std_a, rel=1e-4)
    assert scaled[8].item() == pytest.approx(0.5 / np.std([1, 1, 0, 0], ddof=1), rel=1e-4)
    assert torch.equal(scaled[4:8], torch.zeros(4))  # an all-equal group stays 0, not 0/0


def test_all_equal_groups_are_counted():
    groups = torch.arange(3).repeat_interleave(4)
    metrics = reward_metrics([Grade(float(r)) for r in REWARDS], groups)
    assert metrics["groups_all_equal"] == 1 and metrics["groups_all_equal_frac"] == pytest.approx(1 / 3)
    assert metrics["accuracy"] == pytest.approx(5 / 12)
    all_right = reward_metrics([Grade(1.0)] * 12, groups)
    assert all_right["groups_all_equal"] == 3


def test_rl_without_kl_and_distillation_without_reward_are_one_advantage_computation():
    rollouts = small_rollouts()
    teacher = TeacherScores(logprobs=-torch.rand(12, 5) * rollouts.completion_mask)
    k = (rollouts.behaviour_logprobs - teacher.logprobs) * rollouts.completion_mask
    centred = group_centred_rewards(REWARDS, rollouts.group_ids)[:, None] * rollouts.completion_mask

    plain_rl = step_advantages(config("rl", "loss.kl_coef=0"), rollouts, teacher, REWARDS)
    distill = step_advantages(config("distill"), rollouts, teacher, None)
    rl_with_teacher = step_advantages(config("rl", "loss.kl_coef=0.5"), rollouts, teacher, REWARDS)
    rl_std = step_advantages(config("rl", "rl.divide_by_std=true"), rollouts, None, REWARDS)

    assert torch.allclose(plain_rl, centred)  # c = 0: the teacher's scores change nothing
    assert torch.allclose(distill, -k)  # no reward: -c * k_t
    assert torch.allclose(rl_with_teacher, centred - 0.5 * k)
    assert torch.allclose(rl_std, group_centred_rewards(REWARDS, rollouts.group_ids, True)[:, None]
                          * rollouts.completion_mask)
    assert (plain_rl * (1 - rollouts.completion_mask)).abs().sum() == 0  # nothing on prompt or padding


def test_sft_loss_counts_completion_tokens_only():
    """The learner's cross-entropy equals a naive per-example sum over completion tokens / count."""
    model, tok = tiny(hidden=32, seed=3)
    records = [("a", {"prompt": "What is 2 + 3?", "completion": "2 + 3 = 5. The answer is 5."}),
               ("b", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}),
               ("c", {"prompt": "A much longer prompt with many more words in it", "completion": "ok"})]
    examples, skipped = encode_examples(records, tok, max_tokens=128)
    assert skipped == 0 and all(e.completion_ids[-1] == tok.eos_token_id for e in examples)

    naive_sum, naive_count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logp = torch.log_softmax(model(torch.tensor([e.ids])).logits[0].float(), -1)
            for t in range(len(e.prompt_ids), len(e.ids)):  # token t is predicted at position t-1
                naive_sum -= logp[t - 1, e.ids[t]].item()
                naive_count += 1

    batch = sequence_batch([e.ids for e in examples], [len(e.prompt_ids) for e in examples], tok.pad_token_id)
    assert batch.completion_mask.sum() == naive_count and (batch.attention_mask == 0).any()  # there is padding
    losses = []
    for micro in (3, 1, 2):  # micro-batching does not change the loss
        learner = Learner(model, OptimConfig(lr=1e-12), LossConfig(), 1, micro, objective="cross_entropy")
        losses.append(learner.train_step(batch, None)["loss"])
    assert losses[0] == pytest.approx(naive_sum / naive_count, rel=1e-5)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)


def test_truncated_samples_are_not_taught_to_stop():
    _, tok = tiny()
    examples, _ = encode_examples([("a", {"prompt": "x", "completion": "a b c", "truncated": True})], tok, 64)
    assert examples[0].completion_ids[-1] != tok.eos_token_id


def test_length_bucketing_cuts_padding_and_keeps_every_example_once_per_epoch():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=640).tolist()
    schedule = LengthBucketedSchedule(lengths, per_step=16, seed=0)
    epoch = [i for step in range(schedule.batches_per_epoch) for i in schedule.indices(step)]
    assert sorted(epoch) == list(range(640))
    assert schedule.indices(3) == LengthBucketedSchedule(lengths, 16, 0).indices(3)  # depends on the step only
    assert schedule.indices(40) != schedule.indices(0)  # a new epoch is reshuffled

    def padding(batches):
        return 1 - sum(sum(lengths[i] for i in b) for b in batches) / sum(len(b) * max(lengths[i] for i in b)
                                                                      for b in batches)
    bucketed = [schedule.indices(s) for s in range(schedule.batches_per_epoch)]
    shuffled = np.random.default_rng(1).permutation(640).reshape(-1, 16).tolist()
    assert padding(bucketed) < 0.1 < 0.4 < padding(shuffled)


def test_documents_are_packed_without_padding_and_mixed_with_chat():
    _, tok = tiny()
    rows = pack_documents(["one document here. " * 20, "another one. " * 30], tok, seq_tokens=32)
    assert all(len(r) == 32 for r in rows[:-1]) and rows[0].count(tok.eos_token_id) == 0
    assert sum(r.count(tok.eos_token_id) for r in rows) == 2  # each document ends with EOS
    chat = [Example([1, 2, 3], [4, 5, tok.eos_token_id]) for _ in range(10)]
    batches = SequenceBatches([SequencePool(rows, [1] * len(rows), 3), SequencePool.of_examples(chat, 1)], seed=0)
    sequences, starts, _ = batches.batch(0)
    assert len(sequences) == 4 and starts == [1, 1, 1, 3]  # documents: all but the first token; chat: the answer


def test_a_run_counts_tokens_flops_and_time(tiny_config, tmp_path):
    train(tiny_config("train.steps=3", "eval.every=2", run_dir=tmp_path / "run"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for before, row in zip(rows, rows[1:]):
        assert row["flops_student_total"] == before["flops_student_total"] + row["flops_sample"] + row["flops_train"]
        assert row["flops_teacher_total"] == before["flops_teacher_total"] + row["flops_teacher"]
        assert row["flops_total"] == row["flops_student_total"] + row["flops_teacher_total"]
        assert row["tokens_sampled_total"] == before["tokens_sampled_total"] + row["tokens"]
        assert row["tokens_scored_total"] == row["tokens_sampled_total"] == row["tokens_trained_total"]
        assert row["flops_sample"] > 0 and row["flops_teacher"] > 0 and row["flops_train"] > row["flops_sample"] / 10
        assert row["wall_s_total"] >= before["wall_s_total"] and row["sample_s_total"] > 0
    assert rows[2]["eval_s_total"] > rows[1]["eval_s_total"]  # step 2 evaluated
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["flops_total"] == rows[-1]["flops_total"] and summary["method"] == "distill"
