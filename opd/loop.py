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
"""

from __future__ import annotations

import random
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from opd.advantages import compute_advantages
from opd.config import ConfigError, RunConfig
from opd.data import (Prompt, PromptDataError, PromptSchedule, SequenceBatches, SequencePool, encode_examples,
                      encode_prompts, pack_documents, read_documents, read_records)
from opd.evaluation import evaluate_prompts, grade_rollouts, reward_metrics, rewards_of, rollout_metrics
from opd.flops import ModelCost, sampling_flops, scoring_flops, training_flops
from opd.learner.checkpoint import (latest_checkpoint, load_trainer_state, load_weights, rng_state,
                                    save_checkpoint, set_rng_state)
from opd.learner.learner import Learner
from opd.models import load_model, pick_device
from opd.rollouts import Rollouts, sequence_batch
from opd.run_dir import RunLog
from opd.sampler.hf import HFSampler
from opd.tasks import documents as task_documents, is_graded, make_records
from opd.teacher.hf import HFTeacher, TeacherScores
from opd.tokenizer_check import check_tokenizers_match


@dataclass
class RunData:
    """What a run trains and evaluates on."""

    train_prompts: list[Prompt] = field(default_factory=list)  # distill / rl: prompts the student samples from
    batches: SequenceBatches | None = None  # sft / midtrain: fixed sequences
    eval_sets: dict[str, list[Prompt]] = field(default_factory=dict)  # "": the run's own; else eval.tasks
    skipped: int = 0  # prompts or examples skipped for length


@dataclass
class Components:
    learner: Learner
    sampler: HFSampler  # the student's sampler (shares the learner's weights: no sync needed)
    teacher: HFTeacher | None
    tokenizer: object
    data: RunData
    student_cost: ModelCost
    teacher_cost: ModelCost | None

    @property
    def same_output_size(self) -> bool:
        """Same tokenizer, but heads may be padded to different sizes (Qwen2.5 0.5B vs 7B): the
        sampled loss only reads the sampled token's log-prob, exact divergences need equal sizes."""
        return (self.teacher is not None
                and self.learner.head.head.weight.shape[0] == self.teacher.head.head.weight.shape[0])


def objective_of(cfg: RunConfig) -> str:
    if not cfg.on_policy:
        return "cross_entropy"
    return "policy_gradient" if cfg.loss.kind == "sampled_reverse_kl" else "divergence"


def build(cfg: RunConfig, console: Console | None = None) -> Components:
    """Load the models, check that they share a tokenizer, read or generate the data."""
    device = pick_device(cfg.train.device)
    student, tokenizer = load_model(cfg.student, device)
    learner = Learner(student, cfg.optim, cfg.loss, cfg.train.steps, cfg.train.micro_batch_size, objective_of(cfg))
    # The chunked split must reproduce the model's own forward before we trust it with gradients.
    learner.head.verify(len(tokenizer))
    teacher = None
    if cfg.teacher is not None:
        teacher_model, teacher_tokenizer = load_model(cfg.teacher, device)
        check_tokenizers_match(tokenizer, teacher_tokenizer)
        teacher = HFTeacher(teacher_model, teacher_tokenizer, cfg.loss.chunk_size, cfg.train.micro_batch_size)
        teacher.head.verify(len(tokenizer))
    data = load_data(cfg, tokenizer)
    if console is not None and data.skipped:
        console.print(f"[yellow]skipped {data.skipped} prompts or examples that do not fit data.max_prompt_tokens="
                      f"{cfg.data.max_prompt_tokens} / data.max_seq_tokens={cfg.data.max_seq_tokens}[/yellow]")
    components = Components(learner, HFSampler(student, tokenizer, cfg.sampling), teacher, tokenizer, data,
                            ModelCost.from_model(student),
                            ModelCost.from_model(teacher.model) if teacher is not None else None)
    if learner.exact and not components.same_output_size:
        raise ConfigError(f"loss.kind={cfg.loss.kind} compares full distributions, but the student has "
                          f"{learner.head.head.weight.shape[0]} output logits and the teacher "
                          f"{teacher.head.head.weight.shape[0]} (padding rows differ); use "
                          f"loss.kind=sampled_reverse_kl for this pair")
    if cfg.method == "rl":
        ungraded = [p for p in data.train_prompts if not is_graded(p.record, cfg.data.grader)]
        if ungraded:
            raise ConfigError(f"method=rl needs a reward for every prompt, and {len(ungraded)} of "
                              f"{len(data.train_prompts)} have no grader (e.g. {ungraded[0].text[:60]!r}): set "
                              f"task.name, data.grader, or a `grader` field in each record")
    return components


# ----------------------------------------------------------------------------------------------
# Data: prompts (distill, rl), fixed sequences (sft, midtrain), evaluation prompts


def task_records(cfg: RunConfig, split: str, name: str | None = None) -> list[tuple[str, dict]]:
    task = cfg.task if name is None else cfg.task.model_copy(update={"name": name})
    return [(f"task {task.name} ({split}) #{i}", r) for i, r in enumerate(make_records(task, split))]


def holdout(items: list, count: int, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded sample of at most a quarter of `items` is held out."""
    count = min(count, len(items) // 4)
    held = set(np.random.default_rng(seed).permutation(len(items))[:count].tolist())
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def prompt_records(cfg: RunConfig, split: str = "train") -> list[tuple[str, dict]]:
    """The prompts to sample from: data.prompts (or data.eval_prompts for split=eval), else the
    task's generated prompts, else the built-in demo prompts."""
    path = cfg.data.prompts if split == "train" else cfg.data.eval_prompts
    if path is not None:
        return read_records(path)
    if cfg.task.name != "none":
        return task_records(cfg, split)
    if split != "train":
        raise ConfigError("no eval prompts: set data.eval_prompts or task.name")
    from opd.tiny import demo_prompts

    return [(f"built-in[{i}]", {"messages": [{"role": "user", "content": text}]})
            for i, text in enumerate(demo_prompts())]


def load_data(cfg: RunConfig, tokenizer) -> RunData:
    data = RunData()

    def prompts_of(records):
        prompts, skipped = encode_prompts(records, tokenizer, cfg.data.max_prompt_tokens, cfg.data.overlong)
        data.skipped += skipped
        return prompts

    def examples_of(records):
        examples, skipped = encode_examples(records, tokenizer, cfg.data.max_seq_tokens)
        data.skipped += skipped
        return examples

    # The run's own eval prompts: a file or the task's eval split; without either, held out below.
    has_eval_source = cfg.data.eval_prompts is not None or cfg.task.name != "none"
    eval_prompts = prompts_of(prompt_records(cfg, "eval")) if has_eval_source else None
    per_step, seed = cfg.train.prompts_per_step, cfg.train.seed

    if cfg.on_policy:
        data.train_prompts = prompts_of(prompt_records(cfg, "train"))
        if eval_prompts is None:
            data.train_prompts, eval_prompts = holdout(data.train_prompts, cfg.data.eval_holdout, seed)
    elif cfg.method == "sft":
        if cfg.data.completions is not None:
            records = read_records(cfg.data.completions)
        elif cfg.task.name != "none":
            records = task_records(cfg, "train")
        else:
            raise ConfigError("method=sft needs examples: data.completions (a file, e.g. from `opd sample`) or "
                              "task.name (the task's reference solutions)")
        examples = examples_of(records)
        if eval_prompts is None:
            examples, held = holdout(examples, cfg.data.eval_holdout, seed)
            eval_prompts = [Prompt(e.prompt_ids, tokenizer.decode(e.prompt_ids), e.record) for e in held]
        data.batches = SequenceBatches([SequencePool.of_examples(examples, per_step)], seed)
    else:  # midtrain
        if cfg.data.documents is not None:
            texts = read_documents(cfg.data.documents)
        else:
            try:
                texts = task_documents(cfg.task)
            except ValueError as err:
                raise ConfigError(f"method=midtrain needs data.documents, or task.name=knowledge for the "
                                  f"built-in knowledge base ({err})") from None
        rows = pack_documents(texts, tokenizer, cfg.data.max_seq_tokens)
        chat_rows = round(cfg.data.chat_ratio * per_step)
        pools = [SequencePool(rows, [1] * len(rows), per_step - chat_rows)]
        if chat_rows:
            if cfg.data.chat is not None:
                chat = read_records(cfg.data.chat)
            elif cfg.task.name != "none":
                chat = task_records(cfg, "train")
            else:
                raise ConfigError("data.chat_ratio > 0 needs chat examples: data.chat or task.name")
            pools.append(SequencePool.of_examples(examples_of(chat), chat_rows))
        try:
            data.batches = SequenceBatches(pools, seed)
        except PromptDataError as err:
            raise PromptDataError(f"{err}; documents give {len(rows)} rows of data.max_seq_tokens="
                                  f"{cfg.data.max_seq_tokens} tokens") from None
    if eval_prompts:
        data.eval_sets[""] = eval_prompts
    for name in cfg.eval.tasks:
        data.eval_sets[name] = prompts_of(task_records(cfg, "eval", name))
    return data


# ----------------------------------------------------------------------------------------------
# One step's pieces


def step_advantages(cfg: RunConfig, rollouts: Rollouts, scores: TeacherScores | None,
                    rewards: torch.Tensor | None) -> torch.Tensor:
    """The one advantage computation of every on-policy method: the teacher KL term when the
    teacher scored the batch, the group-centred reward when a grader did, or both."""
    return compute_advantages(rollouts.completion_mask, rollouts.behaviour_logprobs,
                              scores.logprobs if scores is not None else None,
                              kl_coef=cfg.loss.kl_coef, discount=cfg.loss.discount,
                              rewards=rewards, group_ids=rollouts.group_ids, divide_by_std=cfg.rl.divide_by_std)


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
                                      cfg.data.grader, cfg.train.micro_batch_size, cfg.loss.chunk_size)
        prefix = f"eval/{name}/" if name else "eval/"
        out.update({prefix + k: v for k, v in metrics.items()})
    return out


def rollout_records(rollouts: Rollouts, teacher_logprobs: torch.Tensor | None, tokenizer, limit: int,
                    grades: list | None = None) -> list[dict]:
    """The first `limit` sampled completions with per-token student/teacher log-probs and KL."""
    records = []
    for i in range(min(limit, rollouts.batch_size)):
        keep = rollouts.completion_mask[i].bool()
        ids = rollouts.tokens[i][keep].tolist()
        student = rollouts.behaviour_logprobs[i][keep].tolist()
        group = int(rollouts.group_ids[i])
        record = {
            "group": group,
            "prompt": rollouts.prompts[group].text if rollouts.prompts else None,
            "completion": tokenizer.decode(ids),
            "tokens": [tokenizer.decode([t]) for t in ids],
            "token_ids": ids,
            "student_logprobs": student,
            "truncated": bool(rollouts.truncated[i]),
        }
        if teacher_logprobs is not None:
            teacher = teacher_logprobs[i][keep].tolist()
            record["teacher_logprobs"] = teacher
            record["teacher_kl"] = [s - t for s, t in zip(student, teacher)]
        if grades and grades[i] is not None:
            record["score"] = grades[i].score
            if grades[i].checks:
                record["checks"] = grades[i].checks
        records.append(record)
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


TOTALS = ("tokens_sampled_total", "tokens_scored_total", "tokens_trained_total",
          "flops_student_total", "flops_teacher_total", "flops_total", "flops_data_total", "flops_total_with_data",
          "sample_s_total", "score_s_total", "train_s_total", "eval_s_total", "wall_s_total")


def train(cfg: RunConfig, resume: bool = False, console: Console | None = None,
          stop_after: int | None = None) -> dict:
    """Run (or resume) a run of any method; returns the summary also written to summary.json.

    `stop_after` ends this invocation after that many steps, exactly as a Ctrl-C would
    (checkpoint, then exit): a later `resume=True` call continues the same run.
    """
    console = console or Console()
    seed_everything(cfg.train.seed)
    components = build(cfg, console)
    learner, sampler, teacher, tokenizer = components.learner, components.sampler, components.teacher, components.tokenizer
    data = components.data
    run_dir = Path(cfg.run_dir)
    device = next(learner.model.parameters()).device

    start_step, totals = 0, dict.fromkeys(TOTALS, 0)
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
        start_step, totals = state["step"], {**totals, **state["totals"]}
        console.print(f"resuming from {checkpoint} (step {start_step})")
    log = RunLog(cfg, resume_step=start_step if checkpoint is not None else None)

    def save(step: int) -> Path:
        state = {"step": step, "learner": learner.state_dict(), "rng": rng_state(), "totals": totals,
                 "config": cfg.model_dump(mode="json")}
        return save_checkpoint(run_dir, step, learner.model, tokenizer, state, cfg.checkpoint.keep_last)

    def timed_evaluate() -> dict:
        t = time.perf_counter()
        metrics = evaluate(components, cfg)
        totals["eval_s_total"] += time.perf_counter() - t
        return metrics

    schedule = PromptSchedule(len(data.train_prompts), cfg.train.prompts_per_step, cfg.train.seed) \
        if cfg.on_policy else None
    if start_step == 0:
        first_eval = last_eval = timed_evaluate()
        if first_eval:
            log.log(0, {**first_eval, **totals})
    else:
        evals = log.logged_evals() or [{}]
        first_eval, last_eval = evals[0], evals[-1]
    last_metrics: dict = {}
    interrupted = False
    step = start_step
    score_with_teacher = teacher_scores_training(cfg, components)

    progress = Progress(TextColumn(f"[bold]{cfg.method}[/bold]"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console,
                        disable=not cfg.log.progress)
    with StopRequest(console).installed() as stop, progress:
        task = progress.add_task(cfg.method, total=cfg.train.steps, completed=start_step, status="")
        for step in range(start_step + 1, cfg.train.steps + 1):
            flops = {"flops_sample": 0, "flops_score": 0, "flops_train": 0, "flops_teacher": 0, "flops_data": 0}
            # 1. the batch: the student's own samples (on-policy), or fixed sequences
            t0 = time.perf_counter()
            if cfg.on_policy:
                prompts = [data.train_prompts[i] for i in schedule.indices(step - 1)]
                batch = sampler.sample([p.ids for p in prompts], prompts=prompts)
                flops["flops_sample"] = sampling_flops(components.student_cost, batch)
                totals["tokens_sampled_total"] += int(batch.completion_mask.sum())
            else:
                sequences, targets_from, flops["flops_data"] = data.batches.batch(step - 1)
                batch = sequence_batch(sequences, targets_from, tokenizer.pad_token_id, device)

            # 2. scores: the teacher's log-prob of every sampled token, the grader's reward
            t1 = time.perf_counter()
            scores = teacher.score(batch, keep_hidden=learner.exact) if score_with_teacher else None
            if scores is not None:
                flops["flops_teacher"] = scoring_flops(components.teacher_cost, batch)
                totals["tokens_scored_total"] += int(batch.completion_mask.sum())
            grades = grade_rollouts(batch, tokenizer, cfg.data.grader) if cfg.on_policy else []
            rewards = rewards_of(grades).to(device) if cfg.method == "rl" else None

            # 3. the update
            t2 = time.perf_counter()
            advantages = step_advantages(cfg, batch, scores, rewards) if learner.objective == "policy_gradient" else None
            train_metrics = learner.train_step(batch, advantages, scores.hidden if scores is not None else None,
                                               teacher.head if teacher is not None else None)
            flops["flops_train"] = training_flops(components.student_cost, batch)
            if learner.exact:  # the teacher's head is applied again, over the whole vocabulary, in the loss
                flops["flops_teacher"] += components.teacher_cost.forward(0, int(batch.completion_mask.sum()))
            t3 = time.perf_counter()

            metrics = rollout_metrics(batch, scores.logprobs if scores is not None else None) if cfg.on_policy else \
                {"tokens": int(batch.completion_mask.sum()),
                 "padding": 1.0 - float(batch.attention_mask.sum()) / batch.attention_mask.numel()}
            metrics.update(reward_metrics(grades, batch.group_ids) if grades else {})
            metrics.update(train_metrics)
            metrics.update(flops, sample_s=t1 - t0, score_s=t2 - t1, train_s=t3 - t2)
            totals["tokens_trained_total"] += metrics["tokens"]
            totals["flops_student_total"] += flops["flops_sample"] + flops["flops_train"]
            totals["flops_teacher_total"] += flops["flops_teacher"]
            totals["flops_total"] = totals["flops_student_total"] + totals["flops_teacher_total"]
            totals["flops_data_total"] += flops["flops_data"]
            totals["flops_total_with_data"] = totals["flops_total"] + totals["flops_data_total"]
            for phase, seconds in (("sample", t1 - t0), ("score", t2 - t1), ("train", t3 - t2)):
                totals[f"{phase}_s_total"] += seconds
            totals["wall_s_total"] += t3 - t0

            if (cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.train.steps:
                last_eval = timed_evaluate()
                metrics.update(last_eval)
            metrics.update(totals)
            log.log(step, metrics)
            if cfg.on_policy and cfg.log.rollouts_every and (step % cfg.log.rollouts_every == 0 or step == 1):
                log.write_rollouts(step, rollout_records(batch, scores.logprobs if scores is not None else None,
                                                         tokenizer, cfg.log.rollouts_per_step, grades))
            last_metrics = metrics
            progress.update(task, completed=step, status=status_line(metrics))

            stopping = stop.requested or (stop_after is not None and step - start_step >= stop_after)
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or stopping or step == cfg.train.steps:
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
        "last_step": last_metrics,
        **totals,
    }
    log.write_summary(summary)
    log.close()
    return summary


def status_line(metrics: dict) -> str:
    parts = []
    if "teacher_kl" in metrics:
        parts.append(f"teacher KL {metrics['teacher_kl']:.4f}")
    if "accuracy" in metrics:
        parts.append(f"accuracy {metrics['accuracy']:.3f}")
    if "cross_entropy" in metrics:
        parts.append(f"loss {metrics['cross_entropy']:.4f}")
    if "completion_len" in metrics:
        parts.append(f"len {metrics['completion_len']:.1f}")
    return "  ".join(parts)
