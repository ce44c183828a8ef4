"""`opd demo`: on-policy distillation, RL and SFT from the same student start, under the same
budget, on the built-in arithmetic task; a table and report.html at the end.

1. build (once, cached under $OPD_CACHE) a teacher and a weaker student: tiny Llamas of one shape
   trained by SFT on the task's reference solutions, the teacher twice as long;
2. the teacher writes completions for the training prompts (SFT's data, cached with its cost);
3. from the student start, with the same steps and sequences per step:
   * distill: the student samples, the teacher's full distribution scores every token (exact
     per-token reverse KL);
   * rl: the student samples, the grader rewards each answer, group-centred advantages;
   * sft: cross-entropy on the teacher's completions (off-policy distillation);
4. tables: the start, the teacher, each method's final accuracy and wall time, the steps and FLOPs
   at which it first reached 95% of the teacher's accuracy, and those at which it first reached the
   common accuracy (the highest every method reached); report.html with the curves.

Accuracy is sampled pass@1 (temperature 1) on held-out problems; greedy accuracy saturates early
and hides differences between methods. Each method has its own learning rate: RL needs a smaller
one than the two distillations (with larger ones it collapses: every group scores the same and
the gradient is zero).
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table

from opd.compare import print_comparison  # noqa: F401  (the demo's tables, also `opd compare`'s)
from opd.config import ConfigError, RunConfig, load_config, split_prefixed_overrides

# Written into the demo's folder first thing: `--overwrite` deletes only a folder that holds it (or
# an older demo's comparison.json), so opd never deletes a folder it did not create.
MARKER = ".opd-demo"

TASK = {"name": "arithmetic", "train_size": 4000, "eval_size": 64,
        "arithmetic": {"digits": 1, "operations": 2, "operators": "+-"}}
EVAL = {"samples_per_prompt": 2, "max_new_tokens": 40}
PROMPTS_PER_STEP, SAMPLES_PER_PROMPT = 16, 4


def _build(hidden: int, seed: int, steps: int) -> dict:
    """SFT of a tiny Llama from random weights on the task's reference solutions (cosine decay of
    the learning rate). The student is the same shape as the teacher, trained for half as long:
    it has learned the format and most of the facts, and makes mistakes a teacher can correct."""
    return {
        "method": "sft", "run_dir": "unused",
        "student": {"tiny": {"hidden_size": hidden, "num_layers": 2, "seed": seed}},
        "task": TASK, "sampling": {"max_new_tokens": 40},
        "optim": {"lr": 3e-3, "warmup_steps": 20, "schedule": "cosine", "min_lr_ratio": 0.1},
        "train": {"steps": steps, "prompts_per_step": 32, "micro_batch_size": 32},
        "eval": {**EVAL, "every": 0}, "checkpoint": {"every": 200},
    }


TEACHER_BUILD = _build(hidden=128, seed=0, steps=1200)
STUDENT_BUILD = _build(hidden=128, seed=1, steps=600)

# What every method shares: the start, the task, the budget, the evaluation.
COMMON = {
    "task": TASK,
    "sampling": {"samples_per_prompt": SAMPLES_PER_PROMPT, "max_new_tokens": 40},
    "optim": {"warmup_steps": 10, "schedule": "cosine", "min_lr_ratio": 0.1},
    "train": {"steps": 150, "prompts_per_step": PROMPTS_PER_STEP, "micro_batch_size": 64},
    "eval": {**EVAL, "every": 15},
    "log": {"rollouts_every": 25, "rollouts_per_step": 8},
    "checkpoint": {"every": 0},
}
METHODS = {
    "distill": {"method": "distill", "loss": {"kind": "reverse_kl"}, "optim": {"lr": 5e-4}},
    # The teacher only measures eval teacher KL here (kl_coef 0: it is never run in training).
    "rl": {"method": "rl", "loss": {"kind": "sampled_reverse_kl", "kl_coef": 0.0}, "optim": {"lr": 2e-4}},
    # As many sequences per step as the on-policy methods sample (prompts x samples).
    "sft": {"method": "sft", "optim": {"lr": 5e-4},
            "train": {"prompts_per_step": PROMPTS_PER_STEP * SAMPLES_PER_PROMPT}},
}

def demo_recipe() -> dict:
    """What decides the demo's numbers, in a form results files record and RESULTS.md states: the
    task, the two builds, the evaluation, each method's learning rate, and a fingerprint of the tiny
    tokenizer (trained by the installed `tokenizers`: another version can learn other merges)."""
    import hashlib

    from opd.tiny import _tokenizer_json

    def build(tree: dict) -> dict:
        tiny = tree["student"]["tiny"]
        return {"hidden_size": tiny["hidden_size"], "num_layers": tiny["num_layers"], "seed": tiny["seed"],
                "steps": tree["train"]["steps"], "lr": tree["optim"]["lr"]}

    return {"task": TASK, "eval": EVAL, "teacher": build(TEACHER_BUILD), "student_start": build(STUDENT_BUILD),
            "steps": COMMON["train"]["steps"], "lr": {name: m["optim"]["lr"] for name, m in METHODS.items()},
            "tokenizer_sha256": hashlib.sha256(_tokenizer_json(768).encode()).hexdigest()[:12]}


def environment() -> dict:
    """The library versions and device that produced a result: the same recipe under another torch,
    transformers or tokenizers, or on a GPU (train.device=auto picks CUDA: other kernels and another
    random stream), trains other tiny models and gives other figures."""
    import tokenizers
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "device": "cuda" if torch.cuda.is_available() else "cpu"}


QUICK = {  # a few steps of everything, on half-width models and small batches: checks the whole path, not the result
    "build": ["train.steps=12", "task.train_size=96", "task.eval_size=8", "checkpoint.every=4",
              "student.tiny.hidden_size=64", "train.prompts_per_step=16", "train.micro_batch_size=16"],
    "run": ["train.steps=4", "eval.every=2", "log.rollouts_every=2", "task.train_size=96", "task.eval_size=8",
            "train.prompts_per_step=4", "eval.samples_per_prompt=1", "sampling.max_new_tokens=12",
            "eval.max_new_tokens=12"],
    "per_method": {"sft": ["train.prompts_per_step=16"]},  # as many sequences as the others sample (4 x 4)
}
SMOKE_TEST = ("--quick is a smoke test: 4 steps from models built in seconds, so the tables show that every stage "
              "runs, not how the methods compare (accuracies near 0, and a target of 0 is 'reached' at step 0). "
              "`opd demo` without --quick gives the comparison.")


def _merge(*trees: dict) -> dict:
    from opd.config import _deep_merge

    out: dict = {}
    for tree in trees:
        out = _deep_merge(out, tree)
    return out


def method_config(name: str, student_dir: Path, teacher_dir: Path | None, overrides: list[str] = (),
                  tree: dict | None = None) -> RunConfig:
    """One method's run from a start: COMMON, then METHODS[name], then `tree`, then `overrides`."""
    base = _merge(COMMON, {"student": {"path": str(student_dir)}}, METHODS[name], tree or {})
    if teacher_dir is not None:
        base["teacher"] = {"path": str(teacher_dir)}
    return load_config(None, list(overrides), base=base)


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(overrides for every method, overrides per method): `distill:optim.lr=3e-3` is distill's."""
    return split_prefixed_overrides(overrides, list(METHODS), "method of the demo")


def demo_configs(student_dir: Path, teacher_dir: Path | None, quick: bool = False,
                 overrides: list[str] = ()) -> dict[str, RunConfig]:
    """Every method's run config, the user's overrides applied (a bad key or value: ConfigError)."""
    shared, per_method = split_overrides(list(overrides))
    runs = {}
    for name in METHODS:
        quick_settings = [*QUICK["run"], *QUICK["per_method"].get(name, [])] if quick else []
        try:
            runs[name] = method_config(name, student_dir, teacher_dir, [*quick_settings, *shared, *per_method[name]])
        except ConfigError as err:
            raise ConfigError(f"{err} (in the demo's {name} run)" if per_method[name] else str(err)) from None
    return runs


def validate_demo(quick: bool = False, overrides: list[str] = ()) -> None:
    """Every config the demo will use, built from the overrides before any work: a misspelled key,
    a bad value or an unknown method prefix is refused in a second, not after the models are built."""
    build_overrides = QUICK["build"] if quick else []
    for build in (TEACHER_BUILD, STUDENT_BUILD):
        load_config(None, build_overrides, base=build)
    demo_configs(Path("student-start"), Path("teacher"), quick, overrides)


def _owned(run_dir: Path) -> bool:
    """The folder was written by `opd demo` (or is an empty one, or holds only its lock)."""
    entries = {p.name for p in run_dir.iterdir()}
    return MARKER in entries or "comparison.json" in entries or entries <= {".lock"}


@contextmanager
def claimed_run_dir(run_dir: Path, overwrite: bool = False):
    """The demo's folder, locked (opd.run_dir.RunLock) and empty but for the marker. An existing
    folder that is not empty is refused, unless `overwrite` and it holds an earlier demo: opd never
    deletes a folder it did not create."""
    from opd.run_dir import RunDirectoryError, RunLock

    run_dir = Path(run_dir)
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        raise RunDirectoryError(f"--run-dir {run_dir} is not a folder (a file or a link): choose another --run-dir")
    if run_dir.is_dir() and any(p.name != ".lock" for p in run_dir.iterdir()):
        if not _owned(run_dir):
            raise RunDirectoryError(f"--run-dir {run_dir} is not empty and holds no opd demo: opd does not delete "
                                    f"folders it did not create; choose another --run-dir")
        if not overwrite:
            raise RunDirectoryError(f"--run-dir {run_dir} holds an earlier demo: pass --overwrite to replace it, "
                                    f"or choose another --run-dir")
    with RunLock(run_dir) as lock:  # a demo running in it now: refused here, before anything is deleted
        for entry in run_dir.iterdir():
            if entry.name == ".lock":
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        (run_dir / MARKER).write_text("written by `opd demo`: `opd demo --overwrite` may delete and rewrite this "
                                      "folder\n")
        yield lock


def run_demo(run_dir: Path, quick: bool = False, overrides: list[str] = (), console: Console | None = None,
             overwrite: bool = False) -> dict:
    """The whole demo; returns comparison.json's contents. `overrides` (dotted key=value) apply to
    every method's run; `distill:optim.lr=3e-3` to one of them. All of them are checked before any
    work; an existing `run_dir` that is not empty is replaced only with `overwrite` and only if it
    holds an earlier demo."""
    console = console or Console()
    validate_demo(quick, overrides)  # before anything is built or deleted
    console.print("[bold]opd demo[/bold]: distillation vs RL vs SFT from the same tiny student, on held-out "
                  "arithmetic (teacher and student are built once, then cached)")
    with claimed_run_dir(run_dir, overwrite):
        return _run_demo(Path(run_dir), quick, list(overrides), console)


def _run_demo(run_dir: Path, quick: bool, overrides: list[str], console: Console) -> dict:
    from opd.compare import cached_model, run_comparison, sft_on_teacher_samples
    from opd.report import build_comparison_report

    build_overrides = QUICK["build"] if quick else []
    teacher_dir, _ = cached_model(load_config(None, build_overrides, base=TEACHER_BUILD), console, "the teacher")
    student_dir, _ = cached_model(load_config(None, build_overrides, base=STUDENT_BUILD), console, "the student start")

    runs = demo_configs(student_dir, teacher_dir, quick, overrides)
    runs["sft"], written = sft_on_teacher_samples(runs["sft"], console)

    # The teacher's accuracy (the target's base) is measured by every run at step 0 (eval/teacher_accuracy).
    comparison = run_comparison(run_dir, runs, extra_seconds={"sft": written["seconds"]}, console=console,
                                notes={"teacher_samples": written, "teacher": str(teacher_dir),
                                       "student_start": str(student_dir), "recipe": demo_recipe(),
                                       "environment": environment(), "smoke_test": quick})
    report = build_comparison_report(run_dir)
    if quick:
        console.print(f"[yellow]{SMOKE_TEST}[/yellow]")
    print_comparison(comparison, console, title_prefix="smoke test: " if quick else "")
    console.print(f"report: {report}")
    print_models(run_dir, teacher_dir, student_dir, list(runs), console)
    return comparison


def print_models(run_dir: Path, teacher_dir: Path, student_dir: Path, methods: list[str], console: Console) -> None:
    """Where the models are, as paths that `student.path=` / `teacher.path=` and `opd eval` take
    (checkpoints/latest is a text file naming the last checkpoint, not a model)."""
    from opd.learner.checkpoint import latest_checkpoint

    console.print("models (Hugging Face folders, for student.path= / teacher.path= and opd eval):")
    console.print(f"  teacher        {teacher_dir}", soft_wrap=True)  # a path is never broken across lines
    console.print(f"  student start  {student_dir}", soft_wrap=True)
    for name in methods:
        checkpoint = latest_checkpoint(run_dir / name)
        if checkpoint is not None:
            console.print(f"  {name:<14} {checkpoint / 'model'}", soft_wrap=True)
