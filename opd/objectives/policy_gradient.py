"""The policy gradient on the student's samples: distillation's sampled reverse-KL estimator (the
advantage holds the teacher's log-ratio) and RL (the advantage holds the reward)."""

from __future__ import annotations

import torch

from opd.losses.chunked import token_logprobs
from opd.losses.policy_gradient import policy_gradient_loss
from opd.objectives import MicroBatch, Objective, register


@register("policy_gradient")
class PolicyGradient(Objective):
    needs = "advantages"

    def check(self, advantages, scores):
        if advantages is None:
            raise ValueError("the policy gradient needs advantages")

    def loss(self, batch: MicroBatch):
        cfg = self.loss_cfg
        logprobs_M = token_logprobs(batch.logits, batch.hidden_M_H, batch.targets_M, cfg.chunk_size)
        behaviour_M = batch.at_targets(batch.rollouts.behaviour_logprobs)
        advantages_M = batch.per_position(batch.advantages, shift=1)
        weights = batch.rollouts.importance_weights
        weights_M = torch.ones_like(logprobs_M) if weights is None else batch.at_targets(weights)
        loss = policy_gradient_loss(logprobs_M, behaviour_M, advantages_M, weights_M, batch.num_tokens, cfg.clip_eps)
        log_ratio = logprobs_M.detach() - behaviour_M
        ratio = torch.exp(log_ratio)
        sums = {"ratio_mean": float(ratio.sum()),
                # before the update, so on-policy this is the sampler's disagreement with the learner
                "logprob_mismatch": float(log_ratio.abs().sum())}
        if cfg.clip_eps is not None:
            sums["clip_fraction"] = float(((ratio - 1).abs() > cfg.clip_eps).sum())
        return loss, sums
