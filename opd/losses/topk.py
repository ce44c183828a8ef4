"""Forward KL to a teacher that returns only its top-k log-probs per position (a served teacher).

The teacher's distribution is known on its k most likely tokens; the rest of its mass,
p_T(tail) = 1 - sum_topk p_T, is one "tail" bucket. The student's distribution is coarsened the same
way (its own mass on the teacher's top-k ids, and the rest in the tail), and the loss is the KL
between the two coarsened distributions over k + 1 outcomes:

    L = sum_{i in topk} p_T(i) (log p_T(i) - log p_S(i)) + p_T(tail) (log p_T(tail) - log p_S(tail))

(the semantics of verl's `forward_kl_topk`). Merging outcomes never increases a KL (log-sum
inequality), and the chain rule gives the gap exactly:

    KL(p_T || p_S) - L = p_T(tail) * KL(p_T(. | tail) || p_S(. | tail))  >= 0,

so 0 <= L <= the exact forward KL, with equality when the top-k covers the vocabulary (or the
teacher's tail is distributed like the student's). The student's tail log-mass is a log-sum-exp
over the logits outside the top-k ids, exact even when the top-k holds nearly all the mass.

Entries with log-prob -inf are padding (a server that returned fewer than k tokens at a position):
their id is ignored and they contribute 0.
"""

from __future__ import annotations

from typing import Callable

import torch

from opd.losses.chunked import _map_chunks


def topk_forward_kl(student_logits_M_V: torch.Tensor, topk_ids_M_K: torch.Tensor,
                    topk_logprobs_M_K: torch.Tensor) -> torch.Tensor:
    """Bucketed forward KL(teacher || student) at each of M positions (returns M values).

    `student_logits_M_V` may be logits or log-probs (log-softmax is applied either way);
    `topk_ids_M_K` / `topk_logprobs_M_K` are the teacher's top-k token ids and their log-probs under
    the teacher's full distribution, -inf where padded. Differentiable w.r.t. the student only.
    """
    logits = student_logits_M_V.float()
    vocab = logits.shape[-1]
    teacher = topk_logprobs_M_K.detach().float()
    valid = teacher > float("-inf")
    if bool(((topk_ids_M_K < 0) | (topk_ids_M_K >= vocab))[valid].any()):
        raise ValueError(f"teacher top-k ids outside the student's {vocab} logits: the teacher's vocabulary is "
                         f"larger (use loss.kind=sampled_reverse_kl for this pair)")
    ids = torch.where(valid, topk_ids_M_K, torch.zeros_like(topk_ids_M_K))
    log_z = torch.logsumexp(logits, -1)  # M

    # Head: the teacher's top-k tokens. Padded entries have p_T = 0 and finite stand-ins.
    student_k = logits.gather(-1, ids) - log_z[:, None]
    teacher_k = torch.where(valid, teacher, torch.zeros_like(teacher))
    p_k = torch.where(valid, teacher.exp(), torch.zeros_like(teacher))
    head = (p_k * (teacher_k - student_k)).sum(-1)

    # Teacher tail mass: 1 - sum p_T(topk), via expm1 of the log-sum-exp (all -inf: the whole mass).
    tail_t = (-torch.expm1(torch.logsumexp(teacher.masked_fill(~valid, float("-inf")), -1))).clamp(0.0, 1.0)

    # Student tail: log-sum-exp over the ids outside the teacher's top-k (counted once even if an id
    # repeats). Masked logits are set to a finite minimum, not -inf, so that a row whose top-k covers
    # the whole vocabulary has a finite (unused) value and no NaN gradient.
    in_topk = torch.zeros_like(logits).scatter_add_(-1, ids, valid.to(logits.dtype)) > 0
    empty_tail = in_topk.all(-1)
    masked = logits.masked_fill(in_topk, torch.finfo(logits.dtype).min)
    log_tail_s = torch.logsumexp(masked, -1) - log_z
    log_tail_s = torch.where(empty_tail, torch.zeros_like(log_tail_s), log_tail_s)
    tail = torch.xlogy(tail_t, tail_t) - tail_t * log_tail_s
    # With no student tail the teacher's tail is rounding error (its top-k is the whole vocabulary).
    tail = torch.where(empty_tail, torch.zeros_like(tail), tail)
    return head + tail


def token_topk_forward_kl(student_logits_fn: Callable, student_hidden_M_H: torch.Tensor,
                          topk_ids_M_K: torch.Tensor, topk_logprobs_M_K: torch.Tensor,
                          chunk_size: int = 256) -> torch.Tensor:
    """`topk_forward_kl` at M positions from the student's hidden states, projecting (and, when
    training, recomputing in the backward pass) one chunk of logits at a time."""

    def chunk(h, ids, logprobs):
        return topk_forward_kl(student_logits_fn(h), ids, logprobs)

    return _map_chunks(chunk, chunk_size, student_hidden_M_H, topk_ids_M_K, topk_logprobs_M_K.detach())
