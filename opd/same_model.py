"""A warning for a common smoke test that goes wrong: the same model as student and teacher.

Then the teacher KL is zero up to sampling noise: the advantage is noise, Adam normalises it into
steps of size lr, and the model drifts away from itself (a SmolLM2 distilled from itself answered
"What is the capital of France?" with French word salad after 4 steps). Checked by source (the same
path, or the same tiny config) and, for an in-process teacher, by the models' logits on a few tokens,
which also catches a copy of the same weights under another path, a LoRA student whose adapter is
still zero, and a bf16 teacher of the student's own weights.
"""

from __future__ import annotations

import warnings

import torch

from opd.config import RunConfig


class SameModelWarning(UserWarning):
    pass


def same_source(cfg: RunConfig) -> bool:
    student, teacher = cfg.student, cfg.teacher
    if teacher is None or teacher.url is not None:
        return False
    if student.path is not None:
        return student.path == teacher.path and student.gguf_file == teacher.gguf_file
    return student.tiny is not None and student.tiny == teacher.tiny


@torch.no_grad()
def logits_agree(student, teacher, vocab_size: int, tol: float = 1e-2) -> bool:
    """Whether the two models give the same next-token logits on a few tokens (to `tol` of the
    largest logit: bf16 rounding of the same weights passes, another model does not)."""
    ids = torch.arange(2, 10).remainder(vocab_size)[None]
    outputs = []
    for model in (student, teacher):
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            outputs.append(model(input_ids=ids.to(device)).logits.float().cpu())
        finally:
            model.train(was_training)
    a, b = outputs
    if a.shape != b.shape:
        return False
    return float((a - b).abs().max()) <= tol * max(1.0, float(a.abs().max()))


def uses_teacher_kl(cfg: RunConfig) -> bool:
    return cfg.method == "distill" or (cfg.method == "rl" and cfg.loss.kl_coef > 0)


def warn_if_same_model(cfg: RunConfig, student, teacher_model, vocab_size: int) -> bool:
    """Warn (SameModelWarning) when a run distills a model from itself; returns whether it warned.
    `teacher_model`: the in-process teacher's model, None for a served one (checked by source only)."""
    if cfg.teacher is None or not uses_teacher_kl(cfg):
        return False
    if same_source(cfg):
        why = "student and teacher name the same model"
    elif teacher_model is not None and logits_agree(student, teacher_model, vocab_size):
        why = "student and teacher give the same logits (the same weights)"
    else:
        return False
    warnings.warn(
        f"{why}: the teacher KL is zero up to sampling noise, so the updates are noise that Adam scales to "
        f"steps of size optim.lr, and the student drifts from itself. Distill from a different (stronger) "
        f"teacher; as a smoke test, use few steps and a small optim.lr.", SameModelWarning, stacklevel=2)
    return True
