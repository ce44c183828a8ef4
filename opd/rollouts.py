"""The batch that flows sampler -> teacher -> advantages -> learner.

Layout of every B x T tensor: [left padding | prompt | completion | padding after EOS]; the prompt
part is `prompt_width` wide for all rows. Per-token values (log-probs, KL, advantages) are aligned
with `tokens`: the value at t is about token t, predicted from tokens < t, and is 0 where
`completion_mask` is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Iterator

import torch


@dataclass
class Rollouts:
    tokens: torch.Tensor  # B x T long
    attention_mask: torch.Tensor  # B x T long: 0 on left padding only
    completion_mask: torch.Tensor  # B x T float: 1 on completion tokens up to and including EOS
    behaviour_logprobs: torch.Tensor  # B x T float: log pi_old(token) at temperature 1
    entropy: torch.Tensor  # B x T float: entropy of pi_old at each completion position
    truncated: torch.Tensor  # B bool: hit max_new_tokens without EOS or stop string
    group_ids: torch.Tensor  # B long: index of the prompt each row was sampled for
    prompt_width: int
    prompts: list = field(default_factory=list)  # one entry per group (the Prompt records)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    @property
    def predicts_completion(self) -> torch.Tensor:
        """B x (T-1) bool: the positions whose state predicts a completion token (state t-1
        predicts token t), i.e. where logits are needed."""
        return self.completion_mask[:, 1:].bool()

    def micro_batches(self, size: int) -> Iterator[tuple[slice, "Rollouts"]]:
        """(row slice, rows) for consecutive micro-batches of `size` rows."""
        for start in range(0, self.batch_size, size):
            rows = slice(start, start + size)
            yield rows, self.rows(rows)

    def rows(self, index: slice) -> "Rollouts":
        """A micro-batch of rows (prompts are shared, group ids keep pointing into them)."""
        kwargs = {}
        for f in fields(self):
            value = getattr(self, f.name)
            kwargs[f.name] = value[index] if isinstance(value, torch.Tensor) else value
        return Rollouts(**kwargs)
