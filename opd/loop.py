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
sampler) stands in for an in-process one without this file changing. Beside the loop: the batches
sampled ahead (opd.prefetch), what stops a run resumably (opd.run_control: Ctrl-C, non-finite
steps, a teacher that fails), resuming (opd.resume), a step's result and the run's totals
(opd.step_result).
"""

from __future__ import annotations

import time
from contextlib import closing, nullcontext
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from opd.advantages import compute_advantages
from opd.collapse import CollapseWatch
from opd.components import Components, build
from opd.config import RunConfig
from opd.evaluation import (evaluate_sets, evaluate_teacher, grade_rollouts, reward_metrics, rewards_of,
                            rollout_metrics, rollout_records)
from opd.flops import sampling_flops, scoring_flops, training_flops
from opd.harness import HarnessDuringTraining
from opd.learner import distributed
from opd.learner.checkpoint import NonFiniteWeightsError, rng_state
from opd.models import pick_device
from opd.prefetch import StudentBatches, recompute_behaviour
from opd.preflight import check_before_loading
from opd.progress import stage_progress, status_line
from opd.resume import checkpoint_to_resume, restore_progress, seed_everything
from opd.roles import TeacherScores
from opd.rollouts import Rollouts, sequence_batch
from opd.run_control import NonFiniteTrainingError, NonFiniteWatch, StopRequest, resumable_error  # noqa: F401
from opd.run_dir import QuietLog, RunLock, RunLog
from opd.step_result import RunTotals, StepResult
from opd.teacher.errors import TeacherResponseError, TeacherUnavailableError


# ----------------------------------------------------------------------------------------------
# One step's pieces


def step_advantages(cfg: RunConfig, rollouts: Rollouts, scores: TeacherScores | None,
                    rewards: torch.Tensor | None) -> torch.Tensor:
    """The one advantage computation of every on-policy method: the teacher KL term when the
    teacher scored the batch, the group-centred reward when a grader did, or both."""
    return compute_advantages(rollouts.loss_mask, rollouts.student_logprobs,
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


# ----------------------------------------------------------------------------------------------
# The loop


def run_step(cfg: RunConfig, components: Components, step: int, batches: StudentBatches | None,
             score_with_teacher: bool) -> StepResult:
    """One optimizer step of any method: batch -> scores -> advantages -> update.

    On several processes (torchrun) each rank takes its share of the step's global batch; the
    metrics and counters are of the whole batch, the batch and scores kept are this rank's."""
    learner, sampler, teacher, tokenizer = components.learner, components.sampler, components.teacher, components.tokenizer
    flops = {"flops_sample": 0, "flops_score": 0, "flops_train": 0, "flops_teacher": 0, "flops_data": 0}
    # 1. the batch: the student's own samples (on-policy), or fixed sequences
    t0 = time.perf_counter()
    sampled = {}
    if cfg.on_policy:
        batch, sampled["staleness"] = batches.take(step)
        batches.sample_ahead(step)  # max_staleness > 0: overlaps with this step's scoring and training
        if cfg.sampling.recompute_logprobs:
            sampled.update(recompute_behaviour(cfg, learner, batch, sampled["staleness"]))
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
    tokens = metrics["tokens"]
    return StepResult(metrics, batch, scores, grades,
                      tokens_sampled=tokens if cfg.on_policy else 0, tokens_scored=tokens if scores is not None else 0,
                      tokens_trained=tokens, flops_student=metrics["flops_sample"] + metrics["flops_train"],
                      flops_teacher=metrics["flops_teacher"], flops_data=metrics["flops_data"],
                      wall_s=distributed.slowest(t3 - t0),  # the wall time: the slowest rank's
                      skipped=train_metrics["skipped"], grad_clipped=train_metrics["grad_clipped"])


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
        checkpoint, state = checkpoint_to_resume(run_dir, cfg.model_dump(mode="json"), console,
                                                 trust_checkpoint) if resume else (None, None)
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
    start_step, saved_totals = restore_progress(learner, checkpoint, state, console) if checkpoint else (0, None)
    totals = RunTotals(saved_totals)
    components.sampler.sync_weights()  # an engine (vLLM) samples from the learner's weights from the start
    log_class = RunLog if distributed.is_main() else QuietLog  # rank 0 writes the run directory
    log = log_class(cfg, resume_step=start_step if checkpoint is not None else None, restart=restart)

    def progress_state() -> dict:
        """What, besides the weights, decides the rest of the run: RNG, totals, a batch sampled ahead."""
        return {"rng": rng_state(), "totals": totals.as_dict(), "batch_ahead": batches.state() if batches else None}

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
        metrics = evaluate_sets(components, cfg) if step is None else harness(step, learner, tokenizer)
        totals.add_eval(time.perf_counter() - t)
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
            totals.add_eval(time.perf_counter() - t)
        if first_eval or benchmarks:
            log.log(0, {**first_eval, **benchmarks, **totals.as_dict()})
    last_metrics: dict = {}
    interrupted = False
    nonfinite = NonFiniteWatch(cfg.train.max_nonfinite_steps, run_dir)
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
                result = run_step(cfg, components, step, batches, score_with_teacher)
            except (TeacherUnavailableError, TeacherResponseError) as err:  # an outage, an invalid answer, a 4xx
                raise resumable_error(err, lambda: save(step - 1, before), run_dir, f"step {step} could not be "
                                      f"scored; saved checkpoint {{saved}} (step {step - 1})") from None
            totals.add(result)
            metrics = result.metrics
            nonfinite.count(metrics["skipped"])
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
            metrics.update(totals.as_dict())
            log.log(step, metrics)
            if cfg.on_policy and cfg.log.rollouts_every and (step % cfg.log.rollouts_every == 0 or step == 1):
                log.write_rollouts(step, rollout_records(result.batch, result.scores, tokenizer,
                                                         cfg.log.rollouts_per_step, result.grades))
            last_metrics = metrics
            progress.update(task, completed=step, status=status_line(metrics))

            if eval_error is not None:
                raise resumable_error(eval_error, lambda: save(step), run_dir,
                                      f"the evaluation after step {step} failed; saved checkpoint {{saved}}")
            nonfinite.check(step)
            stopping = stop.stopping(step, start_step, stop_after)
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
        **totals.as_dict(),
    }
    log.write_summary(summary)
    log.close()
    return summary
