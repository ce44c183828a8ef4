"""Several teachers behind one `Teacher` (opd.roles): each row is scored by the teacher its prompt
names (`Prompt.teacher`, set from data.sources / data.teacher_field), so the loop does not change.

`score` splits the batch by teacher, scores the parts concurrently (a served teacher waits on its
server while an in-process one computes), and puts the answers back at their rows: log-probs,
top-k (padded to the largest k with -inf, which the top-k loss ignores) and, for the exact losses,
hidden states. Rows whose prompt names no teacher (a reward-only source) get the student's own
log-probs as the teacher's, so their KL term is exactly 0, and are left out of the KL metrics.

Exact losses with several in-process teachers: their hidden sizes and heads differ, so the
reassembled hidden states carry one more channel, the index of the row's teacher, and `logits`
projects each position with its own teacher's head. A batch that only one teacher scored passes
that teacher's hidden states and head through unchanged.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from opd.advantages import teacher_kl
from opd.flops import ModelCost, row_lengths
from opd.roles import Sampler, Teacher, TeacherScores
from opd.rollouts import Rollouts, Slot


def row_teachers(rollouts: Rollouts) -> list[str | None]:
    """The name of each row's teacher, from its prompt (None: no teacher, or no prompts known)."""
    if not rollouts.prompts:
        return [None] * rollouts.batch_size
    return [getattr(rollouts.prompts[group], "teacher", None) for group in rollouts.group_ids.tolist()]


def blended_cost(costs: list[ModelCost], weights: list[float]) -> ModelCost:
    """The cost of a batch whose positions the teachers shared in these proportions (FLOPs are linear
    in the parameter counts; attention, quadratic in length, is approximated the same way)."""
    total = sum(weights) or 1.0
    fields = ("body", "head", "trainable_body", "trainable_head", "layers", "attention_dim")
    return ModelCost(**{f: round(sum(getattr(c, f) * w for c, w in zip(costs, weights)) / total) for f in fields})


class RoutingTeacher:
    """A `Teacher` made of named teachers; see the module docstring."""

    def __init__(self, teachers: dict[str, Teacher]):
        if not teachers:
            raise ValueError("RoutingTeacher needs at least one teacher")
        self.teachers = dict(teachers)
        members = list(self.teachers.values())
        self.full_distribution = all(t.full_distribution for t in members)
        self.top_k = max(t.top_k for t in members) if all(t.top_k for t in members) else 0
        sizes = {t.output_size for t in members}
        self.output_size = sizes.pop() if len(sizes) == 1 else None
        self._costs = {name: t.cost for name, t in self.teachers.items()}
        known = None not in self._costs.values()
        self.cost = blended_cost(list(self._costs.values()), [1.0] * len(members)) if known else None
        self._pool = ThreadPoolExecutor(len(members), thread_name_prefix="opd-route")
        self._metrics: dict = {}

    # --- the contract ---

    def check_tokenizer(self, tokenizer) -> None:
        from opd.tokenizer_check import TokenizerMismatchError

        for name, teacher in self.teachers.items():
            try:
                teacher.check_tokenizer(tokenizer)
            except TokenizerMismatchError as err:
                raise type(err)(f"teachers.{name}: {err}") from None

    def verify(self, vocab_size: int) -> None:
        for teacher in self.teachers.values():
            teacher.verify(vocab_size)

    def as_sampler(self, sampling) -> Sampler | None:
        samplers = {name: t.as_sampler(sampling) for name, t in self.teachers.items()}
        samplers = {name: s for name, s in samplers.items() if s is not None}
        return RoutingSampler(samplers) if samplers else None

    def score(self, rollouts: Rollouts, keep_hidden: bool = False) -> TeacherScores:
        names = row_teachers(rollouts)
        unknown = {n for n in names if n is not None} - self.teachers.keys()
        if unknown:
            raise ValueError(f"rows name teachers {sorted(unknown)} that this run does not have "
                             f"({', '.join(self.teachers)})")
        device = rollouts.tokens.device
        rows = {name: torch.tensor([i for i, n in enumerate(names) if n == name], dtype=torch.long, device=device)
                for name in self.teachers if name in names}
        width = rollouts.tokens.shape[1]
        parts = {name: rollouts.part(Slot(r, 0, width)) for name, r in rows.items()}
        futures = {name: self._pool.submit(self.teachers[name].score, part, keep_hidden)
                   for name, part in parts.items()}
        scored = {name: future.result() for name, future in futures.items()}  # the first failure is raised

        mask = rollouts.loss_mask
        logprobs = rollouts.student_logprobs * mask  # no teacher: k_t = 0
        for name, scores in scored.items():
            logprobs[rows[name]] = scores.logprobs.to(logprobs.dtype)
        routed = torch.tensor([n is not None for n in names], dtype=torch.bool, device=device)
        out = TeacherScores(logprobs, rows=None if bool(routed.all()) else routed)
        if self.top_k:
            out.topk_ids, out.topk_logprobs = self._topk(rollouts, rows, scored)
        if keep_hidden and scored and bool(routed.all()) and all(s.hidden is not None for s in scored.values()):
            out.hidden, out.logits = self._hidden(rollouts, rows, scored)
        self._record(rollouts, parts, scored, routed)
        return out

    def take_metrics(self) -> dict:
        """teacher_kl/<name> and tokens/<name> (its share of the completion tokens; tokens/none: rows
        no teacher scored) of the last scored batch, and each teacher's own counters as <key>/<name>."""
        metrics, self._metrics = self._metrics, {}
        for name, teacher in self.teachers.items():
            metrics.update({f"{key}/{name}": value for key, value in teacher.take_metrics().items()})
        return metrics

    def close(self) -> None:
        try:
            self._pool.shutdown(wait=True, cancel_futures=True)
        finally:
            for teacher in self.teachers.values():
                teacher.close()

    # --- reassembly ---

    def _topk(self, rollouts: Rollouts, rows: dict, scored: dict) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (*rollouts.tokens.shape, self.top_k)
        ids = torch.zeros(shape, dtype=torch.long, device=rollouts.tokens.device)
        values = torch.zeros(shape, device=rollouts.tokens.device)
        for name, scores in scored.items():
            k = scores.topk_ids.shape[-1]
            inside = rollouts.loss_mask[rows[name]].bool()[..., None]
            padded = torch.full((*inside.shape[:2], self.top_k), float("-inf"), device=values.device)
            padded[..., :k] = scores.topk_logprobs.to(values.dtype)
            values[rows[name]] = torch.where(inside, padded, 0.0)
            ids[rows[name], :, :k] = scores.topk_ids.to(ids.device)
        return ids, values

    def _hidden(self, rollouts: Rollouts, rows: dict, scored: dict):
        if len(scored) == 1:  # one teacher scored every row: its own states and head, unchanged
            return next(iter(scored.values())).hidden, next(iter(scored.values())).logits
        order = list(scored)
        size = max(s.hidden.shape[-1] for s in scored.values())
        hidden = torch.zeros(*rollouts.tokens.shape, size + 1, device=rollouts.tokens.device)
        for index, name in enumerate(order):
            h = scored[name].hidden
            hidden[rows[name], :, :h.shape[-1]] = h.float()
            hidden[rows[name], :, -1] = float(index)
        heads = [(scored[name].logits, scored[name].hidden.shape[-1], scored[name].hidden.dtype) for name in order]

        def logits(states_M_H: torch.Tensor) -> torch.Tensor:
            which_M = states_M_H[:, -1].round().long()
            out = None
            for index, (head, h, dtype) in enumerate(heads):
                at = which_M == index
                if not bool(at.any()):
                    continue
                part = head(states_M_H[at, :h].to(dtype)).float()
                if out is None:
                    out = part.new_zeros(states_M_H.shape[0], part.shape[-1])
                out[at] = part
            return out

        return hidden, logits

    def _record(self, rollouts: Rollouts, parts: dict, scored: dict, routed: torch.Tensor) -> None:
        mask = rollouts.loss_mask
        total = max(float(mask.sum()), 1.0)
        metrics, positions = {}, {}
        for name, part in parts.items():
            tokens = float(part.loss_mask.sum())
            kl = teacher_kl(part.student_logprobs, scored[name].logprobs, part.loss_mask)
            metrics[f"teacher_kl/{name}"] = float(kl.sum()) / max(tokens, 1.0)
            metrics[f"tokens/{name}"] = tokens / total
            positions[name] = float(sum(row_lengths(part)[0]))
        for name in self.teachers.keys() - parts.keys():  # a starved teacher shows as 0, not as missing
            metrics[f"tokens/{name}"] = 0.0
        if not bool(routed.all()):
            metrics["tokens/none"] = float(mask[~routed].sum()) / total
        self._metrics = metrics
        if self.cost is not None and positions:
            self.cost = blended_cost([self._costs[n] for n in positions], list(positions.values()))


class RoutingSampler:
    """The teachers as samplers (each teacher's own accuracy, the ceiling): the prompts of one call
    are sampled by the teacher each names; prompts of a teacher that cannot sample, or of none, are
    left out. Rows come back grouped by teacher, each group laid out as one sampler's."""

    def __init__(self, samplers: dict[str, Sampler]):
        self.samplers = samplers
        self.tokenizer = next(iter(samplers.values())).tokenizer

    def sample(self, prompt_ids, samples_per_prompt=None, max_new_tokens=None, prompts=None, greedy=False,
               seed=None) -> Rollouts:
        if prompts is None:
            raise ValueError("RoutingSampler needs the prompts (each names its teacher)")
        parts = []
        for name, sampler in self.samplers.items():
            mine = [i for i, p in enumerate(prompts) if getattr(p, "teacher", None) == name]
            if mine:
                parts.append(sampler.sample([prompt_ids[i] for i in mine], samples_per_prompt, max_new_tokens,
                                            [prompts[i] for i in mine], greedy, seed))
        if not parts:  # e.g. an eval.tasks set that no teacher is routed to: nothing to measure
            return empty_rollouts(next(iter(self.samplers.values())))
        return concat_rollouts(parts, self.tokenizer.pad_token_id)

    def sync_weights(self) -> None:
        pass  # the teachers are fixed

    def close(self) -> None:
        for sampler in self.samplers.values():
            sampler.close()


def empty_rollouts(sampler) -> Rollouts:
    device = getattr(sampler, "device", "cpu")
    zeros = torch.zeros(0, 1, device=device)
    return Rollouts(tokens=zeros.long(), attention_mask=zeros.long(), completion_mask=zeros, behaviour_logprobs=zeros,
                    entropy=None, truncated=torch.zeros(0, dtype=torch.bool, device=device),
                    group_ids=torch.zeros(0, dtype=torch.long, device=device), prompt_width=0)


def concat_rollouts(parts: list[Rollouts], pad_id: int) -> Rollouts:
    """Sampled batches stacked as one: prompts left-padded to the widest, completions right-padded."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.prompt_width for p in parts)
    steps = max(p.tokens.shape[1] - p.prompt_width for p in parts)

    def padded(p: Rollouts, values: torch.Tensor | None, fill) -> torch.Tensor | None:
        if values is None:
            return None
        left, right = width - p.prompt_width, steps - (p.tokens.shape[1] - p.prompt_width)
        shape = (values.shape[0], left + values.shape[1] + right)
        out = torch.full(shape, fill, dtype=values.dtype, device=values.device)
        out[:, left:left + values.shape[1]] = values
        return out

    def cat(field: str, fill) -> torch.Tensor | None:
        values = [padded(p, getattr(p, field), fill) for p in parts]
        return None if any(v is None for v in values) else torch.cat(values)

    offsets = [0]
    for p in parts[:-1]:
        offsets.append(offsets[-1] + max(len(p.prompts), int(p.group_ids.max()) + 1))
    return Rollouts(tokens=cat("tokens", pad_id), attention_mask=cat("attention_mask", 0),
                    completion_mask=cat("completion_mask", 0.0), behaviour_logprobs=cat("behaviour_logprobs", 0.0),
                    entropy=cat("entropy", 0.0), truncated=torch.cat([p.truncated for p in parts]),
                    group_ids=torch.cat([p.group_ids + o for p, o in zip(parts, offsets)]), prompt_width=width,
                    prompts=[q for p in parts for q in p.prompts],
                    importance_weights=cat("importance_weights", 0.0),
                    loss_mask=cat("loss_mask", 0.0) if any(p.multi_turn for p in parts) else None,
                    env_rewards=None if any(p.env_rewards is None for p in parts) else
                    torch.cat([p.env_rewards for p in parts]),
                    recomputed_logprobs=cat("recomputed_logprobs", 0.0))
