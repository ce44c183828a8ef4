"""Per-token advantages: one function for distillation, RL and RL + teacher KL (DESIGN.md §2).

    k_t = b_t - l_t                        sampled reverse-KL estimate, student vs teacher
    A_t = -c * sum_{s>=t} gamma^(s-t) k_s  (gamma = 0: A_t = -c * k_t)
        + (r - mean_group(r)) [/ std_group(r)]   when rewards are given

With a teacher of another tokenizer (`chunks`, opd.teacher.cross) the KL term is per aligned chunk:
k_c = sum_{i in c} b_i - sum_{j in c} log pi_T(t_j), discounted over later chunks, and every student
token of chunk c gets -c * (that sum). With one tokenizer each chunk is one token: the same numbers.

Advantages are data for the policy gradient: they are computed without gradient.
"""

from __future__ import annotations

import torch

from opd.roles import Chunks


def teacher_kl(behaviour_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor,
               completion_mask: torch.Tensor) -> torch.Tensor:
    """k_t = log pi_old(y_t) - log pi_teacher(y_t) on completion tokens, 0 elsewhere."""
    return (behaviour_logprobs - teacher_logprobs) * completion_mask


def discounted_future_sum(values_B_T: torch.Tensor, mask_B_T: torch.Tensor, discount: float) -> torch.Tensor:
    """sum_{s>=t} discount^(s-t) * values_s over masked positions of each row."""
    values_B_T = values_B_T * mask_B_T
    if discount == 0.0:
        return values_B_T
    out = torch.zeros_like(values_B_T)
    running = torch.zeros_like(values_B_T[:, 0])
    for t in range(values_B_T.shape[1] - 1, -1, -1):
        running = values_B_T[:, t] + discount * running
        out[:, t] = running
    return out * mask_B_T


def group_centred_rewards(rewards_B: torch.Tensor, group_ids_B: torch.Tensor,
                          divide_by_std: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """r - mean of r over the samples of the same prompt (GRPO); optionally / group std."""
    groups = int(group_ids_B.max()) + 1
    counts = torch.zeros(groups, device=rewards_B.device).index_add_(0, group_ids_B, torch.ones_like(rewards_B))
    means = torch.zeros(groups, device=rewards_B.device).index_add_(0, group_ids_B, rewards_B) / counts
    centred = rewards_B - means[group_ids_B]
    if divide_by_std:
        var = torch.zeros(groups, device=rewards_B.device).index_add_(0, group_ids_B, centred**2)
        std = (var / (counts - 1).clamp(min=1)).sqrt()
        centred = centred / (std[group_ids_B] + eps)
    return centred


def chunk_kl(behaviour_logprobs: torch.Tensor, chunks: Chunks) -> torch.Tensor:
    """B x C: k_c = (student log-probs summed over the chunk) - (the teacher's), 0 without signal."""
    batch, width = chunks.teacher_logprobs.shape
    index = torch.where(chunks.index >= 0, chunks.index, width)  # column `width` collects the rest
    student = torch.zeros(batch, width + 1, dtype=behaviour_logprobs.dtype, device=behaviour_logprobs.device)
    student.scatter_add_(1, index, behaviour_logprobs)
    return (student[:, :width] - chunks.teacher_logprobs) * chunks.signal


def chunk_advantages(behaviour_logprobs: torch.Tensor, chunks: Chunks, kl_coef: float, discount: float) -> torch.Tensor:
    """B x T: -c * (discounted sum of k over this and later chunks), on every token of a chunk."""
    per_chunk = -kl_coef * discounted_future_sum(chunk_kl(behaviour_logprobs, chunks), chunks.signal, discount)
    index = chunks.index.clamp(min=0)
    return per_chunk.gather(1, index) * (chunks.index >= 0)


@torch.no_grad()
def compute_advantages(completion_mask: torch.Tensor, behaviour_logprobs: torch.Tensor | None = None,
                       teacher_logprobs: torch.Tensor | None = None, kl_coef: float = 1.0, discount: float = 0.0,
                       rewards: torch.Tensor | None = None, group_ids: torch.Tensor | None = None,
                       divide_by_std: bool = False, chunks: Chunks | None = None) -> torch.Tensor:
    """B x T advantages from a teacher KL term, a reward term, or both. `chunks`: the teacher's
    log-probs are per aligned chunk (a teacher of another tokenizer), `teacher_logprobs` unused."""
    advantages = torch.zeros_like(completion_mask, dtype=torch.float32)
    if chunks is not None and kl_coef != 0.0:
        advantages += chunk_advantages(behaviour_logprobs, chunks, kl_coef, discount)
    elif teacher_logprobs is not None and kl_coef != 0.0:
        k = teacher_kl(behaviour_logprobs, teacher_logprobs, completion_mask)
        advantages += -kl_coef * discounted_future_sum(k, completion_mask, discount)
    if rewards is not None:
        centred = group_centred_rewards(rewards.float(), group_ids, divide_by_std)
        advantages += centred[:, None] * completion_mask
    return advantages
