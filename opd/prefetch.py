"""The student's batches for each step (distill, rl), sampled when the step starts or one step
ahead (train.max_staleness), and the correction of the log-probs a batch was sampled under
(sampling.recompute_logprobs)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from opd.components import Components
from opd.config import RunConfig
from opd.learner import distributed
from opd.rollouts import Rollouts


class StudentBatches:
    """The student's samples for each step (distill, rl).

    train.max_staleness=0: a step's batch is sampled when the step starts, from the current
    weights. 1 (one-step-off): while step n trains, batch n+1 is sampled in a background thread
    from the weights before step n's update, so sampling and training overlap; the learner then
    trains on it one update later, its importance ratio using the log-probs recorded by the
    policy that sampled it. A batch sampled ahead is part of the checkpoint, so resume is exact.
    """

    def __init__(self, cfg: RunConfig, components: Components, schedule):
        self.cfg, self.components, self.schedule = cfg, components, schedule
        self.ahead: tuple[int, Future | Rollouts] | None = None  # (step, its batch or the sampling of it)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="opd-sample") if cfg.train.max_staleness else None

    def _sample(self, step: int, seed: int | None = None) -> Rollouts:
        # this rank's share of the step's prompts (all of them on one process)
        prompts = distributed.share([self.components.data.train_prompts[i] for i in self.schedule.indices(step - 1)])
        return self.components.sampler.sample([p.ids for p in prompts], prompts=prompts, seed=seed)

    def take(self, step: int) -> tuple[Rollouts, int]:
        """Step `step`'s batch and its staleness (how many updates ago its policy was current)."""
        if self.ahead is not None and self.ahead[0] == step:
            self.wait()
            batch, self.ahead = self.ahead[1], None
            return batch, 1
        return self._sample(step), 0

    def sample_ahead(self, step: int) -> None:
        """With max_staleness=1, start sampling step `step`'s batch now, from the current weights."""
        if self.executor is None or step > self.cfg.train.steps:
            return
        seed = int(torch.randint(0, 2**62, ()).item())  # drawn here: the run's RNG decides the batch
        self.ahead = (step, self.executor.submit(self._sample, step, seed))

    def wait(self) -> None:
        """Finish the sampling in flight (before the sampler's weights change, or a checkpoint)."""
        if self.ahead is not None and isinstance(self.ahead[1], Future):
            self.ahead = (self.ahead[0], self.ahead[1].result())

    def state(self) -> dict | None:
        self.wait()
        return None if self.ahead is None else {"step": self.ahead[0], "batch": self.ahead[1].to("cpu")}

    def restore(self, state: dict | None) -> None:
        if state is not None:
            self.ahead = (state["step"], state["batch"].to(self.components.learner.device))

    def close(self) -> None:
        if self.executor is not None:
            try:
                self.wait()
            except Exception:  # the run is already ending on an error; a failed sample adds nothing
                pass
            self.executor.shutdown()


def recompute_behaviour(cfg: RunConfig, learner, batch: Rollouts) -> dict:
    """sampling.recompute_logprobs: the learner's own log-probs of the sampled tokens replace the
    engine's as the behaviour log-probs; with importance_cap each token is also weighted by
    min(pi_learner / pi_engine, cap) (truncated importance sampling), since the engine drew it."""
    engine = batch.behaviour_logprobs
    batch.behaviour_logprobs, batch.entropy = learner.policy_logprobs(batch)
    mask = batch.loss_mask
    tokens = max(float(mask.sum()), 1.0)
    metrics = {"logprob_mismatch": float(((batch.behaviour_logprobs - engine).abs() * mask).sum()) / tokens}
    if cfg.sampling.importance_cap is not None:
        batch.importance_weights = torch.exp(batch.behaviour_logprobs - engine).clamp(
            max=cfg.sampling.importance_cap) * mask
        metrics["importance_weight_mean"] = float(batch.importance_weights.sum()) / tokens
    return metrics
