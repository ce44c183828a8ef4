"""Hidden states -> per-token quantities, a chunk of positions at a time.

A 50k vocabulary over thousands of completion tokens is gigabytes of logits; we project a chunk of
positions, reduce it to one number per position, and (when training) recompute the chunk's logits
in the backward pass with activation checkpointing, so peak memory holds one chunk of logits.
Inputs are flat: the selected positions only (M x H), usually the completion positions.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from opd.losses.analytic import Workspace, divergence_and_grad
from opd.losses.divergences import divergence


def _map_chunks(fn: Callable, chunk_size: int, *tensors: torch.Tensor) -> torch.Tensor:
    """fn over matching chunks of the first dimension of `tensors`, concatenated."""
    total = tensors[0].shape[0]
    outputs = []
    for start in range(0, total, chunk_size):
        pieces = [t[start:start + chunk_size] for t in tensors]
        if torch.is_grad_enabled():
            outputs.append(checkpoint(fn, *pieces, use_reentrant=False))
        else:
            outputs.append(fn(*pieces))
    if not outputs:
        return tensors[0].new_zeros(0, dtype=torch.float32)
    return torch.cat(outputs)


def token_logprobs(logits_fn: Callable, hidden_M_H: torch.Tensor, targets_M: torch.Tensor,
                   chunk_size: int = 256) -> torch.Tensor:
    """log p(target) at each position (M)."""

    def chunk(h, y):
        return F.log_softmax(logits_fn(h), -1).gather(-1, y[:, None]).squeeze(-1)

    return _map_chunks(chunk, chunk_size, hidden_M_H, targets_M)


@torch.no_grad()
def token_logprobs_and_entropy(logits_fn: Callable, hidden_M_H: torch.Tensor, targets_M: torch.Tensor,
                               chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and the entropy of p at each position (M each), no gradient."""
    logprobs, entropies = [], []
    for start in range(0, hidden_M_H.shape[0], chunk_size):
        logp_V = F.log_softmax(logits_fn(hidden_M_H[start:start + chunk_size]), -1)
        logprobs.append(logp_V.gather(-1, targets_M[start:start + chunk_size, None]).squeeze(-1))
        entropies.append(-(logp_V.exp() * logp_V).sum(-1))
    if not logprobs:
        empty = hidden_M_H.new_zeros(0, dtype=torch.float32)
        return empty, empty.clone()
    return torch.cat(logprobs), torch.cat(entropies)


def token_divergence(kind: str, student_logits_fn: Callable, student_hidden_M_H: torch.Tensor,
                     teacher_logits_fn: Callable, teacher_hidden_M_H: torch.Tensor,
                     jsd_beta: float = 0.5, chunk_size: int = 256) -> torch.Tensor:
    """Exact divergence between student and teacher next-token distributions at each position (M).
    With gradients, each chunk's logits are recomputed in the backward pass (activation
    checkpointing); `divergence_sum` avoids that where the head's parameters are plain tensors."""
    teacher_hidden_M_H = teacher_hidden_M_H.detach()

    def chunk(hs, ht):
        with torch.no_grad():
            teacher_logits = teacher_logits_fn(ht)
        student_logits = student_logits_fn(hs)
        _check_sizes(student_logits, teacher_logits)
        return divergence(kind, student_logits, teacher_logits, jsd_beta)

    return _map_chunks(chunk, chunk_size, student_hidden_M_H, teacher_hidden_M_H)


def divergence_sum(kind: str, student_logits_fn: Callable, student_hidden_M_H: torch.Tensor,
                   teacher_logits_fn: Callable, teacher_hidden_M_H: torch.Tensor, params: list[torch.Tensor],
                   jsd_beta: float = 0.5, chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(the sum over positions of the exact divergence, differentiable; its per-position values, detached).

    The gradient is taken chunk by chunk during the forward pass, so each chunk's logits are
    projected once for the student and once for the teacher (a checkpointed loss projects both again
    in the backward pass). `params`: the trainable tensors `student_logits_fn` uses (the head's
    weight when it is trained), which get their gradient this way too."""
    values, total = _DivergenceSum.apply(kind, jsd_beta, chunk_size, student_logits_fn, teacher_logits_fn,
                                         teacher_hidden_M_H.detach(), student_hidden_M_H, *params)
    return total, values


def _chunk_gradients(kind: str, jsd_beta: float, student_logits_fn: Callable, hidden: torch.Tensor,
                     teacher_logits: torch.Tensor, params: list[torch.Tensor], workspace: Workspace):
    """One chunk's divergence at each position and the gradients of their sum for `hidden` and
    `params`: d/dlogits in closed form (`analytic.py`), then one autograd pass through the head."""
    with torch.enable_grad():
        student_logits = student_logits_fn(hidden)
    _check_sizes(student_logits, teacher_logits)
    value, grad_logits = divergence_and_grad(kind, student_logits.detach(), teacher_logits.detach(), jsd_beta,
                                             workspace)
    return value, torch.autograd.grad(student_logits, [hidden, *params],
                                      grad_outputs=grad_logits.to(student_logits.dtype))


class _DivergenceSum(torch.autograd.Function):
    """Forward: per chunk, the divergence and its gradient with respect to the chunk's hidden
    states and the head's parameters (`_chunk_gradients`, with buffers reused across chunks). The
    output is a sum, so the backward pass only scales the stored gradients by the incoming scalar."""

    @staticmethod
    def forward(ctx, kind, jsd_beta, chunk_size, student_logits_fn, teacher_logits_fn, teacher_hidden_M_H,
                student_hidden_M_H, *params):
        grad_hidden = torch.zeros_like(student_hidden_M_H)
        grad_params = [torch.zeros_like(p) for p in params]
        values = []
        workspace = Workspace()
        for start in range(0, student_hidden_M_H.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            hidden = student_hidden_M_H[rows].detach().requires_grad_()
            teacher_logits = teacher_logits_fn(teacher_hidden_M_H[rows])
            value, grads = _chunk_gradients(kind, jsd_beta, student_logits_fn, hidden, teacher_logits, params,
                                            workspace)
            grad_hidden[rows] = grads[0]
            for accumulated, grad in zip(grad_params, grads[1:]):
                accumulated += grad
            values.append(value)
        ctx.save_for_backward(grad_hidden, *grad_params)
        values = torch.cat(values) if values else student_hidden_M_H.new_zeros(0, dtype=torch.float32)
        ctx.mark_non_differentiable(values)
        return values, values.sum()

    @staticmethod
    def backward(ctx, _grad_values, grad_total):
        grad_hidden, *grad_params = ctx.saved_tensors
        return (None, None, None, None, None, None, grad_hidden * grad_total, *(g * grad_total for g in grad_params))


def _check_sizes(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(f"exact divergences need equal output sizes: student has {student_logits.shape[-1]} "
                         f"logits, teacher {teacher_logits.shape[-1]}; use loss.kind=sampled_reverse_kl")
