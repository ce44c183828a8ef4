"""Cross-entropy on given tokens: SFT on a dataset's or a teacher's completions (off-policy
distillation) and next-token training on documents (mid-training)."""

from __future__ import annotations

import torch


def completion_cross_entropy(logprobs_M: torch.Tensor, num_tokens: torch.Tensor | float) -> torch.Tensor:
    """-(1/N) sum of log pi_theta(y_t) over the M target tokens of a micro-batch.

    N counts the target tokens of the whole optimizer batch, so that micro-batching does not
    change the gradient, and prompt and padding tokens are never among the M targets.
    """
    return -logprobs_M.sum() / num_tokens
