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
        for start in range(0, rollouts.batch_size, self.micro_batch_size):
            rows = slice(start, start + self.micro_batch_size)
            tokens = rollouts.tokens[rows]
            hidden = self.head.hidden(tokens, rollouts.attention_mask[rows])
            # the state at position t-1 predicts token t
            selected = rollouts.completion_mask[rows, 1:].bool()
            scores = token_logprobs(self.head.logits, hidden[:, :-1][selected], tokens[:, 1:][selected],
                                    self.chunk_size)
            logprobs[rows, 1:][selected] = scores
            if keep_hidden:
                hidden_parts.append(hidden)
        return TeacherScores(logprobs, torch.cat(hidden_parts) if keep_hidden else None)
