"""The `opd` command line.

    opd distill  --config run.yaml optim.lr=3e-4 train.steps=200   # overrides: dotted key=value
    opd distill  --config run.yaml --resume                        # continue from the last checkpoint
    opd rl       --config run.yaml                                 # rewards from a grader (+ teacher KL)
    opd sample   --config run.yaml --out data/teacher.jsonl        # teacher completions for SFT
    opd sft      --config run.yaml data.completions=data/teacher.jsonl
    opd midtrain --config run.yaml                                 # documents (+ chat data)
    opd eval     runs/x --task arithmetic --samples 4              # any run, checkpoint or model
    opd tasks    arithmetic --split eval --out eval.jsonl          # write a built-in task's data
    opd report   runs/x                                            # report.html: curves, KL-coloured rollouts
    opd compare  runs/a runs/b runs/c --out runs/cmp               # any runs: tables, comparison.json, report
    opd pipeline --config configs/pipeline_personalize.yaml        # phases in order (midtrain -> distill -> eval)
    opd demo                                                       # the embedded default run
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from opd.config import METHODS, ConfigError, load_config

# rich_markup_mode=None: click's plain help. The rich panels of typer 0.29 print every flag as
# taking a value (`--resume <bool>`).
app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="On-policy distillation of language models.")
console = Console()

errors = Console(stderr=True, soft_wrap=True)  # an error message is never broken across lines


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            console.print(f"opd {version('opd')}")
        except PackageNotFoundError:  # run from a source tree that is not installed
            console.print("opd (not installed: no version recorded)")
        raise typer.Exit()


@app.callback()
def _quiet_hub_progress_bars(
    _version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                  help="print opd's version and exit"),
) -> None:
    # opd draws its own progress bars; without this, transformers adds one line per model load
    # and checkpoint save ("Loading weights", "Writing model shards"). Read when transformers is
    # imported, which the commands do later; a user's own setting wins.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _fail(err: Exception) -> typer.Exit:
    errors.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False)
    return typer.Exit(2)


def _user_errors():
    """Errors that are the user's input, shown as one clear message instead of a traceback."""
    from opd.data import PromptDataError
    from opd.learner.checkpoint import (CheckpointWriteError, CorruptCheckpointError, NonFiniteWeightsError,
                                        UntrustedCheckpointError)
    from opd.loop import NonFiniteTrainingError
    from opd.models import ModelNotFoundError
    from opd.run_dir import RunDirectoryError
    from opd.sampler.vllm import SamplerServerError
    from opd.tasks import GraderError
    from opd.teacher.errors import TeacherResponseError, TeacherUnavailableError
    from opd.tokenizer_check import TokenizerMismatchError

    return (ConfigError, PromptDataError, ModelNotFoundError, TokenizerMismatchError, RunDirectoryError,
            GraderError, FileNotFoundError, ImportError, CheckpointWriteError, CorruptCheckpointError,
            NonFiniteWeightsError, NonFiniteTrainingError, TeacherUnavailableError, TeacherResponseError,
            UntrustedCheckpointError, SamplerServerError)


INTERRUPTED = 130  # the shell's code for Ctrl-C: `opd distill ... && next-step` does not carry on


def _interrupted(message: str) -> typer.Exit:
    errors.print(f"[yellow]{escape(message)}[/yellow]", highlight=False)
    return typer.Exit(INTERRUPTED)


def _run(cfg, resume: bool, trust_checkpoint: bool = False) -> dict:
    from opd.loop import train

    try:
        return train(cfg, resume=resume, console=console, trust_checkpoint=trust_checkpoint)
    except _user_errors() as err:
        raise _fail(err)
    except KeyboardInterrupt:  # Ctrl-C twice: stopped at once, without a checkpoint of this step
        raise _interrupted("interrupted without saving this step; --resume continues from the last checkpoint")


def _method_config(method: str, config: Path | None, overrides: list[str]):
    """The config file plus overrides, with `method` set by the command; a file that names another
    method is refused rather than silently overridden."""
    import yaml

    if config is not None and config.is_file():
        named = (yaml.safe_load(config.read_text()) or {}).get("method")
        if named not in (None, method):
            raise ConfigError(f"{config} says method: {named}, but this is `opd {method}`")
    return load_config(config, [f"method={method}", *overrides])


_HELP = {
    "distill": "On-policy distillation: the student samples, the teacher scores every token.",
    "rl": "RL with a verifiable reward (GRPO-style group centring); add a teacher for RL + teacher KL.",
    "sft": "Off-policy distillation / SFT: cross-entropy on given completions (e.g. from `opd sample`).",
    "midtrain": "Mid-training: next-token training on documents, optionally mixed with chat data.",
}


def _register(method: str) -> None:
    def command(
        overrides: Optional[List[str]] = typer.Argument(None, help="dotted key=value settings, e.g. optim.lr=3e-4"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run configuration"),
        resume: bool = typer.Option(False, "--resume", help="continue the run in run_dir from its last checkpoint"),
        trust_checkpoint: bool = typer.Option(
            False, "--trust-checkpoint", help="with --resume: read a checkpoint of an older opd (a pickle, which can "
                                              "run code: only one whose origin you trust)"),
    ):
        try:
            cfg = _method_config(method, config, overrides or [])
        except ConfigError as err:
            raise _fail(err)
        summary = _run(cfg, resume, trust_checkpoint)
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone prints the summary
            _print_summary(summary)
        if summary.get("interrupted"):
            raise _interrupted(f"interrupted after step {summary['steps_done']} of {summary['steps_planned']} "
                               f"(checkpoint saved): the same command with --resume continues the run")

    command.__doc__ = _HELP[method]
    app.command(name=method, context_settings={"allow_extra_args": False})(command)


for _method in METHODS:
    _register(_method)


@app.command()
def sample(
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted key=value settings"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run configuration (its teacher, prompts, sampling)"),
    out: Path = typer.Option(..., "--out", "-o", help="JSONL file to write"),
    split: str = typer.Option("train", help="train or eval prompts"),
    only_correct: bool = typer.Option(False, "--only-correct", help="keep only completions the grader scores 1"),
):
    """The teacher writes completions for the prompts, with their cost, to JSONL (data for `opd sft`)."""
    from opd.sample_command import write_teacher_samples

    try:
        cfg = load_config(config, overrides or [])
        result = write_teacher_samples(cfg, out, split, only_correct, console)
    except _user_errors() as err:
        raise _fail(err)
    accuracy = f", teacher accuracy {result['accuracy']:.3f}" if result["accuracy"] is not None else ""
    console.print(f"wrote {result['written']} of {result['samples']} samples to {result['out']}{accuracy}; "
                  f"teacher cost {result['teacher_flops']:.3g} FLOPs, {result['teacher_tokens']:,} tokens, "
                  f"{result['seconds']:.1f} s")


@app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="a run directory, a checkpoint directory, a Hugging Face model directory or a .gguf"),
    overrides: Optional[List[str]] = typer.Argument(None, help="dotted key=value settings, e.g. task.arithmetic.digits=2"),
    task: Optional[List[str]] = typer.Option(None, "--task", "-t", help="built-in task to evaluate (repeatable); default: the run's eval sets"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config for the task/data/eval settings"),
    samples: Optional[int] = typer.Option(None, "--samples", "-k", help="samples per prompt (pass@1 averaged over k)"),
    greedy: bool = typer.Option(False, "--greedy", help="argmax decoding instead of sampling at temperature 1"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="write the results as JSON here"),
    lm_eval: Optional[str] = typer.Option(None, "--lm-eval", help="lm-evaluation-harness tasks, comma-separated "
                                          "(e.g. opd_gsm8k_local,ifeval): needs pip install 'opd[eval]'"),
    limit: Optional[float] = typer.Option(None, "--limit", help="--lm-eval: at most this many rows per task "
                                          "(a fraction below 1: that share)"),
    tasks_dir: Optional[List[Path]] = typer.Option(None, "--tasks-dir", help="--lm-eval: a folder of your own "
                                                   "task YAMLs (repeatable), besides opd's shipped ones"),
):
    """Accuracy (per task and per check) and, with a teacher, teacher KL, for any model; with
    --lm-eval, the harness's scores of the model exported with its LoRA merged."""
    from opd.eval_command import run_eval

    if lm_eval is not None:
        return _evaluate_with_harness(model, lm_eval, config, overrides or [], limit, output, tasks_dir)

    extra = [f"eval.samples_per_prompt={samples}"] if samples else []
    extra += ["eval.greedy=true"] if greedy else []
    try:
        results = run_eval(model, task or [], config, [*(overrides or []), *extra], console)
    except _user_errors() as err:
        raise _fail(err)
    table = Table(title=f"opd eval: {results['model']}  ({'greedy' if results['greedy'] else 'k=' + str(results['samples_per_prompt'])})")
    table.add_column("set")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, metrics in results["sets"].items():
        for key, value in metrics.items():
            table.add_row(name, key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"results: {output}")


def _evaluate_with_harness(model: str, tasks: str, config, overrides: list[str], limit, output, tasks_dir) -> None:
    from opd.harness import evaluate_source

    if limit is not None and limit >= 1:
        limit = int(limit)
    try:
        record = evaluate_source(model, tasks, config, overrides, limit, output, tasks_dir)
    except _user_errors() as err:
        raise _fail(err)
    console.print(record["table"], markup=False, highlight=False)
    for path in record["written"]:
        console.print(f"results: {path}")


@app.command()
def export(
    source: str = typer.Argument(..., help="a run directory, a checkpoint directory, or a model"),
    out: Path = typer.Argument(..., help="a new folder for the Hugging Face model"),
    merge: bool = typer.Option(False, "--merge", help="a LoRA adapter merged into its base: one full model"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace what OUT holds"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config for a bare model's settings"),
):
    """A plain Hugging Face model (from_pretrained, vLLM) or a LoRA adapter whose base loads with it."""
    from opd.export import export as export_model

    try:
        result = export_model(source, out, merge=merge, config=config, overwrite=overwrite)
    except _user_errors() as err:
        raise _fail(err)
    what = {"merged": "the LoRA adapter merged into its base", "full": "the full model",
            "adapter": f"the LoRA adapter (base: {result['base']})"}[result["kind"]]
    console.print(f"exported {what} to {result['path']}")


@app.command()
def tasks(
    name: str = typer.Argument(..., help="arithmetic, sums, knowledge or instruction"),
    out: Path = typer.Option(..., "--out", "-o", help="JSONL file to write"),
    split: str = typer.Option("train", help="train or eval"),
    count: Optional[int] = typer.Option(None, help="how many records (default: task.train_size / task.eval_size)"),
    documents: bool = typer.Option(False, "--documents", help="knowledge: write the mid-training documents instead"),
    overrides: Optional[List[str]] = typer.Argument(None, help="task settings, e.g. task.arithmetic.digits=3"),
):
    """Write a built-in task's prompts (with reference answers) or documents to JSONL."""
    from opd.tasks import documents as task_documents, make_records

    try:
        cfg = load_config(None, [f"task.name={name}", *(overrides or [])], base={"method": "sft", "student": {"tiny": {}}})
        records = [{"text": t} for t in task_documents(cfg.task)] if documents else make_records(cfg.task, split, count)
    except (ConfigError, ValueError) as err:
        raise _fail(err)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    console.print(f"wrote {len(records)} {'documents' if documents else split + ' records'} of task {name} to {out}")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a run directory")):
    """Write report.html (and PNGs) into a run directory: curves, and rollouts coloured by teacher KL."""
    from opd.report import ReportError, build_report
    from opd.run_dir import RunDirectoryError

    try:
        out = build_report(run_dir)
    except (ReportError, RunDirectoryError) as err:
        raise _fail(err)
    console.print(f"report: {out}")


@app.command()
def compare(
    run_dirs: List[Path] = typer.Argument(..., help="run directories (any methods; seeds of one config are grouped), "
                                                    "or a comparison's folder such as runs/demo"),
    target: float = typer.Option(0.95, "--target", help="the target, as a fraction of the teacher's accuracy"),
    out: Path = typer.Option(Path("runs/compare"), "--out", "-o", help="folder for comparison.json and report.html"),
):
    """Compare finished runs: start, final and best held-out accuracy, steps and FLOPs to the target
    (a fraction of the teacher's accuracy, measured by the runs at step 0) and to the common
    accuracy, wall time; comparison.json and report.html in --out."""
    from opd.compare import compare_runs, expand_run_dirs, group_runs, print_comparison
    from opd.report import build_comparison_report

    if not 0 < target <= 1:
        raise _fail(ConfigError(f"--target {target}: a fraction of the teacher's accuracy, in (0, 1]"))
    try:
        comparison = compare_runs(group_runs(expand_run_dirs(run_dirs)), out, target_fraction=target)
        report_path = build_comparison_report(out)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(err)
    print_comparison(comparison, console)
    console.print(f"comparison: {out / 'comparison.json'}   report: {report_path}")


@app.command()
def pipeline(
    config: Path = typer.Option(..., "--config", "-c", help="pipeline YAML: run_dir, common, phases"),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="dotted key=value settings for every phase, or for one: midtrain:train.steps=50"),
    resume: bool = typer.Option(False, "--resume", help="skip finished phases; continue the unfinished one"),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="instead of the file's run_dir"),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint",
                                          help="with --resume: read an older opd's checkpoint (a pickle, which can run "
                                               "code: only one whose origin you trust)"),
):
    """Phases in order, each an ordinary run (midtrain, sft, distill, rl) or an evaluation in its own
    folder; a phase's student or teacher can be an earlier phase's model ({phase: NAME}). Ends with
    a table of every evaluation after every phase."""
    from opd.pipeline import PipelineInterrupted, run_pipeline

    try:
        run_pipeline(config, overrides or [], resume, console, run_dir, trust_checkpoint=trust_checkpoint)
    except _user_errors() as err:
        raise _fail(err)
    except PipelineInterrupted as err:
        raise _interrupted(f"{err}: the same command with --resume continues the pipeline")
    except KeyboardInterrupt:
        raise _interrupted("interrupted without saving this step; --resume continues from the last checkpoint")


@app.command()
def demo(
    quick: bool = typer.Option(False, "--quick", help="a few steps only: checks the whole path, not the result"),
    run_dir: Path = typer.Option(Path("runs/demo"), "--run-dir", help="a new or empty folder"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier demo's folder (only a demo's)"),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="dotted key=value settings for every method, or for one: distill:optim.lr=3e-3"),
):
    """The embedded default: on-policy distillation, RL and SFT from one tiny student, same budget
    (arithmetic; teacher and student built locally, cached after the first run)."""
    from opd.cli.demo import run_demo

    try:
        run_demo(run_dir, quick, overrides or [], console, overwrite=overwrite)
    except _user_errors() as err:
        raise _fail(err)
    except KeyboardInterrupt:
        raise _interrupted(f"interrupted: the demo in {run_dir} is incomplete (models already built stay cached); "
                           f"run it again with --overwrite")


def _print_summary(summary: dict) -> None:
    start, end = summary.get("start_eval") or {}, summary.get("last_eval") or {}
    title = (f"opd run: {summary['run_dir']}  ({summary['steps_done']}/{summary['steps_planned']} steps"
             f"{', interrupted' if summary['interrupted'] else ''})")
    end_step = summary.get("last_eval_step")
    if not end:
        console.print(f"{title}: no evaluation set (set task.name or data.eval_prompts to measure the student)")
    else:
        _print_evals(title, start, end, end_step)
        ceilings = {k: v for k, v in start.items() if k.endswith("/teacher_accuracy")}
        if ceilings:  # measured once, at step 0
            console.print("the teacher on the same held-out prompts (its ceiling): " + ", ".join(
                f"{k.removeprefix('eval/').removesuffix('teacher_accuracy').strip('/') or 'accuracy'} {v:.3f}"
                for k, v in ceilings.items()))
        if end_step is not None and end_step != summary["steps_done"]:
            console.print(f"[yellow]no final evaluation: the last one is of step {end_step}[/yellow]")
    with_data = (f" (+{summary['flops_data_total']:.3g} to write the data)" if summary.get("flops_data_total") else "")
    console.print(f"tokens trained: {summary['tokens_trained_total']:,}   FLOPs: {summary['flops_total']:.3g}{with_data}"
                  f"   wall time in steps: {summary['wall_s_total']:.1f} s{_threads(summary)}   metrics: "
                  f"{summary['run_dir']}/metrics.jsonl")


def _threads(summary: dict) -> str:
    machine = summary.get("machine") or {}
    if "threads" not in machine:
        return ""
    return f" ({machine['threads']} threads on {machine['usable_cores']} usable cores)"


def _print_evals(title: str, start: dict, end: dict, end_step: int | None) -> None:
    table = Table(title=title)
    table.add_column("held-out prompts")
    table.add_column("start", justify="right")
    table.add_column("end" if end_step is None else f"step {end_step}", justify="right")
    names = {"teacher_kl": "teacher KL (sampled, per token)", "exact_kl": "exact reverse KL (per token)",
             "accuracy": "accuracy (held-out)", "instruction_accuracy": "instruction-level accuracy",
             "teacher_entropy": "teacher entropy on the student's samples",
             "entropy": "student entropy", "completion_len": "completion length"}
    for key in end:
        prefix, _, metric = key.rpartition("/")
        if metric in names:
            where = prefix.removeprefix("eval").strip("/")
            label = names[metric] + (f" [{where}]" if where else "")
            table.add_row(label, f"{start[key]:.3f}" if key in start else "-", f"{end[key]:.3f}")
    console.print(table)


if __name__ == "__main__":
    app()
