"""The default loss is an unbiased estimator of the per-token reverse-KL gradient.

A tabular autoregressive policy over a 3-token vocabulary and 3-token sequences lets us enumerate
every sequence: the expected gradient of the sampled-token loss (probability-weighted sum over all
27 sequences) must equal the analytic gradient of the quantity it estimates.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from opd.advantages import compute_advantages
from opd.losses.policy_gradient import policy_gradient_loss

V, T = 3, 3
PREFIXES = [p for n in range(T) for p in itertools.product(range(V), repeat=n)]


def make_tables(seed):
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randn(V, generator=g) * 1.5 for p in PREFIXES}


def student_params(seed=0):
    return {p: t.clone().requires_grad_(True) for p, t in make_tables(seed).items()}


TEACHER = {p: F.log_softmax(t, -1) for p, t in make_tables(1).items()}


def sequence_logprobs(params, seq):
    return torch.stack([F.log_softmax(params[tuple(seq[:t])], -1)[seq[t]] for t in range(T)])


def teacher_logprobs(seq):
    return torch.tensor([float(TEACHER[tuple(seq[:t])][seq[t]]) for t in range(T)])


def expected_loss_gradient(params, discount=0.0, detach=True, naive=False):
    """sum_y pi(y) * grad L(y), with L the loss a single sampled sequence y would give."""
    grads = {p: torch.zeros(V) for p in params}
    for seq in itertools.product(range(V), repeat=T):
        logprobs = sequence_logprobs(params, seq)
        weight = float(logprobs.detach().sum().exp())  # pi(y), a constant
        behaviour = logprobs.detach()
        teacher = teacher_logprobs(seq)
        mask = torch.ones(1, T)
        if naive:  # the pitfall: use the log-ratio itself as the loss, gradient through log pi
            loss = (logprobs - teacher).sum() / T
        elif detach:
            adv = compute_advantages(mask, behaviour[None], teacher[None], kl_coef=1.0, discount=discount)[0]
            loss = policy_gradient_loss(logprobs, behaviour, adv, mask[0], T)
        else:
            raise AssertionError
        for p, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            if g is not None:
                grads[p] += weight * g
    return grads


def per_token_reverse_kl_gradient(params):
    """Analytic target for discount 0: grad of (1/T) sum_t E_{y<t ~ pi, held fixed} KL(pi(.|y<t) || T(.|y<t))."""
    total = 0.0
    for prefix in PREFIXES:
        reach = float(sequence_logprobs(params, prefix + (0,) * (T - len(prefix)))[:len(prefix)].detach().sum().exp()) \
            if prefix else 1.0
        s = F.log_softmax(params[prefix], -1)
        total = total + reach * (s.exp() * (s - TEACHER[prefix])).sum()
    return dict(zip(params, torch.autograd.grad(total / T, list(params.values()))))


def sequence_kl_gradient(params):
    """Analytic target for discount 1: grad of (1/T) KL(pi(y) || T(y)) over whole sequences."""
    total = 0.0
    for seq in itertools.product(range(V), repeat=T):
        logprobs = sequence_logprobs(params, seq)
        total = total + logprobs.sum().exp() * (logprobs.sum() - teacher_logprobs(seq).sum())
    return dict(zip(params, torch.autograd.grad(total / T, list(params.values()))))


def assert_same(a, b, atol=1e-5):
    for p in a:
        torch.testing.assert_close(a[p], b[p], atol=atol, rtol=1e-4, msg=f"prefix {p}")


def test_expected_gradient_equals_per_token_reverse_kl_gradient():
    params = student_params()
    assert_same(expected_loss_gradient(params, discount=0.0), per_token_reverse_kl_gradient(params))


def test_discount_one_gives_sequence_level_kl_gradient():
    params = student_params()
    assert_same(expected_loss_gradient(params, discount=1.0), sequence_kl_gradient(params))


def test_non_detached_log_ratio_has_zero_expected_gradient():
    params = student_params()
    naive = expected_loss_gradient(params, naive=True)
    target = per_token_reverse_kl_gradient(params)
    assert max(float(g.abs().max()) for g in naive.values()) < 1e-5  # E[grad log pi] = 0: no signal
    assert max(float(g.abs().max()) for g in target.values()) > 1e-2  # while the true gradient is not 0


def test_loss_detaches_advantages_itself():
    logprobs = torch.randn(5, requires_grad=True)
    advantages = torch.randn(5, requires_grad=True)
    behaviour = logprobs.detach() + 0.1 * torch.randn(5)
    mask = torch.tensor([1.0, 1, 1, 0, 1])
    g1, = torch.autograd.grad(policy_gradient_loss(logprobs, behaviour, advantages, mask, 4.0), logprobs)
    g2, = torch.autograd.grad(policy_gradient_loss(logprobs, behaviour, advantages.detach(), mask, 4.0), logprobs)
    torch.testing.assert_close(g1, g2)
    loss = policy_gradient_loss(logprobs, behaviour, advantages, mask, 4.0)
    assert torch.autograd.grad(loss, advantages, allow_unused=True)[0] is None


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_policy_gradient_loss_matches_naive_per_token_loop(clip_eps):
    torch.manual_seed(0)
    logprobs = torch.randn(2, 6)
    behaviour = logprobs + 0.5 * torch.randn(2, 6)
    adv = torch.randn(2, 6)
    mask = (torch.rand(2, 6) > 0.3).float()
    got = policy_gradient_loss(logprobs, behaviour, adv, mask, num_tokens=10.0, clip_eps=clip_eps)
    total = 0.0
    for i in range(2):
        for t in range(6):
            if mask[i, t]:
                r = float(torch.exp(logprobs[i, t] - behaviour[i, t]))
                obj = r * float(adv[i, t])
                if clip_eps is not None:
                    obj = min(obj, min(max(r, 1 - clip_eps), 1 + clip_eps) * float(adv[i, t]))
                total -= obj
    assert float(got) == pytest.approx(total / 10.0, rel=1e-5)


def test_clipping_stops_gradient_outside_the_trust_region():
    logprobs = torch.tensor([0.5, 0.5], requires_grad=True)
    behaviour = torch.tensor([0.0, 0.0])  # ratio e^0.5 = 1.65
    adv = torch.tensor([1.0, -1.0])
    g, = torch.autograd.grad(policy_gradient_loss(logprobs, behaviour, adv, torch.ones(2), 2.0, clip_eps=0.2),
                             logprobs)
    assert g[0] == 0.0  # positive advantage, ratio above 1+eps: clipped, no push further up
    assert g[1] > 0.0  # negative advantage: the unclipped term is the pessimistic one, still pushed down
