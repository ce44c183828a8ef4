"""Divergences and chunked computations against naive references."""

import math

import pytest
import torch

from opd.advantages import discounted_future_sum, group_centred_rewards
from opd.losses.chunked import divergence_sum, token_divergence, token_logprobs
from opd.losses.divergences import divergence, forward_kl, generalized_jsd, reverse_kl


def naive_probs(logits):
    z = [math.exp(x) for x in logits]
    return [v / sum(z) for v in z]


def naive_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(4, 7) * 2, torch.randn(4, 7) * 2


def test_reverse_and_forward_kl_match_naive_sums(logits):
    s, t = logits
    for i in range(4):
        p, q = naive_probs(s[i].tolist()), naive_probs(t[i].tolist())
        assert float(reverse_kl(s, t)[i]) == pytest.approx(naive_kl(p, q), rel=1e-5)
        assert float(forward_kl(s, t)[i]) == pytest.approx(naive_kl(q, p), rel=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_matches_naive_mixture(logits, beta):
    s, t = logits
    for i in range(4):
        ps, pt = naive_probs(s[i].tolist()), naive_probs(t[i].tolist())
        m = [beta * a + (1 - beta) * b for a, b in zip(pt, ps)]
        expected = beta * naive_kl(pt, m) + (1 - beta) * naive_kl(ps, m)
        assert float(generalized_jsd(s, t, beta)[i]) == pytest.approx(expected, rel=1e-5)


def test_jsd_end_points_are_the_two_kls(logits):
    s, t = logits
    torch.testing.assert_close(generalized_jsd(s, t, 1.0), reverse_kl(s, t))
    torch.testing.assert_close(generalized_jsd(s, t, 0.0), forward_kl(s, t))
    # and it tends to them (up to the beta scale) near the ends
    torch.testing.assert_close(generalized_jsd(s, t, 1e-4) / 1e-4, forward_kl(s, t), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(generalized_jsd(s, t, 1 - 1e-4) / 1e-4, reverse_kl(s, t), rtol=1e-2, atol=1e-3)


def test_divergences_are_zero_for_equal_distributions(logits):
    s, _ = logits
    for kind in ("reverse_kl", "forward_kl", "jsd"):
        assert float(divergence(kind, s, s + 3.0).abs().max()) < 1e-5  # shift-invariant, zero on equality


def _head():
    torch.manual_seed(1)
    return torch.nn.Linear(5, 11)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_token_logprobs_match_full_and_gradients_too(chunk):
    head = _head()
    hidden = torch.randn(9, 5, requires_grad=True)
    targets = torch.randint(11, (9,))
    full = torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None]).squeeze(-1)
    chunked = token_logprobs(head, hidden, targets, chunk)
    torch.testing.assert_close(chunked, full)
    w = torch.randn(9)
    g_full = torch.autograd.grad((full * w).sum(), [hidden, head.weight])
    g_chunk = torch.autograd.grad((token_logprobs(head, hidden, targets, chunk) * w).sum(), [hidden, head.weight])
    for a, b in zip(g_full, g_chunk):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_chunked_divergence_matches_full(kind):
    student_head, teacher_head = _head(), torch.nn.Linear(5, 11)
    hidden = torch.randn(9, 5, requires_grad=True)
    teacher_hidden = torch.randn(9, 5)
    full = divergence(kind, student_head(hidden), teacher_head(teacher_hidden), 0.3)
    chunked = token_divergence(kind, student_head, hidden, teacher_head, teacher_hidden, 0.3, chunk_size=4)
    torch.testing.assert_close(chunked, full)
    g_full = torch.autograd.grad(full.sum(), [hidden, student_head.weight])
    g_chunk = torch.autograd.grad(
        token_divergence(kind, student_head, hidden, teacher_head, teacher_hidden, 0.3, chunk_size=4).sum(),
        [hidden, student_head.weight])
    for a, b in zip(g_full, g_chunk):
        torch.testing.assert_close(a, b)
    assert teacher_head.weight.grad is None  # the teacher is never trained


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_divergence_sum_gradients_match_full(kind, chunk):
    """The fused loss (gradients taken chunk by chunk in the forward pass) gives the naive full-batch
    loss and its gradients, for the hidden states and for the head's weight and bias."""
    torch.manual_seed(1)
    student_head, teacher_head = torch.nn.Linear(5, 11), torch.nn.Linear(5, 11)
    hidden = torch.randn(9, 5, requires_grad=True)
    teacher_hidden = torch.randn(9, 5)
    full = divergence(kind, student_head(hidden), teacher_head(teacher_hidden), 0.3)
    params = list(student_head.parameters())
    total, values = divergence_sum(kind, student_head, hidden, teacher_head, teacher_hidden, params, 0.3, chunk)
    torch.testing.assert_close(values, full.detach())
    torch.testing.assert_close(total, full.sum())
    assert not values.requires_grad
    g_full = torch.autograd.grad(full.sum() * 0.37, [hidden, *params])
    g_fused = torch.autograd.grad(total * 0.37, [hidden, *params])  # the incoming gradient scales them
    for a, b in zip(g_full, g_fused):
        torch.testing.assert_close(a, b)
    assert teacher_head.weight.grad is None  # the teacher is never trained


def test_divergence_sum_frozen_head_and_tied_weights():
    """A frozen head (LoRA) gets no gradient; a head tied to the embedding sums both paths."""
    torch.manual_seed(2)
    embedding = torch.nn.Embedding(11, 5)
    head = torch.nn.Linear(5, 11, bias=False)
    head.weight = embedding.weight  # tied, as in SmolLM2
    teacher_head = torch.nn.Linear(5, 11)
    ids, teacher_hidden = torch.randint(11, (7,)), torch.randn(7, 5)

    def loss(fused):
        hidden = torch.tanh(embedding(ids))
        if fused:
            return divergence_sum("reverse_kl", head, hidden, teacher_head, teacher_hidden, [head.weight],
                                  chunk_size=3)[0]
        return divergence("reverse_kl", head(hidden), teacher_head(teacher_hidden)).sum()

    expected = torch.autograd.grad(loss(False), [embedding.weight])[0]
    torch.testing.assert_close(torch.autograd.grad(loss(True), [embedding.weight])[0], expected)
    head.weight.requires_grad_(False)
    hidden = torch.randn(7, 5, requires_grad=True)
    total, _ = divergence_sum("reverse_kl", head, hidden, teacher_head, teacher_hidden, [], chunk_size=3)
    torch.testing.assert_close(torch.autograd.grad(total, [hidden])[0], torch.autograd.grad(
        divergence("reverse_kl", head(hidden), teacher_head(teacher_hidden)).sum(), [hidden])[0])


def test_discounted_future_sum_matches_loop():
    torch.manual_seed(0)
    values = torch.randn(3, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]], dtype=torch.float)
    got = discounted_future_sum(values, mask, 0.5)
    for i in range(3):
        for t in range(6):
            expected = sum(0.5 ** (s - t) * float(values[i, s] * mask[i, s]) for s in range(t, 6)) * float(mask[i, t])
            assert float(got[i, t]) == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(discounted_future_sum(values, mask, 0.0), values * mask)


def test_group_centred_rewards():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    torch.testing.assert_close(group_centred_rewards(rewards, groups),
                               torch.tensor([2 / 3, -1 / 3, -1 / 3, -2 / 3, 1 / 3, 1 / 3]))
    scaled = group_centred_rewards(rewards, groups, divide_by_std=True)
    std0 = torch.tensor([1.0, 0, 0]).std()
    torch.testing.assert_close(scaled[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]) / (std0 + 1e-6))
    same = group_centred_rewards(torch.ones(4), torch.tensor([0, 0, 1, 1]), divide_by_std=True)
    assert torch.equal(same, torch.zeros(4))  # all-equal groups give no signal, and no NaN
