"""Measuring a student on a set of prompts: accuracy from graders (pass@1 averaged over k samples,
per task and per check) and, when a teacher is given, the teacher KL of the student's own samples.

The training loop calls `evaluate_prompts` every `eval.every` steps; `opd eval` calls it on any
checkpoint or model. Per-step training metrics (`rollout_metrics`, `reward_metrics`) live here too,
so that training and evaluation measure the same way.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import torch

from opd.advantages import teacher_kl
from opd.config import EvalConfig, RunConfig
from opd.roles import Learner, Sampler, Teacher, TeacherScores, check_output_sizes
from opd.rollouts import Rollouts
from opd.tasks import Grade, grade, is_graded

if TYPE_CHECKING:  # annotations only
    from opd.components import Components


def completion_text(tokenizer, tokens_T: torch.Tensor, completion_mask_T: torch.Tensor) -> str:
    """The text of one sampled completion, without EOS or other special tokens."""
    return tokenizer.decode(tokens_T[completion_mask_T.bool()].tolist(), skip_special_tokens=True)


def completion_texts(rollouts: Rollouts, tokenizer) -> list[str]:
    return [completion_text(tokenizer, row, keep) for row, keep in zip(rollouts.tokens, rollouts.completion_mask)]


def grade_rollouts(rollouts: Rollouts, tokenizer, default_grader: str | None) -> list[Grade | None]:
    """One grade per row (None where the prompt's record has no grader). Only graded rows are
    decoded: a distillation run without graders calls this every step. Episodes of an Env that
    gives rewards (opd.envs) are graded by it."""
    if rollouts.env_rewards is not None:
        return [Grade(score=float(r)) for r in rollouts.env_rewards.tolist()]
    grades = []
    for row, keep, group in zip(rollouts.tokens, rollouts.completion_mask, rollouts.group_ids.tolist()):
        record = rollouts.prompts[group].record if rollouts.prompts else {}
        if not is_graded(record, default_grader):
            grades.append(None)
            continue
        grades.append(grade(record, completion_text(tokenizer, row, keep), default_grader))
    return grades


def rewards_of(grades: list[Grade | None]) -> torch.Tensor:
    """RL rewards: each row's grade score. Every prompt must be graded."""
    return torch.tensor([g.score for g in grades], dtype=torch.float32)


def reward_metrics(grades: list[Grade | None], group_ids: torch.Tensor) -> dict:
    """accuracy (mean score), per-check pass rates, and the groups whose samples all scored the
    same: with a centred reward they carry no RL signal."""
    graded = [(g, int(group)) for g, group in zip(grades, group_ids.tolist()) if g is not None]
    if not graded:
        return {}
    metrics = {"accuracy": sum(g.score for g, _ in graded) / len(graded)}
    checks = defaultdict(list)
    for g, _ in graded:
        for name, passed in g.checks.items():
            checks[name].append(float(passed))
    if checks:
        # instruction-level accuracy: the fraction of single checks passed (accuracy is per prompt)
        metrics["instruction_accuracy"] = sum(map(sum, checks.values())) / sum(map(len, checks.values()))
        metrics.update({f"check/{name}": sum(v) / len(v) for name, v in sorted(checks.items())})
    by_group = defaultdict(list)
    for g, group in graded:
        by_group[group].append(g.score)
    equal = sum(1 for scores in by_group.values() if len(scores) > 1 and max(scores) == min(scores))
    metrics["groups_all_equal"] = equal
    metrics["groups_all_equal_frac"] = equal / len(by_group)
    return metrics


def rollout_records(rollouts: Rollouts, scores: TeacherScores | None, tokenizer, limit: int,
                    grades: list | None = None) -> list[dict]:
    """The first `limit` sampled completions with per-token student/teacher log-probs and KL (and,
    from a teacher of another tokenizer, each token's chunk: -1 where it carries no signal): what a
    run logs under rollouts/."""
    teacher_logprobs = scores.logprobs if scores is not None else None
    records = []
    for i in range(min(limit, rollouts.batch_size)):
        keep = rollouts.completion_mask[i].bool()
        ids = rollouts.tokens[i][keep].tolist()
        student = rollouts.student_logprobs[i][keep].tolist()
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
        if rollouts.multi_turn:  # 0: an environment token (tool output, user turn), not trained on
            record["sampled"] = [int(v) for v in rollouts.loss_mask[i][keep].tolist()]
        if teacher_logprobs is not None:
            teacher = teacher_logprobs[i][keep].tolist()
            record["teacher_logprobs"] = teacher
            sampled = rollouts.loss_mask[i][keep].tolist()
            record["teacher_kl"] = [(s - t) * m for s, t, m in zip(student, teacher, sampled)]
        if scores is not None and scores.chunks is not None:
            record["chunks"] = scores.chunks.index[i][keep].tolist()
        if grades and grades[i] is not None:
            record["score"] = grades[i].score
            if grades[i].checks:
                record["checks"] = grades[i].checks
        records.append(record)
    return records


def rollout_metrics(rollouts: Rollouts, teacher_logprobs: torch.Tensor | None,
                    scored_rows: torch.Tensor | None = None) -> dict:
    """Lengths, truncation, entropy and the mean teacher KL (over `scored_rows` only when given: the
    rows a teacher scored)."""
    mask = rollouts.loss_mask
    tokens = float(mask.sum())
    metrics = {
        "completion_len": float(rollouts.completion_lengths.mean()),
        "truncated": float(rollouts.truncated.float().mean()),
        "tokens": int(tokens),
        **rollouts.env_metrics,
    }
    if rollouts.entropy is not None:  # an inference engine returns the sampled tokens' log-probs only
        metrics["entropy"] = float(rollouts.entropy.sum()) / max(tokens, 1.0)
    if scored_rows is not None and not bool(scored_rows.any()):
        teacher_logprobs = None  # no row had a teacher: there is no teacher KL to report
    if teacher_logprobs is not None:  # mean per-token reverse-KL estimate
        if scored_rows is not None:
            mask = mask * scored_rows[:, None].to(mask.dtype)
        metrics["teacher_kl"] = float(teacher_kl(rollouts.student_logprobs, teacher_logprobs, mask).sum()) / \
            max(float(mask.sum()), 1.0)
    return metrics


def evaluate_prompts(prompts: list, sampler: Sampler, cfg: EvalConfig, max_new_tokens: int,
                     teacher: Teacher | None = None, default_grader: str | None = None,
                     learner: Learner | None = None) -> tuple[dict, Rollouts]:
    """Sample k completions per prompt (or one greedy), from `cfg.seed` so that an evaluation
    neither perturbs training nor varies between evaluations, and measure them.

    Returns metrics (accuracy when graded; teacher_kl when a teacher is given and the samples are
    the student's own; exact_kl too when the `learner` is given and the teacher returns its full
    distribution over a head of the student's size) and the rollouts.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(cfg.seed)
        rollouts = sampler.sample([p.ids for p in prompts], 1 if cfg.greedy else cfg.samples_per_prompt,
                                  max_new_tokens=max_new_tokens, prompts=prompts, greedy=cfg.greedy)
    scores = None
    exact = (learner is not None and teacher is not None and teacher.full_distribution
             and check_output_sizes(learner, teacher, needs_full_distribution=False))
    if teacher is not None and not cfg.greedy:
        scores = teacher.score(rollouts, keep_hidden=teacher.full_distribution)
    metrics = rollout_metrics(rollouts, scores.logprobs if scores is not None else None,
                              scores.rows if scores is not None else None)
    metrics.pop("tokens")
    if scores is not None and exact and scores.hidden is not None:
        metrics["exact_kl"] = learner.divergence(rollouts, scores, "reverse_kl")
    if scores is not None and scores.hidden is not None:
        metrics["teacher_entropy"] = teacher_entropy(rollouts, scores)
    grades = grade_rollouts(rollouts, sampler.tokenizer, default_grader)
    graded = reward_metrics(grades, rollouts.group_ids)
    graded.pop("groups_all_equal", None)
    graded.pop("groups_all_equal_frac", None)
    metrics.update(graded)
    return metrics, rollouts


@torch.no_grad()
def teacher_entropy(rollouts: Rollouts, scores: TeacherScores, chunk_size: int = 256) -> float:
    """The teacher's mean entropy (nats) over the completion positions of the student's samples: a
    first audit of the teacher. A teacher that is unsure on the student's states (high entropy there)
    gives a weak, noisy signal however strong it is on its own samples."""
    states_M_H = scores.hidden[:, :-1][rollouts.predicts_completion]
    total = 0.0
    for start in range(0, states_M_H.shape[0], chunk_size):
        logprobs = torch.log_softmax(scores.logits(states_M_H[start:start + chunk_size]).float(), dim=-1)
        total += float(-(logprobs.exp() * logprobs).sum())
    return total / max(states_M_H.shape[0], 1)


def teacher_ceiling(prompts: list, teacher_sampler: Sampler, cfg: EvalConfig, max_new_tokens: int,
                    default_grader: str | None = None) -> dict:
    """The teacher evaluated as a model, exactly as the student is (same prompts, seed, k, length):
    its graded metrics renamed teacher_accuracy, teacher_instruction_accuracy, teacher_check/<name>.
    {} when the prompts are not graded."""
    metrics, _ = evaluate_prompts(prompts, teacher_sampler, cfg, max_new_tokens, default_grader=default_grader)
    graded = ("accuracy", "instruction_accuracy")
    return {f"teacher_{k}": v for k, v in metrics.items() if k in graded or k.startswith("check/")}


def evaluate_sets(components: Components, cfg: RunConfig) -> dict:
    """The run's evaluation, on every eval set: the run's own (metrics eval/...) and each of
    eval.tasks (eval/<task>/...)."""
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
