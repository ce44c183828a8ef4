"""The learner: one optimizer step on a batch of rollouts, split into micro-batches.

Three objectives share the step: the policy gradient (distillation's sampled estimator and RL),
an exact divergence to a local teacher, and cross-entropy on given tokens (SFT, mid-training).
Every micro-batch's loss is divided by the completion-token count of the *whole* batch, so the
accumulated gradient is the same whatever the micro-batch size.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from opd.config import LossConfig, OptimConfig
from opd.losses.chunked import token_divergence, token_logprobs
from opd.losses.cross_entropy import completion_cross_entropy
from opd.losses.policy_gradient import policy_gradient_loss
from opd.models import LogitsHead
from opd.rollouts import Rollouts


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Linear warm-up to 1, then constant or cosine decay to `min_lr_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


OBJECTIVES = ("policy_gradient", "divergence", "cross_entropy")


class Learner:
    def __init__(self, model, optim: OptimConfig, loss: LossConfig, total_steps: int, micro_batch_size: int,
                 objective: str | None = None):
        # Default: what loss.kind asks for (the sampled estimator is a policy gradient).
        self.objective = objective or ("policy_gradient" if loss.kind == "sampled_reverse_kl" else "divergence")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective {self.objective!r}: expected one of {OBJECTIVES}")
        self.model = model
        self.head = LogitsHead(model)
        self.loss_cfg = loss
        self.micro_batch_size = micro_batch_size
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optim_cfg = optim
        self.optimizer = torch.optim.AdamW(self.params, lr=optim.lr, betas=optim.betas,
                                           weight_decay=optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(
            lr_multiplier, warmup_steps=optim.warmup_steps, total_steps=total_steps,
            schedule=optim.schedule, min_lr_ratio=optim.min_lr_ratio))

    @property
    def exact(self) -> bool:
        """Whether the step needs the teacher's hidden states (a full-vocabulary divergence)."""
        return self.objective == "divergence"

    def train_step(self, rollouts: Rollouts, advantages: torch.Tensor,
                   teacher_hidden: torch.Tensor | None = None, teacher_head: LogitsHead | None = None) -> dict:
        """One optimizer step. The exact losses need the teacher's hidden states and head;
        cross-entropy needs no advantages (pass None)."""
        if self.exact and (teacher_hidden is None or teacher_head is None):
            raise ValueError(f"loss.kind={self.loss_cfg.kind} needs the teacher's hidden states (a local teacher)")
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        num_tokens = rollouts.completion_mask.sum().clamp(min=1)
        total_loss = 0.0
        ratio_sum = clipped = divergence_sum = 0.0
        for rows, micro in rollouts.micro_batches(self.micro_batch_size):
            _, hidden_M_H = self.head.completion_states(micro)
            selected = micro.predicts_completion
            if self.objective == "cross_entropy":
                logprobs_M = token_logprobs(self.head.logits, hidden_M_H, micro.tokens[:, 1:][selected],
                                            self.loss_cfg.chunk_size)
                loss = completion_cross_entropy(logprobs_M, num_tokens)
            elif self.exact:
                div_M = token_divergence(self.loss_cfg.kind, self.head.logits, hidden_M_H, teacher_head.logits,
                                         teacher_hidden[rows, :-1][selected], self.loss_cfg.jsd_beta,
                                         self.loss_cfg.chunk_size)
                loss = div_M.sum() / num_tokens
                divergence_sum += float(div_M.detach().sum())
            else:
                logprobs_M = token_logprobs(self.head.logits, hidden_M_H, micro.tokens[:, 1:][selected],
                                            self.loss_cfg.chunk_size)
                behaviour_M = micro.behaviour_logprobs[:, 1:][selected]
                advantages_M = advantages[rows, 1:][selected]
                loss = policy_gradient_loss(logprobs_M, behaviour_M, advantages_M, torch.ones_like(logprobs_M),
                                            num_tokens, self.loss_cfg.clip_eps)
                ratio = torch.exp(logprobs_M.detach() - behaviour_M)
                ratio_sum += float(ratio.sum())
                if self.loss_cfg.clip_eps is not None:
                    clipped += float(((ratio - 1).abs() > self.loss_cfg.clip_eps).sum())
            loss.backward()
            total_loss += float(loss.detach())

        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()

        n = float(num_tokens)
        metrics = {"loss": total_loss, "grad_norm": float(grad_norm), "lr": lr}
        if self.objective == "cross_entropy":
            metrics["cross_entropy"] = total_loss
        elif self.exact:
            metrics[f"exact_{self.loss_cfg.kind}"] = divergence_sum / n
        else:
            metrics["ratio_mean"] = ratio_sum / n
            if self.loss_cfg.clip_eps is not None:
                metrics["clip_fraction"] = clipped / n
        return metrics

    # --- state for exact resume -------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
