"""The three roles of a run and the contracts the loop reaches them through (DESIGN.md §3, §7).

    Sampler   prompts (token ids) -> Rollouts: completions, behaviour log-probs, masks
    Teacher   Rollouts -> TeacherScores: log pi_T of every completion token (+ top-k, + hidden states)
    Learner   Rollouts + advantages (+ TeacherScores) -> one optimizer step; checkpoints

The loop (`opd.loop`) and evaluation (`opd.evaluation`) use only what is written here, never a
role's model object, so a served engine (a vLLM teacher or sampler, a learner under torchrun) can
replace an in-process one without the loop changing. The in-process implementations are
`opd.sampler.hf.HFSampler`, `opd.teacher.hf.HFTeacher` and `opd.learner.learner.Learner`; the
served teacher is `opd.teacher.remote.RemoteTeacher`, the vLLM samplers (colocated or served)
`opd.sampler.vllm`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch

from opd.config import ConfigError
from opd.flops import ModelCost
from opd.rollouts import Rollouts


@dataclass
class TeacherScores:
    """What the teacher says about a batch; every B x T tensor is aligned with `rollouts.tokens`
    (the value at t is about token t) and is 0 outside the completion."""

    logprobs: torch.Tensor  # B x T: log pi_T(y_t | x, y_<t) of the sampled token
    # Exact (full-vocabulary) losses, in-process teacher only: final hidden states B x T x H and the
    # function that projects them to logits (a chunk of positions at a time).
    hidden: torch.Tensor | None = None
    logits: Callable[[torch.Tensor], torch.Tensor] | None = None
    # Top-k losses (a served teacher): the teacher's k most likely tokens at each position and their
    # log-probs, B x T x k, both 0 outside the completion.
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    # A teacher of another tokenizer (opd.teacher.cross): the student's tokens grouped into aligned
    # chunks; the advantage is then per chunk (opd.advantages). `logprobs` is the chunk's teacher
    # log-prob shared evenly over its student tokens (and the student's own log-prob where a chunk
    # carries no signal), so per-token means keep their meaning.
    chunks: "Chunks | None" = None
    # Several teachers (opd.teacher.router): B bool, the rows a teacher scored; the others (reward-only
    # prompts) carry the student's own log-probs (KL 0). None: every row.
    rows: torch.Tensor | None = None


@dataclass
class Chunks:
    """Student completion tokens grouped into chunks whose text both tokenizers cut at the same bytes."""

    index: torch.Tensor  # B x T long: the chunk of each completion token; -1 elsewhere and where there is no signal
    teacher_logprobs: torch.Tensor  # B x C: sum of log pi_T over the teacher's tokens of each chunk
    signal: torch.Tensor  # B x C float: 1 where the chunk carries a signal (0: padding, over the cap, dropped row)


class OutputSizeMismatchError(ConfigError):
    """Student and teacher heads of different sizes where full distributions are compared."""


@runtime_checkable
class Sampler(Protocol):
    """Draws the student's completions. `sync_weights()` is called after every optimizer step (and
    once at the start) so that the next batch comes from the learner's current weights (a no-op
    when the sampler shares the learner's model in process). `seed`: the batch is drawn from it
    alone (sampling in the background while the learner trains); None: from torch's generator."""

    tokenizer: object

    def sample(self, prompt_ids: list[list[int]], samples_per_prompt: int | None = None,
               max_new_tokens: int | None = None, prompts: list | None = None,
               greedy: bool = False, seed: int | None = None) -> Rollouts: ...

    def sync_weights(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Teacher(Protocol):
    """Scores the student's completions. What it can return: `full_distribution` (hidden states
    and a head, for the exact losses), `top_k` log-probs per position (0: none); `output_size` is
    its number of logits (None when a server does not say); `cost` its FLOPs per token (None when
    unknown, e.g. a served model whose config we do not have)."""

    full_distribution: bool
    top_k: int
    output_size: int | None
    cost: ModelCost | None

    def check_tokenizer(self, tokenizer) -> None:
        """Raise TokenizerMismatchError when the teacher would score other text than the student sampled."""

    def score(self, rollouts: Rollouts, keep_hidden: bool = False) -> TeacherScores: ...

    def take_metrics(self) -> dict:
        """Counters since the last call (time waiting, requests, retries, ...); {} when none."""

    def verify(self, vocab_size: int) -> None:
        """Refuse a teacher whose scores cannot be trusted for a student of `vocab_size` tokens (an
        in-process head that does not reproduce its model's logits chunk by chunk); a no-op where
        nothing can be checked locally (a served teacher checks every answer instead)."""

    def as_sampler(self, sampling) -> Sampler | None:
        """The teacher as a model that samples (`sampling`: a SamplingConfig), for its own accuracy on
        the eval sets, the run's ceiling; None when it cannot sample (a served scorer)."""

    def close(self) -> None:
        """Release what the teacher holds (connections, threads); called once at the end of a run."""


@runtime_checkable
class Learner(Protocol):
    """Owns the trained weights and the optimizer."""

    objective: str  # policy_gradient | divergence | topk_forward_kl | cross_entropy
    output_size: int
    cost: ModelCost

    @property
    def device(self) -> torch.device: ...

    @property
    def exact(self) -> bool:
        """Whether a step needs the teacher's full distribution (TeacherScores.hidden and .logits)."""

    def verify(self, vocab_size: int) -> None:
        """Refuse a model whose logits the learner cannot reproduce chunk by chunk."""

    def policy_logprobs(self, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-prob of every completion token under the current weights and the entropy there
        (B x T each), no gradient: recomputed behaviour log-probs."""

    def policy_weights(self) -> dict[str, torch.Tensor]:
        """The weights an inference engine loads: plain Hugging Face names, a LoRA adapter merged."""

    def export_policy(self, directory: Path, tokenizer, weights_only: bool = False) -> None:
        """The same as a Hugging Face directory (config, tokenizer, safetensors; only the
        safetensors with `weights_only`)."""

    def train_step(self, rollouts: Rollouts, advantages: torch.Tensor | None,
                   scores: TeacherScores | None = None) -> dict:
        """One optimizer step; a non-finite loss or gradient skips the update (metrics `skipped`)."""

    def divergence(self, rollouts: Rollouts, scores: TeacherScores, kind: str = "reverse_kl") -> float:
        """Mean full-vocabulary divergence to the teacher over the completion tokens, no gradient."""

    def save(self, directory: Path, tokenizer) -> None:
        """A Hugging Face directory (full weights or a LoRA adapter) with the tokenizer."""

    def nonfinite_tensors(self) -> list[str]:
        """Names of weights holding NaN or inf: a checkpoint is never written from them."""

    def load_weights(self, directory: Path) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def check_output_sizes(learner: Learner, teacher: Teacher | None, needs_full_distribution: bool) -> bool:
    """Whether student and teacher have heads of one size (same tokenizer, but heads may be padded
    differently: Qwen2.5 0.5B vs 7B). The sampled loss reads only the sampled token's log-prob and
    trains either way; exact divergences need equal sizes and are refused here."""
    if teacher is None:
        return False
    same = teacher.output_size is not None and teacher.output_size == learner.output_size
    if needs_full_distribution and not same:
        teacher_size = "an unknown number of" if teacher.output_size is None else str(teacher.output_size)
        raise OutputSizeMismatchError(
            f"the loss compares full distributions, but the student has {learner.output_size} output logits and the "
            f"teacher {teacher_size} (padding rows differ); use loss.kind=sampled_reverse_kl for this pair")
    return same
