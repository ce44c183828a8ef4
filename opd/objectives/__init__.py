"""Training objectives: what the learner minimises on one micro-batch, one module per objective.

An objective is a small class registered by name. The learner (`opd.learner.learner`) runs the
model over a micro-batch, hands the completion positions' hidden states to the objective, and sums
what it returns: the micro-batch's loss (already divided by the whole batch's token count) and its
metric sums, which become per-token metrics at the end of the step. A new loss is a new file here:

    @register("my_loss")
    class MyLoss(Objective):
        def loss(self, batch: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]: ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from opd.config import LossConfig
from opd.roles import TeacherScores
from opd.rollouts import Rollouts

REGISTRY: dict[str, type["Objective"]] = {}


def register(name: str):
    def add(cls):
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return add


@dataclass
class MicroBatch:
    """What an objective sees of one micro-batch: its rows, the student's hidden states at the
    positions that predict a completion token (M x H, in row order), the head that projects them
    to logits, and the step's teacher scores and advantages (whole-batch tensors: `slot.of` cuts
    this micro-batch's rows out of them)."""

    rollouts: Rollouts
    slot: object                       # opd.rollouts slot: .of(tensor) -> this micro-batch's rows
    hidden_M_H: torch.Tensor
    logits: Callable[[torch.Tensor], torch.Tensor]
    head_parameters: list[torch.Tensor]
    num_tokens: torch.Tensor           # completion tokens of the whole optimizer batch (all ranks)
    loss_cfg: LossConfig
    advantages: torch.Tensor | None = None
    scores: TeacherScores | None = None
    sharded: bool = False              # FSDP2: the head's weights are swapped in per call

    @property
    def targets_M(self) -> torch.Tensor:
        """The completion tokens the M positions predict."""
        return self.at_targets(self.rollouts.tokens)

    def at_targets(self, rows_B_T: torch.Tensor) -> torch.Tensor:
        """A tensor of this micro-batch's rows (B x T, about token t) at the M predicted tokens."""
        return rows_B_T[:, 1:][self.rollouts.predicts_completion]

    def per_position(self, tensor: torch.Tensor, shift: int) -> torch.Tensor:
        """A whole-batch B x T tensor at this micro-batch's M positions (`shift` 1: the value of the
        predicted token; 0: the value at the predicting position)."""
        rows = self.slot.of(tensor)
        return (rows[:, 1:] if shift else rows[:, :-1])[self.rollouts.predicts_completion]


class Objective:
    """One training objective. `needs`: what a step must bring besides the rollouts
    ("advantages", "full_distribution" for the exact losses, "top_k", or None)."""

    name: str = ""
    needs: str | None = None

    def __init__(self, loss_cfg: LossConfig):
        self.loss_cfg = loss_cfg

    def check(self, advantages: torch.Tensor | None, scores: TeacherScores | None) -> None:
        """Refuse a step that lacks what this objective needs."""

    def loss(self, batch: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def metrics(self, total_loss: float, sums: dict[str, float], num_tokens: float) -> dict[str, float]:
        """Per-step metrics from the loss and the summed metric values (sums over tokens)."""
        return {name: value / num_tokens for name, value in sums.items()}


def build(name: str, loss_cfg: LossConfig) -> Objective:
    from opd.objectives import cross_entropy, divergence, policy_gradient, topk  # noqa: F401  (they register)

    if name not in REGISTRY:
        raise ValueError(f"objective {name!r}: expected one of {tuple(sorted(REGISTRY))}")
    return REGISTRY[name](loss_cfg)


def objective_of(loss: LossConfig, on_policy: bool = True) -> str:
    """What the learner optimises: cross-entropy for fixed sequences (sft, midtrain); on the
    student's samples, the policy gradient (the sampled estimator, RL), an exact divergence to a
    local teacher, or the top-k forward KL to a served one."""
    if not on_policy:
        return "cross_entropy"
    if loss.kind == "sampled_reverse_kl":
        return "policy_gradient"
    return "topk_forward_kl" if loss.kind == "topk_forward_kl" else "divergence"
