"""The forward KL over a served teacher's top-k tokens plus one bucket for the rest of its mass."""

from __future__ import annotations

from opd.losses.topk import token_topk_forward_kl
from opd.objectives import MicroBatch, Objective, register


@register("topk_forward_kl")
class TopKForwardKL(Objective):
    needs = "top_k"

    def check(self, advantages, scores):
        if scores is None or scores.topk_ids is None:
            raise ValueError("loss.kind=topk_forward_kl needs the teacher's top-k log-probs (teacher.top_k > 0)")

    def loss(self, batch: MicroBatch):
        div_M = token_topk_forward_kl(batch.logits, batch.hidden_M_H,
                                      batch.per_position(batch.scores.topk_ids, shift=1),
                                      batch.per_position(batch.scores.topk_logprobs, shift=1),
                                      self.loss_cfg.chunk_size)
        return div_M.sum() / batch.num_tokens, {"topk_forward_kl": float(div_M.detach().sum())}
