"""Cross-entropy on given tokens: SFT on teacher samples (off-policy distillation), mid-training."""

from __future__ import annotations

from opd.losses.chunked import token_logprobs
from opd.losses.cross_entropy import completion_cross_entropy
from opd.objectives import MicroBatch, Objective, register


@register("cross_entropy")
class CrossEntropy(Objective):
    def loss(self, batch: MicroBatch):
        logprobs_M = token_logprobs(batch.logits, batch.hidden_M_H, batch.targets_M, self.loss_cfg.chunk_size)
        return completion_cross_entropy(logprobs_M, batch.num_tokens), {}

    def metrics(self, total_loss, sums, num_tokens):
        return {"cross_entropy": total_loss}
