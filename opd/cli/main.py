"""The `opd` command line.

    opd distill --config run.yaml optim.lr=3e-4 train.steps=200   # overrides: dotted key=value
    opd distill --config run.yaml --resume                        # continue from the last checkpoint
    opd demo                                                      # the embedded default run
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from opd.config import ConfigError, load_config

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="On-policy distillation of language models.")
console = Console()
errors = Console(stderr=True, soft_wrap=True)  # an error message is never broken across lines


def _fail(err: Exception) -> typer.Exit:
    errors.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False)
    return typer.Exit(2)


def _user_errors():
    """Errors that are the user's input, shown as one clear message instead of a traceback."""
    from opd.data import PromptDataError
    from opd.models import ModelNotFoundError
    from opd.run_dir import RunDirectoryError
    from opd.tokenizer_check import TokenizerMismatchError

    return (ConfigError, PromptDataError, ModelNotFoundError, TokenizerMismatchError, RunDirectoryError,
            FileNotFoundError, ImportError)


def _run(cfg, resume: bool) -> dict:
    from opd.loop import train

    try:
        return train(cfg, resume=resume, console=console)
    except _user_errors() as err:
        raise _fail(err)


@app.command(context_settings={"allow_extra_args": False})
def distill(
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted key=value settings, e.g. optim.lr=3e-4"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run configuration"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in run_dir from its last checkpoint"),
):
    """Distil a student from a teacher on the student's own samples."""
    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as err:
        raise _fail(err)
    summary = _run(cfg, resume)
    _print_summary(summary)


@app.command()
def demo(
    quick: bool = typer.Option(False, "--quick", help="a few steps only: checks the whole path, not the result"),
    run_dir: Path = typer.Option(Path("runs/demo"), "--run-dir"),
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted key=value settings"),
):
    """The embedded default: a tiny student distilled from a tiny teacher, both built locally."""
    from opd.cli.demo import DEMO_CONFIG, QUICK_OVERRIDES

    if run_dir.exists():  # the demo always starts afresh
        shutil.rmtree(run_dir)
    try:
        cfg = load_config(None, [f"run_dir={run_dir}", *(QUICK_OVERRIDES if quick else []), *(overrides or [])],
                          base=DEMO_CONFIG)
    except ConfigError as err:
        raise _fail(err)
    console.print("[bold]opd demo[/bold]: building a tiny teacher and student (cached after the first run), "
                  "then distilling on-policy")
    summary = _run(cfg, resume=False)
    _print_summary(summary)
    _print_samples(run_dir)


def _print_summary(summary: dict) -> None:
    start, end = summary.get("start_eval") or {}, summary.get("last_eval") or {}
    table = Table(title=f"opd run: {summary['run_dir']}  ({summary['steps_done']}/{summary['steps_planned']} steps"
                        f"{', interrupted' if summary['interrupted'] else ''})")
    table.add_column("held-out prompts")
    table.add_column("start", justify="right")
    table.add_column("end", justify="right")
    names = {"eval/teacher_kl": "teacher KL (sampled, per token)", "eval/exact_kl": "exact reverse KL (per token)",
             "eval/entropy": "student entropy", "eval/completion_len": "completion length"}
    for key, label in names.items():
        if key in end:
            table.add_row(label, f"{start[key]:.3f}" if key in start else "-", f"{end[key]:.3f}")
    console.print(table)
    console.print(f"tokens trained: {summary['tokens_total']:,}   wall time in steps: {summary['wall_s_total']:.1f} s"
                  f"   metrics: {summary['run_dir']}/metrics.jsonl")


def _print_samples(run_dir: Path) -> None:
    files = sorted((run_dir / "rollouts").glob("step_*.jsonl"))
    if len(files) < 2:
        return
    for path in (files[0], files[-1]):
        record = json.loads(path.read_text().splitlines()[0])
        kl = sum(record["teacher_kl"]) / max(len(record["teacher_kl"]), 1)
        console.print(f"[dim]{path.stem}[/dim] {record['prompt']!r} -> {record['completion']!r}  "
                      f"[dim](teacher KL {kl:.2f}/token)[/dim]")


if __name__ == "__main__":
    app()
