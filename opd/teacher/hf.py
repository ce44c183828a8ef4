"""The teacher as a Hugging Face model in the same process (`opd.roles.Teacher`).

`score` is one prefill per micro-batch that returns log pi_teacher(y_t) for every completion token;
with `keep_hidden` it also keeps the final hidden states and the head that projects them, from
which the exact (full-vocabulary) losses compute the teacher's logits a chunk at a time.
"""

from __future__ import annotations

import torch

from opd.flops import ModelCost
from opd.losses.chunked import token_logprobs
from opd.models import LogitsHead
from opd.roles import TeacherScores
from opd.rollouts import Rollouts
from opd.tokenizer_check import check_tokenizers_match

__all__ = ["HFTeacher", "TeacherScores"]


class HFTeacher:
    full_distribution = True
    top_k = 0

    def __init__(self, model, tokenizer, chunk_size: int = 256, micro_batch_size: int = 8):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.head = LogitsHead(self.model)
        self.output_size = self.head.head.weight.shape[0]
        self.cost = ModelCost.from_model(self.model)
        self.chunk_size = chunk_size
        self.micro_batch_size = micro_batch_size

    def check_tokenizer(self, tokenizer) -> None:
        check_tokenizers_match(tokenizer, self.tokenizer)

    def verify(self, vocab_size: int) -> None:
        """The chunked head must reproduce the model's own forward (see LogitsHead.verify)."""
        self.head.verify(vocab_size)

    @torch.no_grad()
    def score(self, rollouts: Rollouts, keep_hidden: bool = False) -> TeacherScores:
        logprobs = torch.zeros_like(rollouts.completion_mask)
        hidden_all = None
        for slot, micro in rollouts.micro_batches(self.micro_batch_size):
            hidden, states_M_H = self.head.completion_states(micro)
            selected = micro.predicts_completion
            scores = token_logprobs(self.head.logits, states_M_H, micro.tokens[:, 1:][selected], self.chunk_size)
            slot.put_predicted(logprobs, scores, micro)
            if keep_hidden:
                if hidden_all is None:
                    hidden_all = hidden.new_zeros(*rollouts.tokens.shape, hidden.shape[-1])
                hidden_all[slot.rows, slot.start:slot.stop] = hidden
        if not keep_hidden:
            return TeacherScores(logprobs)
        return TeacherScores(logprobs, hidden=hidden_all, logits=self.head.logits)

    def take_metrics(self) -> dict:
        return {}

    def as_sampler(self, sampling):
        from opd.sampler.hf import HFSampler

        return HFSampler(self.model, self.tokenizer, sampling)

    def close(self) -> None:
        pass
