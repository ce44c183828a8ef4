"""The training loop of opd, one step at a time:

    sample (student) -> score (teacher) -> advantages -> update (learner) -> eval / log / checkpoint

Run it with `opd distill --config run.yaml key=value ...`. Distillation and RL are the same loop:
only the advantage changes (a teacher KL term, a reward term, or both; see opd.advantages).
"""

from __future__ import annotations

import random
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from opd.advantages import compute_advantages, teacher_kl
from opd.config import ConfigError, RunConfig
from opd.data import Prompt, PromptSchedule, encode_prompts, read_records
from opd.learner.checkpoint import (latest_checkpoint, load_trainer_state, load_weights, rng_state,
                                    save_checkpoint, set_rng_state)
from opd.learner.learner import Learner
from opd.losses.chunked import token_divergence
from opd.models import load_model, pick_device
from opd.rollouts import Rollouts
from opd.run_dir import RunLog
from opd.sampler.hf import HFSampler
from opd.teacher.hf import HFTeacher
from opd.tokenizer_check import check_tokenizers_match


@dataclass
class Components:
    sampler: HFSampler
    teacher: HFTeacher
    learner: Learner
    tokenizer: object
    train_prompts: list[Prompt]
    eval_prompts: list[Prompt]
    skipped_prompts: int

    @property
    def same_output_size(self) -> bool:
        """Same tokenizer, but heads may be padded to different sizes (Qwen2.5 0.5B vs 7B): the
        sampled loss only reads the sampled token's log-prob, exact divergences need equal sizes."""
        return self.learner.head.head.weight.shape[0] == self.teacher.head.head.weight.shape[0]


def build(cfg: RunConfig, console: Console | None = None) -> Components:
    """Load both models, check that they share a tokenizer, read the prompts."""
    device = pick_device(cfg.train.device)
    student, tokenizer = load_model(cfg.student, device)
    teacher_model, teacher_tokenizer = load_model(cfg.teacher, device)
    check_tokenizers_match(tokenizer, teacher_tokenizer)

    train_prompts, eval_prompts, skipped = load_prompts(cfg, tokenizer)
    if console is not None and skipped:
        console.print(f"[yellow]skipped {skipped} prompts longer than data.max_prompt_tokens="
                      f"{cfg.data.max_prompt_tokens}[/yellow]")
    learner = Learner(student, cfg.optim, cfg.loss, cfg.train.steps, cfg.train.micro_batch_size)
    teacher = HFTeacher(teacher_model, teacher_tokenizer, cfg.loss.chunk_size, cfg.train.micro_batch_size)
    # Both splits must reproduce the models' own forward before we trust them with gradients.
    learner.head.verify(len(tokenizer))
    teacher.head.verify(len(tokenizer))
    sampler = HFSampler(student, tokenizer, cfg.sampling)  # shares the learner's weights: no sync needed
    components = Components(sampler, teacher, learner, tokenizer, train_prompts, eval_prompts, skipped)
    if learner.exact and not components.same_output_size:
        raise ConfigError(f"loss.kind={cfg.loss.kind} compares full distributions, but the student has "
                          f"{learner.head.head.weight.shape[0]} output logits and the teacher "
                          f"{teacher.head.head.weight.shape[0]} (padding rows differ); use "
                          f"loss.kind=sampled_reverse_kl for this pair")
    return components


def load_prompts(cfg: RunConfig, tokenizer) -> tuple[list[Prompt], list[Prompt], int]:
    if cfg.data.prompts is None:
        from opd.tiny import demo_prompts

        records = [(f"built-in[{i}]", {"messages": [{"role": "user", "content": text}]})
                   for i, text in enumerate(demo_prompts())]
    else:
        records = read_records(cfg.data.prompts)
    prompts, skipped = encode_prompts(records, tokenizer, cfg.data.max_prompt_tokens, cfg.data.overlong)
    if cfg.data.eval_prompts is not None:
        eval_prompts, eval_skipped = encode_prompts(read_records(cfg.data.eval_prompts), tokenizer,
                                                    cfg.data.max_prompt_tokens, cfg.data.overlong)
        return prompts, eval_prompts, skipped + eval_skipped
    # Hold out a seeded sample of the training prompts (at most a quarter of them) for evaluation.
    holdout = min(cfg.data.eval_holdout, len(prompts) // 4)
    order = np.random.default_rng(cfg.train.seed).permutation(len(prompts))
    eval_set = set(order[:holdout].tolist())
    train = [p for i, p in enumerate(prompts) if i not in eval_set]
    return train, [prompts[i] for i in sorted(eval_set)], skipped


# ----------------------------------------------------------------------------------------------
# Per-step measurements


def rollout_metrics(rollouts: Rollouts, teacher_logprobs: torch.Tensor) -> dict:
    mask = rollouts.completion_mask
    tokens = float(mask.sum())
    k = teacher_kl(rollouts.behaviour_logprobs, teacher_logprobs, mask)
    return {
        "teacher_kl": float(k.sum()) / max(tokens, 1.0),  # mean per-token reverse-KL estimate
        "entropy": float(rollouts.entropy.sum()) / max(tokens, 1.0),
        "completion_len": float(rollouts.completion_lengths.mean()),
        "truncated": float(rollouts.truncated.float().mean()),
        "tokens": int(tokens),
    }


@torch.no_grad()
def exact_reverse_kl(components: Components, rollouts: Rollouts, teacher_hidden: torch.Tensor,
                     chunk_size: int) -> float:
    """Full-vocabulary KL(student || teacher) averaged over the sampled completion positions."""
    head, total = components.learner.head, 0.0
    for rows, micro in rollouts.micro_batches(components.learner.micro_batch_size):
        _, states_M_H = head.completion_states(micro)
        kl = token_divergence("reverse_kl", head.logits, states_M_H, components.teacher.head.logits,
                              teacher_hidden[rows, :-1][micro.predicts_completion], chunk_size=chunk_size)
        total += float(kl.sum())
    return total / max(float(rollouts.completion_mask.sum()), 1.0)


def evaluate(components: Components, cfg: RunConfig) -> dict:
    """Teacher KL of fresh samples on the held-out prompts, drawn from their own seed so that an
    evaluation neither perturbs training nor varies between evaluations."""
    if not components.eval_prompts:
        return {}
    was_training = components.learner.model.training
    components.learner.model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.eval.seed)
        prompts = components.eval_prompts
        rollouts = components.sampler.sample([p.ids for p in prompts], cfg.eval.samples_per_prompt, prompts=prompts)
    scores = components.teacher.score(rollouts, keep_hidden=True)
    metrics = rollout_metrics(rollouts, scores.logprobs)
    if components.same_output_size:
        metrics["exact_kl"] = exact_reverse_kl(components, rollouts, scores.hidden, cfg.loss.chunk_size)
    components.learner.model.train(was_training)
    return {f"eval/{k}": v for k, v in metrics.items()}


def rollout_records(rollouts: Rollouts, teacher_logprobs: torch.Tensor, tokenizer, limit: int) -> list[dict]:
    """The first `limit` sampled completions with per-token student/teacher log-probs and KL."""
    records = []
    for i in range(min(limit, rollouts.batch_size)):
        keep = rollouts.completion_mask[i].bool()
        ids = rollouts.tokens[i][keep].tolist()
        student = rollouts.behaviour_logprobs[i][keep].tolist()
        teacher = teacher_logprobs[i][keep].tolist()
        group = int(rollouts.group_ids[i])
        records.append({
            "group": group,
            "prompt": rollouts.prompts[group].text if rollouts.prompts else None,
            "completion": tokenizer.decode(ids),
            "tokens": [tokenizer.decode([t]) for t in ids],
            "token_ids": ids,
            "student_logprobs": student,
            "teacher_logprobs": teacher,
            "teacher_kl": [s - t for s, t in zip(student, teacher)],
            "truncated": bool(rollouts.truncated[i]),
        })
    return records


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


def train(cfg: RunConfig, resume: bool = False, console: Console | None = None,
          stop_after: int | None = None) -> dict:
    """Run (or resume) a distillation run; returns the summary also written to summary.json.

    `stop_after` ends this invocation after that many steps, exactly as a Ctrl-C would
    (checkpoint, then exit): a later `resume=True` call continues the same run.
    """
    console = console or Console()
    seed_everything(cfg.train.seed)
    components = build(cfg, console)
    learner, sampler, teacher, tokenizer = components.learner, components.sampler, components.teacher, components.tokenizer
    run_dir = Path(cfg.run_dir)

    start_step, totals = 0, {"tokens_total": 0, "wall_s_total": 0.0}
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} to resume from")
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        changed = config_differences(state["config"], cfg.model_dump(mode="json"))
        if changed:
            console.print(f"[yellow]resuming with a config that differs from the checkpoint's in: {', '.join(changed)}"
                          f" (the continuation is then not the run the checkpoint started)[/yellow]")
        load_weights(learner.model, checkpoint / "model")
        learner.load_state_dict(state["learner"])
        set_rng_state(state["rng"])
        start_step, totals = state["step"], state["totals"]
        console.print(f"resuming from {checkpoint} (step {start_step})")
    log = RunLog(cfg, resume_step=start_step if checkpoint is not None else None)

    def save(step: int) -> Path:
        state = {"step": step, "learner": learner.state_dict(), "rng": rng_state(), "totals": totals,
                 "config": cfg.model_dump(mode="json")}
        return save_checkpoint(run_dir, step, learner.model, tokenizer, state, cfg.checkpoint.keep_last)

    schedule = PromptSchedule(len(components.train_prompts), cfg.train.prompts_per_step, cfg.train.seed)
    if start_step == 0:
        first_eval = last_eval = evaluate(components, cfg)
        if first_eval:
            log.log(0, first_eval)
    else:
        evals = log.logged_evals() or [{}]
        first_eval, last_eval = evals[0], evals[-1]
    last_metrics: dict = {}
    interrupted = False
    step = start_step

    progress = Progress(TextColumn("[bold]distill[/bold]"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console,
                        disable=not cfg.log.progress)
    with StopRequest(console).installed() as stop, progress:
        task = progress.add_task("distill", total=cfg.train.steps, completed=start_step, status="")
        for step in range(start_step + 1, cfg.train.steps + 1):
            prompts = [components.train_prompts[i] for i in schedule.indices(step - 1)]

            t0 = time.perf_counter()
            rollouts = sampler.sample([p.ids for p in prompts], prompts=prompts)
            t1 = time.perf_counter()
            scores = teacher.score(rollouts, keep_hidden=learner.exact)
            t2 = time.perf_counter()
            advantages = compute_advantages(rollouts.completion_mask, rollouts.behaviour_logprobs, scores.logprobs,
                                            kl_coef=cfg.loss.kl_coef, discount=cfg.loss.discount)
            train_metrics = learner.train_step(rollouts, advantages, scores.hidden, teacher.head)
            t3 = time.perf_counter()

            metrics = rollout_metrics(rollouts, scores.logprobs)
            metrics.update(train_metrics)
            totals["tokens_total"] += metrics["tokens"]
            totals["wall_s_total"] += t3 - t0
            metrics.update(sample_s=t1 - t0, score_s=t2 - t1, train_s=t3 - t2, **totals)

            if (cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.train.steps:
                last_eval = evaluate(components, cfg)
                metrics.update(last_eval)
            log.log(step, metrics)
            if cfg.log.rollouts_every and (step % cfg.log.rollouts_every == 0 or step == 1):
                log.write_rollouts(step, rollout_records(rollouts, scores.logprobs, tokenizer,
                                                         cfg.log.rollouts_per_step))
            last_metrics = metrics
            progress.update(task, completed=step,
                            status=f"teacher KL {metrics['teacher_kl']:.4f}  len {metrics['completion_len']:.1f}")

            stopping = stop.requested or (stop_after is not None and step - start_step >= stop_after)
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or stopping or step == cfg.train.steps:
                save(step)
            if stopping:
                interrupted = True
                break

    summary = {
        "run_dir": str(run_dir),
        "steps_done": step,
        "steps_planned": cfg.train.steps,
        "interrupted": interrupted,
        "skipped_prompts": components.skipped_prompts,
        "start_eval": first_eval or None,
        "last_eval": last_eval,
        "last_step": last_metrics,
        **totals,
    }
    log.write_summary(summary)
    log.close()
    return summary
