"""The teacher as a Hugging Face model in the same process.

`score` is one prefill per micro-batch that returns log pi_teacher(y_t) for every completion token;
with `keep_hidden` it also keeps the final hidden states, from which the exact (full-vocabulary)
losses project the teacher's logits a chunk at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.losses.chunked import token_logprobs
from opd.models import LogitsHead
from opd.rollouts import Rollouts


@dataclass
class TeacherScores:
    logprobs: torch.Tensor  # B x T, aligned with rollouts.tokens, 0 outside the completion
    hidden: torch.Tensor | None = None  # B x T x H final hidden states (exact losses only)


class HFTeacher:
    def __init__(self, model, tokenizer, chunk_size: int = 256, micro_batch_size: int = 8):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.head = LogitsHead(self.model)
        self.chunk_size = chunk_size
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def score(self, rollouts: Rollouts, keep_hidden: bool = False) -> TeacherScores:
        logprobs = torch.zeros_like(rollouts.completion_mask)
        hidden_parts = []
        for rows, micro in rollouts.micro_batches(self.micro_batch_size):
            hidden, states_M_H = self.head.completion_states(micro)
            selected = micro.predicts_completion
            scores = token_logprobs(self.head.logits, states_M_H, micro.tokens[:, 1:][selected], self.chunk_size)
            logprobs[rows, 1:][selected] = scores
            if keep_hidden:
                hidden_parts.append(hidden)
        return TeacherScores(logprobs, torch.cat(hidden_parts) if keep_hidden else None)
