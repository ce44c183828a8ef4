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


def float64_divergence(kind, student_logits, teacher_logits, beta):
    """The divergence and its gradient with respect to the student's logits, by autograd in float64."""
    s_logits = student_logits.double().requires_grad_()
    value = divergence_float64(kind, s_logits, teacher_logits.double(), beta)
    return value.detach(), torch.autograd.grad(value.sum(), s_logits)[0]


def divergence_float64(kind, s_logits, t_logits, beta):
    s, t = torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return (s.exp() * (s - t)).sum(-1)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return (t.exp() * (t - s)).sum(-1)
    m = torch.log(beta * t.exp() + (1 - beta) * s.exp())
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


@pytest.mark.parametrize("kind,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5),
                                       ("jsd", 0.9), ("jsd", 0.0), ("jsd", 1.0)])
@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_closed_form_gradient_matches_float64_autograd(kind, beta, scale):
    """The in-place closed form (values and d/dlogits) equals float64 autograd, at ordinary logits and
    at logits spread so wide that many log-probs fall below the exp floor; it is at least as close to
    float64 as float32 autograd through divergences.py. A reused workspace gives the same answers
    (including a shorter last chunk)."""
    from opd.losses.analytic import Workspace, divergence_and_grad

    torch.manual_seed(3)
    student, teacher = torch.randn(6, 300) * scale, torch.randn(6, 300) * scale
    expected_value, expected_grad = float64_divergence(kind, student, teacher, beta)
    workspace = Workspace()
    for rows in (slice(0, 6), slice(0, 4), slice(0, 6)):
        value, grad = divergence_and_grad(kind, student[rows], teacher[rows].clone(), beta, workspace)
        assert value.dtype == grad.dtype == torch.float32
        torch.testing.assert_close(value.double(), expected_value[rows], rtol=1e-4, atol=1e-5)
        # at scale 40 the logits are ~100 and float32 itself rounds d/dlogits at ~3e-5 (autograd too)
        torch.testing.assert_close(grad.double(), expected_grad[rows], rtol=1e-4, atol=1e-6 if scale == 1 else 5e-5)
    s32 = student.clone().requires_grad_()
    autograd_value = divergence(kind, s32, teacher, beta)
    autograd_grad = torch.autograd.grad(autograd_value.sum(), s32)[0]
    value, grad = divergence_and_grad(kind, student, teacher.clone(), beta, workspace)
    assert (value.double() - expected_value).abs().max() <= 2 * (autograd_value.double() - expected_value).abs().max() + 1e-6
    assert (grad.double() - expected_grad).abs().max() <= 2 * (autograd_grad.double() - expected_grad).abs().max() + 1e-7


def test_closed_form_leaves_the_student_logits_and_reads_bfloat16():
    from opd.losses.analytic import divergence_and_grad

    torch.manual_seed(4)
    student, teacher = torch.randn(3, 50), torch.randn(3, 50)
    before = student.clone()
    value, grad = divergence_and_grad("reverse_kl", student, teacher.bfloat16())
    assert torch.equal(student, before)
    expected_value, expected_grad = float64_divergence("reverse_kl", student, teacher.bfloat16().float(), 0.5)
    torch.testing.assert_close(value.double(), expected_value, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


def test_closed_form_jsd_keeps_the_gradient_of_barely_overlapping_distributions():
    """Where student and teacher put their mass on different tokens, JSD's gradient is a small
    remainder of nearly equal terms: float32 autograd loses it, the closed form keeps it."""
    from opd.losses.analytic import divergence_and_grad

    torch.manual_seed(5)
    student, teacher = torch.randn(8, 4000) * 16, torch.randn(8, 4000) * 16
    _, expected = float64_divergence("jsd", student, teacher, 0.5)
    _, grad = divergence_and_grad("jsd", student, teacher.clone(), 0.5)
    logits = student.clone().requires_grad_()
    autograd = torch.autograd.grad(divergence("jsd", logits, teacher, 0.5).sum(), logits)[0]

    def cosine(g):
        return float(torch.nn.functional.cosine_similarity(g.double().flatten(), expected.flatten(), dim=0))

    assert cosine(grad) > 0.9999 and cosine(grad) >= cosine(autograd)  # autograd: 0.86 here
