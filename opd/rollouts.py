"""The batch that flows sampler -> teacher -> advantages -> learner.

Layout of every B x T tensor of sampled rollouts: [left padding | prompt | completion | padding after
EOS]; the prompt part is `prompt_width` wide for all rows. Fixed sequences (SFT examples, documents;
`sequence_batch`) are right-padded instead: [prompt | completion | padding], `prompt_width` 0. Per-token values (log-probs, KL, advantages) are aligned
with `tokens`: the value at t is about token t, predicted from tokens < t, and is 0 where
`completion_mask` is 0.

Multi-turn episodes (opd.envs): the completion is the whole conversation after the first prompt,
the student's sampled turns and the environment's messages between them; `loss_mask` is 1 on the
sampled tokens only (non-contiguous spans). Every loss, advantage, metric and the teacher's scores
use `loss_mask`; for a single turn it is `completion_mask` itself.
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
    entropy: torch.Tensor | None  # B x T float: entropy of pi_old at each completion position (None: not known)
    truncated: torch.Tensor  # B bool: hit max_new_tokens without EOS or stop string
    group_ids: torch.Tensor  # B long: index of the prompt each row was sampled for
    prompt_width: int
    prompts: list = field(default_factory=list)  # one entry per group (the Prompt records)
    # B x T: per-token weight of the policy gradient (truncated importance weights pi_learner /
    # pi_engine when sampling.importance_cap is set); None: 1 everywhere.
    importance_weights: torch.Tensor | None = None
    # B x T float: 1 on tokens the student sampled (what the loss counts); None at construction:
    # completion_mask (a single turn). 0 on environment tokens (tool results, user turns).
    loss_mask: torch.Tensor | None = None
    # B float: the episode's reward from its Env (opd.envs), replacing the grader's; None: graded.
    env_rewards: torch.Tensor | None = None
    env_metrics: dict = field(default_factory=dict)  # the episodes' turns, tool calls, truncations (env/...)

    def __post_init__(self):
        if self.loss_mask is None:
            self.loss_mask = self.completion_mask
    # B x T: the learner's log-probs under its current weights, recomputed at learner time
    # (sampling.recompute_logprobs); None: not recomputed, behaviour_logprobs stand in.
    recomputed_logprobs: torch.Tensor | None = None

    @property
    def student_logprobs(self) -> torch.Tensor:
        """The student's log-probs of the teacher-KL term k_t = s_t - l_t: the current policy's
        when recomputed (reverse KL does not tolerate a stale student), else the behaviour ones."""
        return self.behaviour_logprobs if self.recomputed_logprobs is None else self.recomputed_logprobs

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.loss_mask.sum(-1)

    @property
    def multi_turn(self) -> bool:
        return self.loss_mask is not self.completion_mask and not torch.equal(self.loss_mask, self.completion_mask)

    @property
    def predicts_completion(self) -> torch.Tensor:
        """B x (T-1) bool: the positions whose state predicts a sampled token (state t-1 predicts
        token t), i.e. where logits are needed (environment tokens are read, never predicted)."""
        return self.loss_mask[:, 1:].bool()

    def micro_batches(self, size: int) -> Iterator[tuple["Slot", "Rollouts"]]:
        """(where it lies, rows) for micro-batches of `size` rows: rows of similar length together,
        each micro-batch cut to the columns its rows use (from its first real token to its last
        completion token), so that padding is neither run through the model nor projected.

        Exact: positions come from the attention mask (left padding is skipped anyway) and no
        position attends to later ones (the columns cut at the end are seen by nobody). Rows of
        equal length keep their order."""
        starts, stops = self.extents()
        order = torch.argsort(stops - starts, stable=True)
        for first in range(0, self.batch_size, size):
            rows = order[first:first + size]
            slot = Slot(rows, int(starts[rows].min()), int(stops[rows].max()))
            yield slot, self.part(slot)

    def extents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's first real column and one past its last sampled token (B each)."""
        columns = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        starts = torch.where(self.attention_mask.bool(), columns, self.tokens.shape[1]).min(-1).values
        stops = torch.where(self.loss_mask.bool(), columns + 1, 0).max(-1).values
        return starts, torch.maximum(stops, starts + 1)

    def part(self, slot: "Slot") -> "Rollouts":
        """The rows and columns of `slot` (a copy)."""
        kwargs = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "loss_mask" and value is self.completion_mask:
                value = None  # stays the same tensor as completion_mask in the part
            elif isinstance(value, torch.Tensor):
                value = slot.of(value) if value.dim() >= 2 else value[slot.rows]
            kwargs[f.name] = value
        kwargs["prompt_width"] = max(0, self.prompt_width - slot.start)
        return Rollouts(**kwargs)

    def to(self, device: torch.device | str) -> "Rollouts":
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        if kwargs["loss_mask"] is self.completion_mask:
            kwargs["loss_mask"] = None
        return Rollouts(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    def rows(self, index: slice) -> "Rollouts":
        """Some rows, all columns (prompts are shared, group ids keep pointing into them)."""
        rows = torch.arange(self.batch_size, device=self.tokens.device)[index]
        return self.part(Slot(rows, 0, self.tokens.shape[1]))


@dataclass(frozen=True)
class Slot:
    """Where a micro-batch lies in its batch: its rows, and the columns [start, stop) they use."""

    rows: torch.Tensor  # long indices into the batch
    start: int
    stop: int

    def of(self, values: torch.Tensor) -> torch.Tensor:
        """The micro-batch's part of a B x T (x ...) tensor of the batch (a copy)."""
        return values[self.rows.to(values.device), self.start:self.stop]

    def put_predicted(self, values: torch.Tensor, predicted_M: torch.Tensor, micro: "Rollouts") -> None:
        """Write per-token values computed on the micro-batch (M: its `predicts_completion`
        positions) into the batch's B x T tensor `values`, at the tokens they are about."""
        part = self.of(values)
        part[:, 1:][micro.predicts_completion] = predicted_M.to(part.dtype)
        values[self.rows.to(values.device), self.start:self.stop] = part


def sampled_batch(prompt_ids: list[list[int]], completions: list[list[int]], logprobs: list[list[float]],
                  ended: list[bool], samples_per_prompt: int, pad_id: int, prompts: list | None = None,
                  device: torch.device | str = "cpu") -> Rollouts:
    """Rollouts from completions sampled elsewhere (an inference engine), laid out exactly as the
    in-process sampler lays them out: row i is a sample of prompt i // samples_per_prompt;
    `ended[i]`: it stopped at EOS or a stop string (else it was truncated)."""
    rows = [ids for ids in prompt_ids for _ in range(samples_per_prompt)]
    width, steps = max(map(len, rows)), max(1, max(map(len, completions)))
    batch = len(rows)
    tokens = torch.full((batch, width + steps), pad_id, dtype=torch.long)
    attention = torch.zeros_like(tokens)
    attention[:, width:] = 1  # as when decoding: every new column is attended, padding after EOS too
    completion_mask = torch.zeros(batch, width + steps)
    behaviour = torch.zeros(batch, width + steps)
    for i, (prompt, completion, lps) in enumerate(zip(rows, completions, logprobs)):
        tokens[i, width - len(prompt):width] = torch.tensor(prompt)
        attention[i, width - len(prompt):width] = 1
        end = width + len(completion)
        tokens[i, width:end] = torch.tensor(completion, dtype=torch.long)
        completion_mask[i, width:end] = 1
        behaviour[i, width:end] = torch.tensor(lps, dtype=torch.float32)
    return Rollouts(tokens=tokens, attention_mask=attention, completion_mask=completion_mask,
                    behaviour_logprobs=behaviour, entropy=None, truncated=~torch.tensor(ended, dtype=torch.bool),
                    group_ids=torch.arange(len(prompt_ids)).repeat_interleave(samples_per_prompt),
                    prompt_width=width, prompts=list(prompts) if prompts is not None else []).to(device)


def sequence_batch(sequences: list[list[int]], targets_from: list[int], pad_id: int,
                   device: torch.device | str = "cpu") -> Rollouts:
    """Rollouts for fixed sequences (SFT examples, documents): right-padded, with the loss on
    tokens from `targets_from[i]` on (the completion; 1 for a document: every token but the first).
    No behaviour log-probs: nothing was sampled."""
    width = max(map(len, sequences))
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(tokens)
    targets = torch.zeros(len(sequences), width)
    for i, (ids, start) in enumerate(zip(sequences, targets_from)):
        tokens[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        targets[i, max(start, 1):len(ids)] = 1
    zeros = torch.zeros(len(sequences), width)
    batch = Rollouts(tokens=tokens, attention_mask=attention, completion_mask=targets, behaviour_logprobs=zeros,
                     entropy=zeros.clone(), truncated=torch.zeros(len(sequences), dtype=torch.bool),
                     group_ids=torch.arange(len(sequences)), prompt_width=0)
    return batch.to(device)
