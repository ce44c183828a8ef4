"""The exact full-vocabulary divergence to an in-process teacher (reverse KL, forward KL, JSD)."""

from __future__ import annotations

from opd.losses.chunked import divergence_sum, token_divergence
from opd.objectives import MicroBatch, Objective, register


@register("divergence")
class Divergence(Objective):
    needs = "full_distribution"

    def check(self, advantages, scores):
        if scores is None or scores.hidden is None or scores.logits is None:
            raise ValueError(f"loss.kind={self.loss_cfg.kind} needs the teacher's hidden states (a local teacher)")

    def loss(self, batch: MicroBatch):
        cfg = self.loss_cfg
        teacher_hidden_M_H = batch.per_position(batch.scores.hidden, shift=0)
        if batch.sharded:  # FSDP2 swaps the head's weights in per call: recompute instead
            div_M = token_divergence(cfg.kind, batch.logits, batch.hidden_M_H, batch.scores.logits,
                                     teacher_hidden_M_H, cfg.jsd_beta, cfg.chunk_size)
            div_sum = div_M.sum()
        else:  # the gradient in closed form, chunk by chunk (opd.losses.analytic)
            div_sum, div_M = divergence_sum(cfg.kind, batch.logits, batch.hidden_M_H, batch.scores.logits,
                                            teacher_hidden_M_H, batch.head_parameters, cfg.jsd_beta, cfg.chunk_size)
        return div_sum / batch.num_tokens, {f"exact_{cfg.kind}": float(div_M.detach().sum())}
