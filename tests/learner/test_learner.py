"""The optimizer step does not depend on how the batch is cut into micro-batches."""

import copy

import pytest
import torch

from helpers import chat_ids, sampler, tiny
from opd.advantages import compute_advantages
from opd.config import LossConfig, OptimConfig
from opd.learner.learner import Learner, lr_multiplier
from opd.teacher.hf import HFTeacher

PROMPTS = ["Describe the garden in a few words.", "Hi", "Write one sentence about the sea.", "Give three facts."]


@pytest.fixture(scope="module")
def batch():
    student, tok = tiny(hidden=32, seed=1)
    teacher_model, _ = tiny(hidden=48, seed=5, init_std=0.2)
    torch.manual_seed(0)
    rollouts = sampler(student, tok, samples_per_prompt=3, max_new_tokens=12).sample(chat_ids(tok, PROMPTS))
    teacher = HFTeacher(teacher_model, tok, chunk_size=5)
    scores = teacher.score(rollouts, keep_hidden=True)
    advantages = compute_advantages(rollouts.completion_mask, rollouts.behaviour_logprobs, scores.logprobs)
    return student, teacher, rollouts, scores, advantages


@pytest.mark.parametrize("kind", ["sampled_reverse_kl", "reverse_kl", "jsd"])
def test_one_and_four_micro_batches_give_the_same_loss_and_update(batch, kind):
    student, teacher, rollouts, scores, advantages = batch
    results = []
    for micro in (12, 3, 5):  # 1 micro-batch, 4 micro-batches, uneven ones
        model = copy.deepcopy(student)
        learner = Learner(model, OptimConfig(lr=1e-2, warmup_steps=0, grad_clip=None), LossConfig(kind=kind, chunk_size=4),
                          total_steps=10, micro_batch_size=micro)
        metrics = learner.train_step(rollouts, advantages, scores)
        grads = [p.grad.clone() for p in model.parameters()]  # the accumulated gradient of the step
        results.append((metrics, grads, [p.detach().clone() for p in model.parameters()]))
    (m_full, g_full, p_full), *others = results
    for metrics, grads, params in others:
        assert metrics["loss"] == pytest.approx(m_full["loss"], rel=1e-5)
        assert metrics["grad_norm"] == pytest.approx(m_full["grad_norm"], rel=1e-5)
        for a, b in zip(g_full, grads):
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
        # Adam's first step is lr * g / (|g| + eps): where |g| is near eps, rounding of g at 1e-7
        # moves the update by a fraction of lr (1e-2), so parameters agree to 1e-4, not better.
        for a, b in zip(p_full, params):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(p_full, student.parameters()))  # it did move


def test_sampled_loss_value_is_the_mean_teacher_kl_on_policy(batch):
    student, teacher, rollouts, scores, advantages = batch
    learner = Learner(copy.deepcopy(student), OptimConfig(warmup_steps=0), LossConfig(), 10, 4)
    metrics = learner.train_step(rollouts, advantages)
    k = (rollouts.behaviour_logprobs - scores.logprobs) * rollouts.completion_mask
    # ratio = 1 on policy, so L = -(1/N) sum A = (1/N) sum k
    assert metrics["loss"] == pytest.approx(float(k.sum() / rollouts.completion_mask.sum()), rel=1e-4)
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-4)


def test_exact_loss_without_teacher_states_is_refused(batch):
    student, _, rollouts, _, advantages = batch
    learner = Learner(copy.deepcopy(student), OptimConfig(), LossConfig(kind="forward_kl"), 10, 4)
    with pytest.raises(ValueError, match="needs the teacher's hidden states"):
        learner.train_step(rollouts, advantages)


def test_learning_rate_schedules():
    constant = [lr_multiplier(s, 4, 20, "constant", 0.0) for s in range(20)]
    assert constant[:5] == [0.25, 0.5, 0.75, 1.0, 1.0] and constant[-1] == 1.0
    cosine = [lr_multiplier(s, 4, 20, "cosine", 0.1) for s in range(21)]
    assert cosine[3] == 1.0 and cosine[4] == pytest.approx(1.0) and cosine[12] == pytest.approx(0.55)
    assert cosine[20] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cosine[4:], cosine[5:]))


def naive_logprobs(model, rollouts):
    """log pi(token) of every completion token from one forward of the whole padded batch."""
    from opd.models import position_ids

    with torch.no_grad():
        logits = model(input_ids=rollouts.tokens, attention_mask=rollouts.attention_mask,
                       position_ids=position_ids(rollouts.attention_mask)).logits.float()
    picked = torch.log_softmax(logits[:, :-1], -1).gather(-1, rollouts.tokens[:, 1:, None])[..., 0]
    return picked * rollouts.completion_mask[:, 1:]


def test_micro_batches_cover_every_row_once_and_cut_the_padding(batch):
    _, _, rollouts, _, _ = batch
    rows, area = [], 0
    for slot, micro in rollouts.micro_batches(3):
        rows += slot.rows.tolist()
        area += micro.tokens.numel()
        assert micro.tokens.shape == (len(slot.rows), slot.stop - slot.start)
        assert torch.equal(micro.tokens, rollouts.tokens[slot.rows, slot.start:slot.stop])
        # nothing cut away is a real token: left padding before, no completion token after
        assert not rollouts.attention_mask[slot.rows, :slot.start].any()
        assert not rollouts.completion_mask[slot.rows, slot.stop:].any()
    assert sorted(rows) == list(range(rollouts.batch_size))
    assert area < rollouts.tokens.numel()  # prompts and completions of several lengths: padding was cut


def test_cut_micro_batches_score_and_recompute_what_the_whole_batch_gives(batch):
    student, teacher, rollouts, scores, _ = batch
    torch.testing.assert_close(scores.logprobs[:, 1:], naive_logprobs(teacher.model, rollouts), atol=1e-5, rtol=1e-5)
    one_micro_batch = HFTeacher(teacher.model, teacher.tokenizer, chunk_size=5,
                                micro_batch_size=rollouts.batch_size).score(rollouts, keep_hidden=True)
    predicts = rollouts.predicts_completion
    torch.testing.assert_close(scores.hidden[:, :-1][predicts], one_micro_batch.hidden[:, :-1][predicts],
                               atol=1e-5, rtol=1e-5)
    learner = Learner(copy.deepcopy(student), OptimConfig(), LossConfig(chunk_size=4), 10, micro_batch_size=5)
    logprobs, entropy = learner.policy_logprobs(rollouts)
    torch.testing.assert_close(logprobs[:, 1:], naive_logprobs(student, rollouts), atol=1e-5, rtol=1e-5)
    assert bool((entropy[:, 1:] > 0).eq(rollouts.completion_mask[:, 1:].bool()).all())


@pytest.mark.parametrize("kind", ["reverse_kl", "sampled_reverse_kl"])
def test_bf16_compute_gives_the_fp32_step_within_bf16_rounding_and_keeps_fp32_state(batch, kind):
    """train.compute_dtype=bfloat16 autocasts the products; the loss, the gradient's direction and
    size stay those of fp32 to bf16's precision, and everything the optimizer holds stays fp32."""
    student, teacher, rollouts, scores, advantages = batch
    steps = {}
    for dtype in ("float32", "bfloat16"):
        model = copy.deepcopy(student)
        learner = Learner(model, OptimConfig(lr=1e-2, warmup_steps=0, grad_clip=None), LossConfig(kind=kind),
                          total_steps=10, micro_batch_size=5, compute_dtype=dtype)
        metrics = learner.train_step(rollouts, advantages, scores)
        steps[dtype] = metrics, torch.cat([p.grad.flatten() for p in model.parameters()]), model, learner
    (m32, g32, _, _), (m16, g16, model16, learner16) = steps["float32"], steps["bfloat16"]
    assert m16["loss"] == pytest.approx(m32["loss"], rel=2e-2, abs=1e-3)
    assert m16["grad_norm"] == pytest.approx(m32["grad_norm"], rel=5e-2)
    assert float(torch.nn.functional.cosine_similarity(g32, g16, dim=0)) > 0.99
    assert not torch.equal(g32, g16)  # bf16 did compute something
    assert {p.dtype for p in model16.parameters()} == {torch.float32}
    assert all(t.dtype == torch.float32 for s in learner16.optimizer.state.values() for t in s.values()
               if t.is_floating_point())
    assert model16.config._attn_implementation == "opd_sdpa_fp32"  # attention stays fp32 on CPU


def test_bf16_compute_needs_fp32_weights(batch):
    student = copy.deepcopy(batch[0]).to(torch.bfloat16)
    with pytest.raises(ValueError, match="student.dtype=float32"):
        Learner(student, OptimConfig(), LossConfig(), 10, 4, compute_dtype="bfloat16")
