import math

import pytest
import torch
import torch.nn.functional as F

from opd.losses.divergences import forward_kl
from opd.losses.topk import token_topk_forward_kl, topk_forward_kl


def naive(student_logits, ids, teacher_logprobs):
    """Straight from the definition, one position at a time, in float64: KL over the k + 1
    outcomes {topk ids..., tail}."""
    out = []
    for s_row, id_row, t_row in zip(student_logits.double(), ids, teacher_logprobs.double()):
        s = F.log_softmax(s_row, -1)
        keep = torch.isfinite(t_row)
        id_row, t_row = id_row[keep], t_row[keep]
        p = t_row.exp()
        head = (p * (t_row - s[id_row])).sum()
        tail_t = 1 - p.sum()
        rest = torch.ones_like(s, dtype=torch.bool)
        rest[id_row] = False
        tail_s = s[rest].exp().sum()
        tail = tail_t * (tail_t.log() - tail_s.log()) if tail_t > 0 else torch.zeros((), dtype=torch.float64)
        out.append(head + tail)
    return torch.stack(out)


def make(m=7, v=50, k=5, seed=0, sharp=2.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(m, v, generator=g) * sharp
    teacher = F.log_softmax(torch.randn(m, v, generator=g) * sharp, -1)
    values, ids = teacher.topk(k, -1)
    return student, teacher, ids, values


def test_matches_the_naive_reference():
    student, _, ids, values = make()
    torch.testing.assert_close(topk_forward_kl(student, ids, values).double(), naive(student, ids, values),
                               atol=1e-5, rtol=1e-5)


def test_equals_the_exact_forward_kl_when_k_covers_the_vocabulary():
    student, teacher, ids, values = make(v=40, k=40)
    exact = forward_kl(student, teacher)
    torch.testing.assert_close(topk_forward_kl(student, ids, values), exact, atol=1e-5, rtol=1e-5)
    # The top-k in any order, and log-probs instead of logits, give the same value.
    perm = torch.randperm(40)
    torch.testing.assert_close(topk_forward_kl(F.log_softmax(student, -1), ids[:, perm], values[:, perm]), exact,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 10, 30])
def test_bounded_by_the_exact_kl_with_the_gap_of_the_chain_rule(k):
    """0 <= L_k <= KL(T||S), and KL(T||S) - L_k = p_T(tail) * KL(T(.|tail) || S(.|tail)) exactly."""
    student, teacher, ids, values = make(m=9, v=40, k=k, seed=k)
    bucketed = topk_forward_kl(student, ids, values).double()
    exact = forward_kl(student, teacher).double()
    assert (bucketed >= -1e-6).all()
    assert (bucketed <= exact + 1e-5).all()
    s = F.log_softmax(student.double(), -1)
    t = teacher.double()
    tail = torch.ones_like(t, dtype=torch.bool).scatter(-1, ids, False)
    t_tail = t.masked_fill(~tail, -math.inf)
    s_tail = s.masked_fill(~tail, -math.inf)
    t_cond = t_tail - torch.logsumexp(t_tail, -1, keepdim=True)
    s_cond = s_tail - torch.logsumexp(s_tail, -1, keepdim=True)
    kl_tail = torch.where(tail, t_cond.exp() * (t_cond - s_cond), torch.zeros_like(t)).sum(-1)
    mass = torch.logsumexp(t_tail, -1).exp()
    torch.testing.assert_close(exact - bucketed, mass * kl_tail, atol=1e-5, rtol=1e-4)


def test_zero_when_the_student_equals_the_teacher():
    _, teacher, ids, values = make(k=4)
    assert topk_forward_kl(teacher, ids, values).abs().max() < 1e-5


def test_padded_entries_contribute_nothing():
    student, _, ids, values = make(k=6)
    padded_ids = torch.cat([ids[:, :4], torch.zeros_like(ids[:, :2])], -1)
    padded_values = torch.cat([values[:, :4], torch.full_like(values[:, :2], -math.inf)], -1)
    torch.testing.assert_close(topk_forward_kl(student, padded_ids, padded_values),
                               topk_forward_kl(student, ids[:, :4], values[:, :4]))
    assert torch.isfinite(topk_forward_kl(student, padded_ids, padded_values)).all()


def test_gradient_matches_autograd_of_the_naive_reference():
    student, _, ids, values = make(m=5, v=30, k=4, seed=3)
    ours = student.clone().requires_grad_(True)
    topk_forward_kl(ours, ids, values).sum().backward()
    reference = student.double().clone().requires_grad_(True)
    naive(reference, ids, values).sum().backward()
    torch.testing.assert_close(ours.grad.double(), reference.grad, atol=1e-6, rtol=1e-5)


def test_gradient_is_finite_when_k_covers_the_vocabulary():
    student, _, ids, values = make(v=12, k=12)
    student.requires_grad_(True)
    topk_forward_kl(student, ids, values).sum().backward()
    assert torch.isfinite(student.grad).all()


def test_rejects_ids_beyond_the_student_vocabulary():
    student, _, ids, values = make(v=20, k=3)
    with pytest.raises(ValueError, match="outside the student's 20 logits"):
        topk_forward_kl(student, ids + 20, values)


def test_chunked_variant_equals_the_direct_one_with_gradients():
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 30, bias=False)
    hidden = torch.randn(11, 8, generator=g)
    teacher = F.log_softmax(torch.randn(11, 30, generator=g), -1)
    values, ids = teacher.topk(5, -1)

    direct_h = hidden.clone().requires_grad_(True)
    direct = topk_forward_kl(head(direct_h), ids, values)
    direct.sum().backward()
    direct_grad = head.weight.grad.clone()
    head.weight.grad = None

    chunked_h = hidden.clone().requires_grad_(True)
    chunked = token_topk_forward_kl(head, chunked_h, ids, values, chunk_size=4)
    chunked.sum().backward()
    torch.testing.assert_close(chunked, direct)
    torch.testing.assert_close(head.weight.grad, direct_grad)
    torch.testing.assert_close(chunked_h.grad, direct_h.grad)
