"""Importance-sampling policy-gradient loss (DESIGN.md §2).

    L = -(1/N) * sum_t m_t * exp(log pi_theta(y_t) - b_t) * A_t

`A_t` must be detached (it is data, not a function of theta); `N` counts the completion tokens of
the whole optimizer batch, so splitting the batch into micro-batches does not change the gradient.
"""

from __future__ import annotations

import torch


def policy_gradient_loss(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, advantages: torch.Tensor,
                         mask: torch.Tensor, num_tokens: torch.Tensor | float,
                         clip_eps: float | None = None) -> torch.Tensor:
    """Sum over this (micro-)batch's masked tokens, divided by the whole batch's token count.

    With `clip_eps`, the PPO pessimistic bound min(r*A, clip(r, 1-eps, 1+eps)*A) is used.
    """
    advantages = advantages.detach()
    ratio = torch.exp(logprobs - behaviour_logprobs.detach())
    objective = ratio * advantages
    if clip_eps is not None:
        clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
        objective = torch.minimum(objective, clipped)
    return -(objective * mask).sum() / num_tokens
