"""The training loop of opd, one step at a time:

    batch (student samples, or fixed sequences) -> score (teacher, grader) -> advantages
        -> update (learner) -> eval / log / checkpoint

One loop serves every method (`opd distill | rl | sft | midtrain --config run.yaml key=value ...`):
* distill: the student samples, the teacher scores every token, advantage -c * k_t;
* rl: the student samples, a grader rewards each sample, advantage r - mean_group(r) (+ the
  teacher KL term when a teacher is given, "RL + teacher KL"); same advantage function;
* sft / midtrain: the batch is fixed token sequences (completions, documents) and the learner
  takes the cross-entropy step; nothing is sampled or scored.
Every step counts tokens, FLOPs (opd.flops) and wall time per phase, cumulatively.

The roles are built by `opd.components` and reached only through their contracts (`opd.roles`):
`sampler.sample` / `sync_weights`, `teacher.score`, `learner.train_step`, so a served teacher (or
sampler) stands in for an in-process one without this file changing. What can stop a run keeps
it resumable: a teacher server that stays down (a checkpoint of the last finished step, then an
error), non-finite steps (skipped; too many in a row stop the run), Ctrl-C (a checkpoint, exit 130
from the CLI).
"""

from __future__ import annotations

import random
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from opd.advantages import compute_advantages
from opd.collapse import CollapseWatch
from opd.components import Components, build
from opd.config import ConfigError, RunConfig
from opd.evaluation import (evaluate_prompts, grade_rollouts, reward_metrics, rewards_of, rollout_metrics,
                            rollout_records, teacher_ceiling)
from opd.flops import sampling_flops, scoring_flops, training_flops
from opd.harness import HarnessDuringTraining
from opd.learner import distributed
from opd.learner.checkpoint import NonFiniteWeightsError, latest_checkpoint, load_trainer_state, rng_state, set_rng_state
from opd.models import pick_device
from opd.preflight import check_before_loading
from opd.progress import stage_progress
from opd.roles import TeacherScores
from opd.rollouts import Rollouts, sequence_batch
from opd.run_dir import QuietLog, RunLock, RunLog
from opd.teacher.errors import TeacherResponseError, TeacherUnavailableError, what_to_do


# ----------------------------------------------------------------------------------------------
# One step's pieces


def step_advantages(cfg: RunConfig, rollouts: Rollouts, scores: TeacherScores | None,
                    rewards: torch.Tensor | None) -> torch.Tensor:
    """The one advantage computation of every on-policy method: the teacher KL term when the
    teacher scored the batch, the group-centred reward when a grader did, or both."""
    return compute_advantages(rollouts.loss_mask, rollouts.behaviour_logprobs,
                              scores.logprobs if scores is not None else None,
                              kl_coef=cfg.loss.kl_coef, discount=cfg.loss.discount,
                              rewards=rewards, group_ids=rollouts.group_ids, divide_by_std=cfg.rl.divide_by_std,
                              chunks=scores.chunks if scores is not None else None)


def teacher_scores_training(cfg: RunConfig, components: Components) -> bool:
    """Distillation always asks the teacher; RL only when its KL term counts (c > 0): plain RL
    does not pay for a teacher."""
    if not cfg.on_policy or components.teacher is None:
        return False
    return cfg.method == "distill" or cfg.loss.kl_coef > 0


def evaluate(components: Components, cfg: RunConfig) -> dict:
    """Every eval set: the run's own (metrics eval/...) and each of eval.tasks (eval/<task>/...)."""
    out = {}
    for name, prompts in components.data.eval_sets.items():
        metrics, _ = evaluate_prompts(prompts, components.sampler, cfg.eval,
                                      cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens, components.teacher,
                                      cfg.data.grader, components.learner)
        prefix = f"eval/{name}/" if name else "eval/"
        out.update({prefix + k: v for k, v in metrics.items()})
    return out


def evaluate_teacher(components: Components, cfg: RunConfig) -> dict:
    """The teacher's own accuracy on every eval set (eval/teacher_accuracy, eval/<task>/teacher_...),
    once at step 0: the ceiling the student's curves are read against. {} without an in-process teacher."""
    if components.teacher_sampler is None or not cfg.eval.teacher_accuracy:
        return {}
    out = {}
    for name, prompts in components.data.eval_sets.items():
        metrics = teacher_ceiling(prompts, components.teacher_sampler, cfg.eval,
                                  cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens, cfg.data.grader)
        prefix = f"eval/{name}/" if name else "eval/"
        out.update({prefix + k: v for k, v in metrics.items()})
    return out


# ----------------------------------------------------------------------------------------------
# Ctrl-C: finish the step, save a checkpoint, exit cleanly


class StopRequest:
    """The first Ctrl-C asks the loop to stop after the current step (and save); a second one
    interrupts at once, without saving."""

    def __init__(self, console: Console):
        self.requested = False
        self.console = console

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.console.print("[yellow]interrupt: finishing this step, then saving a checkpoint "
                           "(Ctrl-C again to quit without saving)[/yellow]")

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------------------------
# The loop


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dumps."""
    keys = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(prefix + key)
    return keys


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Settings a checkpoint cannot continue under: the weights it holds are of this student, trained by
# this method. Everything else may change on --resume and takes effect from the resumed step.
FIXED_ON_RESUME = ("method", "student.", "train.strategy")


def check_resumable(old: dict, new: dict, console: Console) -> None:
    changed = config_differences(old, new)
    fixed = [key for key in changed if any(key == f or key.startswith(f) for f in FIXED_ON_RESUME)]
    if fixed:
        raise ConfigError(f"--resume: {', '.join(fixed)} cannot change on resume (the checkpoint holds that "
                          f"model, trained by that method); start a new run_dir instead")
    if changed:
        console.print(f"[yellow]resuming with a config that differs from the checkpoint's in: {', '.join(changed)}"
                      f" (in effect from the resumed step on; config.yaml records them)[/yellow]")


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


class NonFiniteTrainingError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient."""


TOTALS = ("tokens_sampled_total", "tokens_scored_total", "tokens_trained_total",
          "flops_student_total", "flops_teacher_total", "flops_total", "flops_data_total", "flops_total_with_data",
          "sample_s_total", "score_s_total", "train_s_total", "eval_s_total", "wall_s_total",
          "nonfinite_steps", "grad_clipped_steps")


def run_step(cfg: RunConfig, components: Components, step: int, batches: StudentBatches | None,
             totals: dict, score_with_teacher: bool) -> tuple[dict, Rollouts, TeacherScores | None, list]:
    """One optimizer step of any method: batch -> scores -> advantages -> update. Returns its
    metrics (totals are updated in place), the batch, the teacher's scores and the grades.

    On several processes (torchrun) each rank takes its share of the step's global batch; the
    metrics and totals are of the whole batch, the batch and scores returned are this rank's."""
    learner, sampler, teacher, tokenizer = components.learner, components.sampler, components.teacher, components.tokenizer
    flops = {"flops_sample": 0, "flops_score": 0, "flops_train": 0, "flops_teacher": 0, "flops_data": 0}
    # 1. the batch: the student's own samples (on-policy), or fixed sequences
    t0 = time.perf_counter()
    sampled = {}
    if cfg.on_policy:
        batch, sampled["staleness"] = batches.take(step)
        batches.sample_ahead(step + 1)  # max_staleness=1: overlaps with this step's scoring and training
        if cfg.sampling.recompute_logprobs:
            sampled.update(recompute_behaviour(cfg, learner, batch))
        flops["flops_sample"] = sampling_flops(learner.cost, batch)
    else:
        sequences, targets_from, data_flops = components.data.batches.batch(step - 1)
        sequences, targets_from = distributed.share(sequences), distributed.share(targets_from)
        flops["flops_data"] = data_flops / distributed.world_size()  # summed over ranks below
        batch = sequence_batch(sequences, targets_from, tokenizer.pad_token_id, learner.device)

    # 2. scores: the teacher's log-prob of every sampled token, the grader's reward
    t1 = time.perf_counter()
    scores = teacher.score(batch, keep_hidden=learner.exact) if score_with_teacher else None
    if scores is not None:
        if teacher.cost is not None:  # a served teacher whose config we do not have is not counted
            flops["flops_teacher"] = scoring_flops(teacher.cost, batch)
    grades = grade_rollouts(batch, tokenizer, cfg.data.grader) if cfg.on_policy else []
    rewards = rewards_of(grades).to(learner.device) if cfg.method == "rl" else None

    # 3. the update, then the sampler follows the new weights
    t2 = time.perf_counter()
    advantages = step_advantages(cfg, batch, scores, rewards) if learner.objective == "policy_gradient" else None
    train_metrics = learner.train_step(batch, advantages, scores)
    if batches is not None:
        batches.wait()  # the batch sampled ahead came from the weights before this update
    t_sync = time.perf_counter()
    sampler.sync_weights()
    sync_s = time.perf_counter() - t_sync
    flops["flops_train"] = training_flops(learner.cost, batch)
    if learner.exact:  # the teacher's head is applied again, over the whole vocabulary, in the loss
        flops["flops_teacher"] += teacher.cost.forward(0, int(batch.loss_mask.sum()))
    t3 = time.perf_counter()

    metrics = rollout_metrics(batch, scores.logprobs if scores is not None else None) if cfg.on_policy else \
        {"tokens": int(batch.loss_mask.sum()),
         "padding": 1.0 - float(batch.attention_mask.sum()) / batch.attention_mask.numel()}
    metrics.update(reward_metrics(grades, batch.group_ids) if grades else {})
    metrics.update(train_metrics)
    metrics.update(sampled)  # the engine's log-prob mismatch, when recomputed, replaces the learner's view
    metrics.update(teacher.take_metrics() if teacher is not None else {})
    metrics.update(flops, sample_s=t1 - t0, score_s=t2 - t1, train_s=t3 - t2, sync_s=sync_s)
    metrics = distributed.combine_metrics(metrics)  # of the global batch (one process: unchanged)
    flops = {key: metrics[key] for key in flops}
    if cfg.on_policy:
        totals["tokens_sampled_total"] += metrics["tokens"]
    if scores is not None:
        totals["tokens_scored_total"] += metrics["tokens"]
    totals["tokens_trained_total"] += metrics["tokens"]
    totals["flops_student_total"] += flops["flops_sample"] + flops["flops_train"]
    totals["flops_teacher_total"] += flops["flops_teacher"]
    totals["flops_total"] = totals["flops_student_total"] + totals["flops_teacher_total"]
    totals["flops_data_total"] += flops["flops_data"]
    totals["flops_total_with_data"] = totals["flops_total"] + totals["flops_data_total"]
    for phase in ("sample", "score", "train"):  # summed over ranks, like FLOPs
        totals[f"{phase}_s_total"] += metrics[f"{phase}_s"]
    totals["wall_s_total"] += distributed.slowest(t3 - t0)  # the wall time: the slowest rank's
    totals["nonfinite_steps"] += train_metrics["skipped"]
    totals["grad_clipped_steps"] += train_metrics["grad_clipped"]
    return metrics, batch, scores, grades


def train(cfg: RunConfig, resume: bool = False, console: Console | None = None,
          stop_after: int | None = None, trust_checkpoint: bool = False) -> dict:
    """Run (or resume) a run of any method; returns the summary also written to summary.json.

    `stop_after` ends this invocation after that many steps, exactly as a Ctrl-C would
    (checkpoint, then exit): a later `resume=True` call continues the same run. `trust_checkpoint`:
    an older opd's pickled trainer state may be read (loading a pickle can run code).
    """
    console = console or Console()
    run_dir = Path(cfg.run_dir)
    # Under torchrun: join the other processes; rank 0 alone holds the run directory and prints.
    distributed.init(pick_device(cfg.train.device))
    if not distributed.is_main():
        console = Console(quiet=True)
    lock = RunLock(run_dir) if distributed.is_main() else nullcontext()
    with lock:  # a second process on this run_dir is refused, naming this one
        check_before_loading(cfg, resume)  # a missing file, a used run_dir: refused before any model loads
        checkpoint = latest_checkpoint(run_dir) if resume else None
        if resume and checkpoint is None:
            console.print(f"[yellow]--resume: no checkpoint in {run_dir / 'checkpoints'} yet; starting the run "
                          f"from step 0[/yellow]")
        state = load_trainer_state(checkpoint, trust_checkpoint) if checkpoint is not None else None
        if state is not None:
            check_resumable(state["config"], cfg.model_dump(mode="json"), console)
        seed_everything(cfg.train.seed)
        components = build(cfg, console)
        if distributed.active():  # every rank built the same weights; each samples its own stream
            seed_everything(cfg.train.seed + 1000 * distributed.rank())
        try:
            return _train(cfg, components, checkpoint, state, restart=resume and checkpoint is None,
                          console=console, stop_after=stop_after)
        finally:
            components.close()
            distributed.shutdown(components.learner)


def _train(cfg: RunConfig, components: Components, checkpoint: Path | None, state: dict | None, restart: bool,
           console: Console, stop_after: int | None) -> dict:
    learner, tokenizer, data = components.learner, components.tokenizer, components.data
    run_dir = Path(cfg.run_dir)
    start_step, totals = 0, dict.fromkeys(TOTALS, 0)
    if checkpoint is not None:
        rng = distributed.rng_of(state)  # this rank's; a checkpoint of another number of processes is refused
        learner.load_weights(checkpoint / "model")
        learner.load_state_dict(state["learner"])
        set_rng_state(rng)
        start_step, totals = state["step"], {**totals, **state["totals"]}
        console.print(f"resuming from {checkpoint} (step {start_step})")
    components.sampler.sync_weights()  # an engine (vLLM) samples from the learner's weights from the start
    log_class = RunLog if distributed.is_main() else QuietLog  # rank 0 writes the run directory
    log = log_class(cfg, resume_step=start_step if checkpoint is not None else None, restart=restart)

    def progress_state() -> dict:
        """What, besides the weights, decides the rest of the run: RNG, totals, a batch sampled ahead."""
        return {"rng": rng_state(), "totals": dict(totals), "batch_ahead": batches.state() if batches else None}

    def save(step: int, progress_of_step: dict | None = None) -> Path | None:
        """A checkpoint after `step` (with the RNG, totals and batch of `progress_of_step` when the
        current state is a step further); never from non-finite weights (the last good one stays `latest`)."""
        state = {"step": step, "learner": learner.state_dict(), **(progress_of_step or progress_state()),
                 "config": cfg.model_dump(mode="json")}
        try:
            # every rank takes part (FSDP2 gathers the weights); rank 0 writes
            return distributed.save_checkpoint(run_dir, step, learner, tokenizer, state, cfg.checkpoint.keep_last)
        except NonFiniteWeightsError as err:
            console.print(f"[red]{escape(str(err))}[/red]")
            return None

    def timed_evaluate(step: int | None = None) -> dict:
        """The eval sets (`step` None), or the harness's tasks when eval.lm_eval has them due after `step`."""
        t = time.perf_counter()
        metrics = evaluate(components, cfg) if step is None else harness(step, learner, tokenizer)
        totals["eval_s_total"] += time.perf_counter() - t
        return metrics

    harness = HarnessDuringTraining(cfg)

    batches = StudentBatches(cfg, components, data.prompt_schedule(cfg.train.prompts_per_step,
                                                                   cfg.train.seed)) if cfg.on_policy else None
    if batches is not None and state is not None:
        batches.restore(state.get("batch_ahead"))
    evals = log.logged_evals() if checkpoint is not None else []
    if evals:
        first_eval, last_eval = evals[0], evals[-1]
        last_eval_step = last_eval.pop("step")
        first_eval.pop("step", None)
    else:
        first_eval = last_eval = timed_evaluate()
        last_eval_step = 0
        benchmarks = timed_evaluate(step=0)
        if first_eval:
            t = time.perf_counter()
            first_eval = {**first_eval, **evaluate_teacher(components, cfg)}  # the ceiling: step 0 only
            totals["eval_s_total"] += time.perf_counter() - t
        if first_eval or benchmarks:
            log.log(0, {**first_eval, **benchmarks, **totals})
    last_metrics: dict = {}
    interrupted = False
    nonfinite_in_a_row = 0
    step = start_step
    score_with_teacher = teacher_scores_training(cfg, components)
    collapse = CollapseWatch(cfg.method)  # warns (once each) of truncation rising, RL groups all equal

    # a bar on a terminal; off one (make, CI logs), a line at a steady interval
    progress = stage_progress(cfg.method, console, disable=not cfg.log.progress or not distributed.is_main())
    with StopRequest(console).installed() as stop, progress, closing(batches) if batches else nullcontext():
        task = progress.add_task(cfg.method, total=cfg.train.steps, completed=start_step, status="")
        for step in range(start_step + 1, cfg.train.steps + 1):
            # What a checkpoint of the previous step holds, in case this step cannot finish (the
            # teacher server fails): resuming from it then replays this step exactly.
            before = progress_state()
            try:
                metrics, batch, scores, grades = run_step(cfg, components, step, batches, totals, score_with_teacher)
            except (TeacherUnavailableError, TeacherResponseError) as err:  # any teacher failure: an outage,
                # an invalid answer, a refusal (4xx). Several processes: only this rank may have failed, so no
                # save can be agreed on; the last checkpoint stays (torchrun ends the other ranks).
                saved = save(step - 1, before) if not distributed.active() else latest_checkpoint(run_dir)
                raise type(err)(f"{err}\nstep {step} could not be scored; saved checkpoint {saved} (step {step - 1}): "
                                f"{what_to_do(err)}, then run again with --resume") from None
            nonfinite_in_a_row = nonfinite_in_a_row + 1 if metrics["skipped"] else 0
            for warning in collapse.check(step, metrics):
                console.print(f"[yellow]{escape(warning)}[/yellow]")

            eval_error = None
            if (cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.train.steps:
                try:
                    last_eval, last_eval_step = timed_evaluate(), step
                    metrics.update(last_eval)
                except (TeacherUnavailableError, TeacherResponseError) as err:  # the step is done: log, save, stop
                    eval_error = err
            metrics.update(timed_evaluate(step))
            metrics.update(totals)
            log.log(step, metrics)
            if cfg.on_policy and cfg.log.rollouts_every and (step % cfg.log.rollouts_every == 0 or step == 1):
                log.write_rollouts(step, rollout_records(batch, scores, tokenizer, cfg.log.rollouts_per_step, grades))
            last_metrics = metrics
            progress.update(task, completed=step, status=status_line(metrics))

            if eval_error is not None:
                saved = save(step) if not distributed.active() else latest_checkpoint(run_dir)
                raise type(eval_error)(f"{eval_error}\nthe evaluation after step {step} failed; saved checkpoint "
                                       f"{saved}: {what_to_do(eval_error)}, then run again with --resume")
            if nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                raise NonFiniteTrainingError(
                    f"step {step}: the loss or gradient was not finite for {nonfinite_in_a_row} steps in a row "
                    f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); those updates were skipped. The "
                    f"last good checkpoint is {latest_checkpoint(run_dir)}: lower optim.lr and run again with --resume")
            # Ctrl-C on any rank stops every rank after this step
            stopping = distributed.any_rank(stop.requested) or (stop_after is not None and step - start_step >= stop_after)
            wanted = (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or stopping or step == cfg.train.steps
            if wanted and not metrics["skipped"]:
                save(step)
            if stopping:
                interrupted = True
                break

    summary = {
        "run_dir": str(run_dir),
        "method": cfg.method,
        "steps_done": step,
        "steps_planned": cfg.train.steps,
        "interrupted": interrupted,
        "skipped": data.skipped,
        "start_eval": first_eval or None,
        "last_eval": last_eval,
        "last_eval_step": last_eval_step,  # the step of last_eval: steps_done unless interrupted
        "last_step": last_metrics,
        **totals,
    }
    log.write_summary(summary)
    log.close()
    return summary


def status_line(metrics: dict) -> str:
    """The progress bar's figures: of this step's training batch (held-out ones are in the tables)."""
    parts = []
    if "teacher_kl" in metrics:
        parts.append(f"teacher KL {metrics['teacher_kl']:.4f}")
    if "accuracy" in metrics:
        parts.append(f"train-batch accuracy {metrics['accuracy']:.3f}")
    if "cross_entropy" in metrics:
        parts.append(f"loss {metrics['cross_entropy']:.4f}")
    if "completion_len" in metrics:
        parts.append(f"len {metrics['completion_len']:.1f}")
    return "  ".join(parts)
