"""The exact divergences and their gradients with respect to the student's logits, in closed form.

Autograd through `divergences.py` allocates a fresh rows x V tensor for every elementwise op (on a
50k vocabulary, 50 MB each: glibc serves them by mmap and page-faults them in) and takes `exp` of
log-probs far below -87, whose results are subnormal floats (an order of magnitude slower). Here the
same quantities are computed in place into buffers reused across chunks, and every `exp` reads
log-probs floored at -87 (exp(-87) ~ 1.6e-38, the smallest normal float: what is lost is below
float32's resolution of any sum it enters).

With s, t the student's and teacher's log-probs, q = exp(s), p = exp(t), the gradients with respect
to the student's logits are

    reverse KL(q || p)   q * (s - t - KL)
    forward KL(p || q)   q - p
    JSD_beta             (1 - beta) * q * (s - m - KL(q || m)),   m = log(beta p + (1 - beta) q)
                         (computed as (1 - beta) * q * (u - E_q[u]), u = s - m + log(1 - beta))

(the softmax's Jacobian applied to d/dq; for JSD the terms of d/dq through m cancel).
"""

from __future__ import annotations

import math

import torch

# log-probs are floored here before exp: exp(-87) is still a normal float32
EXP_FLOOR = -87.0


class Workspace:
    """rows x V float32 buffers kept from one chunk to the next (a last, shorter chunk uses views)."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        rows, vocab = like.shape
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[0] < rows or buffer.shape[1] != vocab or buffer.device != like.device:
            buffer = torch.empty(rows, vocab, dtype=torch.float32, device=like.device)
            self._buffers[name] = buffer
        return buffer[:rows]


def _floored_exp(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    torch.clamp(x, min=EXP_FLOOR, out=out)
    return out.exp_()


def _log_softmax_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dimension, in place (`scratch`: a buffer of x's shape)."""
    x.sub_(x.amax(-1, keepdim=True))
    x.sub_(_floored_exp(x, scratch).sum(-1, keepdim=True).log_())
    return x


@torch.no_grad()
def divergence_and_grad(kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                        jsd_beta: float = 0.5, workspace: Workspace | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the divergence at each row, its gradient with respect to `student_logits`), both float32.
    rows x V inputs. `teacher_logits` is overwritten when it is already a float32 tensor (callers
    pass a fresh projection); the returned gradient lives in a workspace buffer (or in the teacher's
    tensor) and is valid until the next call with the same workspace."""
    if kind == "jsd" and jsd_beta in (0.0, 1.0):
        kind = "forward_kl" if jsd_beta == 0.0 else "reverse_kl"  # the end points, as in divergences.py
    workspace = workspace or Workspace()
    s = workspace.get("student", student_logits)
    s.copy_(student_logits)
    if teacher_logits.dtype == torch.float32 and teacher_logits.is_contiguous():
        t = teacher_logits
    else:
        t = workspace.get("teacher", teacher_logits)
        t.copy_(teacher_logits)
    scratch = workspace.get("scratch", s)
    _log_softmax_(s, scratch)
    _log_softmax_(t, scratch)

    if kind == "reverse_kl":
        q = _floored_exp(s, scratch)
        diff = t.neg_().add_(s)                       # s - t
        value = torch.mul(q, diff, out=s).sum(-1)     # s is no longer needed
        return value, diff.sub_(value[:, None]).mul_(q)
    if kind == "forward_kl":
        p = _floored_exp(t, scratch)
        value = t.sub_(s).mul_(p).sum(-1)             # sum p (t - s)
        grad = _floored_exp(s, t)                     # q, into t's buffer
        return value, grad.sub_(p)
    if kind == "jsd":
        # s - m = -log(1 - beta) - softplus(c + t - s) with c = log(beta / (1 - beta)). Where the two
        # distributions barely overlap, s - m is nearly constant on the student's mass and the
        # gradient is the small remainder u - E_q[u] (u = -softplus(...)): computed from u alone,
        # float32 keeps it (as log-probs, s - m - KL(q||m) cancels to rounding noise).
        beta = jsd_beta
        log_1mb, c = math.log(1.0 - beta), math.log(beta) - math.log(1.0 - beta)
        p = _floored_exp(t, scratch)
        diff = t.sub_(s)                                               # t - s
        softplus, zero = workspace.get("softplus", s), s.new_zeros(())
        torch.logaddexp(torch.add(diff, c, out=softplus), zero, out=softplus)  # -u
        # t - m = -log(beta) - softplus(-(c + t - s)), likewise free of large cancelling terms
        other = torch.logaddexp(diff.add_(c).neg_(), zero, out=diff)
        kl_p_m = -math.log(beta) * p.sum(-1) - other.mul_(p).sum(-1)  # sum p (t - m)
        q = _floored_exp(s, scratch)
        q_softplus = torch.mul(q, softplus, out=diff).sum(-1)
        kl_q_m = -q_softplus - log_1mb * q.sum(-1)                      # sum q (s - m)
        value = beta * kl_p_m + (1.0 - beta) * kl_q_m
        return value, softplus.neg_().add_(q_softplus[:, None]).mul_(q).mul_(1.0 - beta)
    raise ValueError(f"unknown divergence {kind!r}: expected reverse_kl, forward_kl or jsd")
