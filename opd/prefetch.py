"""The student's batches for each step (distill, rl), sampled when the step starts or up to k steps
ahead (train.max_staleness=k), and the learner's correction of the log-probs a batch was sampled
under (sampling.recompute_logprobs)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from opd.components import Components
from opd.config import RunConfig
from opd.learner import distributed
from opd.rollouts import Rollouts


@dataclass
class Ahead:
    """A batch sampled ahead for `step`, by the policy after `version` updates."""
    step: int
    version: int
    batch: Future | Rollouts  # the sampling in flight, or its batch


class StudentBatches:
    """The student's samples for each step.

    train.max_staleness=0: a step's batch is sampled when the step starts, from the current
    weights. k > 0: while step n trains, the batches of steps n+1..n+k not sampled yet are sampled
    in a background thread (in step order) from the weights before step n's update, so sampling
    and training overlap; a batch is trained on up to k updates later (staleness: the updates
    between its policy and the learner's), its importance ratio using the log-probs recorded by
    the policy that sampled it. The sampling in flight ends before the sampler's weights change,
    so every batch comes from one policy. The batches sampled ahead are part of the checkpoint,
    so resume is exact.
    """

    def __init__(self, cfg: RunConfig, components: Components, schedule):
        self.cfg, self.components, self.schedule = cfg, components, schedule
        self.ahead: list[Ahead] = []  # in step order, at most max_staleness
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="opd-sample") if cfg.train.max_staleness else None

    def _sample(self, step: int, seed: int | None = None) -> Rollouts:
        # this rank's share of the step's prompts (all of them on one process)
        prompts = distributed.share([self.components.data.train_prompts[i] for i in self.schedule.indices(step - 1)])
        return self.components.sampler.sample([p.ids for p in prompts], prompts=prompts, seed=seed)

    def take(self, step: int) -> tuple[Rollouts, int]:
        """Step `step`'s batch and its staleness (how many updates ago its policy was current)."""
        entry = next((a for a in self.ahead if a.step == step), None)
        if entry is None:
            return self._sample(step), 0
        self.wait()
        self.ahead.remove(entry)
        return entry.batch, (step - 1) - entry.version

    def sample_ahead(self, step: int) -> None:
        """While step `step` trains (before its update), start sampling the batches of the next
        max_staleness steps that are not sampled yet, from the current weights."""
        if self.executor is None:
            return
        queued = {a.step for a in self.ahead}
        for later in range(step + 1, min(step + self.cfg.train.max_staleness, self.cfg.train.steps) + 1):
            if later not in queued:
                seed = int(torch.randint(0, 2**62, ()).item())  # drawn here: the run's RNG decides the batch
                self.ahead.append(Ahead(later, step - 1, self.executor.submit(self._sample, later, seed)))

    def wait(self) -> None:
        """Finish the sampling in flight (before the sampler's weights change, or a checkpoint)."""
        for entry in self.ahead:
            if isinstance(entry.batch, Future):
                entry.batch = entry.batch.result()

    def state(self) -> dict | None:
        self.wait()
        if not self.ahead:
            return None
        return {"queue": [{"step": a.step, "version": a.version, "batch": a.batch.to("cpu")} for a in self.ahead]}

    def restore(self, state: dict | None) -> None:
        if state is None:
            return
        # an opd before the queue saved one batch, sampled one update before the step it is for
        queue = state["queue"] if "queue" in state else [{**state, "version": state["step"] - 2}]
        device = self.components.learner.device
        self.ahead = [Ahead(int(e["step"]), int(e["version"]), e["batch"].to(device)) for e in queue]

    def close(self) -> None:
        if self.executor is not None:
            try:
                self.wait()
            except Exception:  # the run is already ending on an error; a failed sample adds nothing
                pass
            self.executor.shutdown()


def recompute_behaviour(cfg: RunConfig, learner, batch: Rollouts, staleness: int = 0) -> dict:
    """sampling.recompute_logprobs: the learner's own log-probs of the sampled tokens, under its
    current weights, become the student's side of the teacher-KL term. On a fresh batch
    (staleness 0) they also replace the engine's as the behaviour log-probs (the engine's differ
    by numerics, not by policy); a stale batch keeps the engine's, so the importance ratio still
    corrects for the staleness. With importance_cap the behaviour log-probs are the learner's and
    each token is weighted by min(pi_learner / pi_engine, cap) (truncated importance sampling),
    since the engine drew it, possibly from an older policy."""
    engine = batch.behaviour_logprobs
    batch.recomputed_logprobs, batch.entropy = learner.policy_logprobs(batch)
    if staleness == 0 or cfg.sampling.importance_cap is not None:
        batch.behaviour_logprobs = batch.recomputed_logprobs
    mask = batch.loss_mask
    tokens = max(float(mask.sum()), 1.0)
    metrics = {"logprob_mismatch": float(((batch.recomputed_logprobs - engine).abs() * mask).sum()) / tokens}
    if cfg.sampling.importance_cap is not None:
        batch.importance_weights = torch.exp(batch.recomputed_logprobs - engine).clamp(
            max=cfg.sampling.importance_cap) * mask
        metrics["importance_weight_mean"] = float(batch.importance_weights.sum()) / tokens
    return metrics
