"""Exact per-position divergences between the student's and the teacher's next-token
distributions, over the full vocabulary. Inputs are logits (... x V); outputs are per position (...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher): mode-seeking, the quantity on-policy distillation minimises."""
    s = F.log_softmax(student_logits.float(), -1)
    t = F.log_softmax(teacher_logits.float(), -1)
    return (s.exp() * (s - t)).sum(-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student): mass-covering, what SFT on teacher samples minimises in expectation."""
    s = F.log_softmax(student_logits.float(), -1)
    t = F.log_softmax(teacher_logits.float(), -1)
    return (t.exp() * (t - s)).sum(-1)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence (GKD), teacher T, student S, M = beta*T + (1-beta)*S:

        JSD_beta = beta * KL(T || M) + (1 - beta) * KL(S || M)

    For small beta it behaves like beta * KL(T||S) (forward), near 1 like (1-beta) * KL(S||T)
    (reverse); the end points themselves are defined as forward KL (beta=0) and reverse KL (beta=1).
    """
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits)
    s = F.log_softmax(student_logits.float(), -1)
    t = F.log_softmax(teacher_logits.float(), -1)
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1.0 - beta)]), 0)
    kl_t_m = (t.exp() * (t - m)).sum(-1)
    kl_s_m = (s.exp() * (s - m)).sum(-1)
    return beta * kl_t_m + (1.0 - beta) * kl_s_m


def divergence(kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               jsd_beta: float = 0.5) -> torch.Tensor:
    if kind == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits)
    if kind == "forward_kl":
        return forward_kl(student_logits, teacher_logits)
    if kind == "jsd":
        return generalized_jsd(student_logits, teacher_logits, jsd_beta)
    raise ValueError(f"unknown divergence {kind!r}: expected reverse_kl, forward_kl or jsd")
