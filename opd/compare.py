"""Several methods trained from one start under one budget, and compared: the machinery of
`opd demo` and of the experiments in experiments/.

    cached_model(cfg)            a run trained once and cached: returns its final model directory
    cached_teacher_samples(cfg)  teacher completions written once and cached (SFT's data)
    sft_on_teacher_samples(cfg)  an SFT config pointed at as many teacher completions as it trains on
    model_accuracy(cfg, model)   pass@1 of any model on cfg's eval prompts, with cfg's eval settings
    run_comparison(...)          each method's run in out_dir/<name>, then comparison.json and a table
    reach(rows, target)          the first evaluation at accuracy >= target: its step and FLOPs

Every method is evaluated on the same prompts with the same seed, so their start rows are equal and
their curves differ only by training.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from opd.config import ModelConfig, RunConfig
from opd.models import cache_root

# Keys that do not change what a run computes: left out of cache keys.
_COSMETIC = ("run_dir", "log", "checkpoint")
TARGET_FRACTION = 0.95  # of the teacher's accuracy: what "reaching the teacher" means in a comparison


def config_key(cfg: RunConfig, *extra, only: tuple[str, ...] = ()) -> str:
    """A hash of everything that decides what a run computes (or of the sections `only`), and of
    the tiny tokenizer, which the code builds, so a change to it invalidates cached tiny models."""
    tree = {k: v for k, v in cfg.model_dump(mode="json").items()
            if k not in _COSMETIC and (not only or k in only)}
    # Settings added later, at their defaults, are left out, so that models cached before keep their keys.
    if tree.get("eval", {}).get("teacher_accuracy") is True:  # adds metrics; the weights are the same
        del tree["eval"]["teacher_accuracy"]
    for role in ("student", "teacher"):
        tiny = (tree.get(role) or {}).get("tiny")
        if tiny is not None and not tiny.get("tokenizer_corpus"):
            del tiny["tokenizer_corpus"]
    tokenizer = ""
    tiny = [spec.tiny for spec in (cfg.student, cfg.teacher) if spec is not None and spec.tiny is not None]
    if tiny:
        from opd.tiny import _tokenizer_json

        corpus = tuple(tiny[0].tokenizer_corpus)  # empty: the key of a run from before the field existed
        tokenizer = hashlib.sha256(_tokenizer_json(768, *([corpus] if corpus else [])).encode()).hexdigest()
        if corpus:  # the files' contents, not only their names
            tokenizer += "".join(hashlib.sha256(open(f, "rb").read()).hexdigest() for f in corpus)
    return hashlib.sha256(json.dumps([tree, tokenizer, *extra], sort_keys=True).encode()).hexdigest()[:16]


def cached_model(cfg: RunConfig, console: Console | None = None, label: str = "") -> tuple[Path, dict]:
    """Train `cfg` once (its run_dir is ignored: the run lives under $OPD_CACHE/runs/<key>) and
    return (its final model directory, its summary). An interrupted build resumes from its last
    checkpoint the next time; a finished one is reused."""
    from opd.learner.checkpoint import latest_checkpoint
    from opd.loop import train

    console = console or Console()
    key = config_key(cfg)
    done = cache_root() / "runs" / key
    if not (done / "summary.json").is_file():
        partial = done.with_name(key + ".partial")
        resume = latest_checkpoint(partial) is not None
        if partial.exists() and not resume:
            shutil.rmtree(partial)
        console.print(f"building {label or cfg.method} ({'resuming' if resume else 'once, then cached'} in {partial})")
        run_cfg = cfg.model_copy(update={"run_dir": str(partial),
                                         "checkpoint": cfg.checkpoint.model_copy(update={"keep_last": 1})})
        summary = train(run_cfg, resume=resume, console=console)
        if summary["interrupted"]:
            raise KeyboardInterrupt
        os.replace(partial, done)
    summary = json.loads((done / "summary.json").read_text())
    return latest_checkpoint(done) / "model", summary


def cached_teacher_samples(cfg: RunConfig, console: Console | None = None) -> tuple[Path, dict]:
    """`opd sample` for cfg's training prompts, once: (the JSONL, what writing it cost)."""
    from opd.sample_command import write_teacher_samples

    console = console or Console()
    # What the samples depend on: not the student, nor how SFT will train on them.
    key = config_key(cfg, cfg.train.seed, only=("teacher", "task", "sampling", "data"))
    target = cache_root() / "samples" / f"{key}.jsonl"
    info_path = target.with_suffix(".json")
    if not info_path.is_file():
        console.print(f"the teacher writes SFT's data ({target}, once, then cached)")
        info = write_teacher_samples(cfg, target, "train", console=console)
        info_path.write_text(json.dumps(info))
    return target, json.loads(info_path.read_text())


def sft_on_teacher_samples(sft_cfg: RunConfig, console: Console | None = None) -> tuple[RunConfig, dict]:
    """`sft_cfg` training on teacher completions (off-policy distillation): the teacher answers as
    many training prompts, `sampling.samples_per_prompt` times each, as the run's steps consume.
    Returns the config with data.completions set, and what writing the samples cost."""
    per_prompt = sft_cfg.sampling.samples_per_prompt
    needed = -(-sft_cfg.train.steps * sft_cfg.train.prompts_per_step // per_prompt)  # ceiling
    samples, written = cached_teacher_samples(
        sft_cfg.model_copy(update={"task": sft_cfg.task.model_copy(update={"train_size": needed})}), console)
    return sft_cfg.model_copy(update={"data": sft_cfg.data.model_copy(update={"completions": str(samples)})}), written


def model_accuracy(cfg: RunConfig, model: ModelConfig) -> float:
    """pass@1 of `model` on cfg's eval prompts, sampled exactly as the runs'
    evaluations are (same prompts, seed, k and length), so it is comparable with their curves."""
    from opd.data import encode_prompts
    from opd.evaluation import evaluate_prompts
    from opd.data.sources import prompt_records
    from opd.models import load_model, pick_device
    from opd.sampler.hf import HFSampler

    loaded, tokenizer = load_model(model, pick_device(cfg.train.device))
    prompts, _ = encode_prompts(prompt_records(cfg, "eval"), tokenizer, cfg.data.max_prompt_tokens, cfg.data.overlong)
    metrics, _ = evaluate_prompts(prompts, HFSampler(loaded, tokenizer, cfg.sampling), cfg.eval,
                                  cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens,
                                  default_grader=cfg.data.grader)
    if "accuracy" not in metrics:
        raise ValueError("model_accuracy needs graded eval prompts (a task or data.grader)")
    return metrics["accuracy"]


@dataclass
class Reached:
    step: int
    flops: float  # student + teacher FLOPs of training (data given)
    flops_with_data: float  # plus what writing the training data cost (SFT on teacher samples)


def source_labels(run_dir: Path) -> list[str]:
    """The eval set of each of a run's data.sources (eval/<label>/...); [] for a run of one source."""
    import yaml

    from opd.config import SourceConfig

    path = Path(run_dir) / "config.yaml"
    tree = yaml.safe_load(path.read_text()) or {} if path.is_file() else {}
    return [SourceConfig.model_validate(entry).label for entry in (tree.get("data") or {}).get("sources") or []]


def with_overall_accuracy(rows: list[dict], sources: list[str]) -> list[dict]:
    """A run over several sources logs eval/<source>/accuracy and no eval/accuracy: give each of its
    evaluations the mean over its sources (every skill counts alike, whatever its weight in training),
    so that it compares with other runs by one number; the sources' own stay beside it."""
    if not sources:
        return rows
    out = []
    for r in rows:
        per_source = [r.get(f"eval/{s}/accuracy") for s in sources]
        if "eval/accuracy" not in r and all(a is not None for a in per_source):
            r = {**r, "eval/accuracy": sum(per_source) / len(per_source)}
        out.append(r)
    return out


def eval_rows(run_dir: Path) -> list[dict]:
    from opd.run_dir import read_metrics

    rows = with_overall_accuracy(read_metrics(Path(run_dir) / "metrics.jsonl"), source_labels(run_dir))
    return [r for r in rows if "eval/accuracy" in r]


def mean_rows(run_dirs: list[Path]) -> list[dict]:
    """The metrics of several seeds of one config as one run: at every step that all of them
    logged, the mean of each number they all logged (one run: its rows as they are)."""
    from opd.run_dir import read_metrics

    per_run = [with_overall_accuracy(read_metrics(Path(d) / "metrics.jsonl"), source_labels(d)) for d in run_dirs]
    if len(per_run) == 1:
        return per_run[0]
    by_step = [{r["step"]: r for r in rows} for rows in per_run]
    out = []
    for step in sorted(set.intersection(*(set(b) for b in by_step))):
        rows = [b[step] for b in by_step]
        keys = set.intersection(*(set(r) for r in rows))
        out.append({k: sum(r[k] for r in rows) / len(rows) if k != "step" else step for k in sorted(keys)
                    if all(isinstance(r[k], (int, float)) and not isinstance(r[k], bool) for r in rows)})
    return out


def benchmark_scores(rows: list[dict], last: bool = True) -> dict[str, float]:
    """The harness's scores (eval.lm_eval: lm_eval/<task>/<metric>) of the last (or first)
    evaluation that logged each, keyed without the prefix."""
    scores = {}
    for r in (rows if last else reversed(rows)):
        scores.update({k.removeprefix("lm_eval/"): v for k, v in r.items() if k.startswith("lm_eval/")})
    return dict(sorted(scores.items()))


def logged_teacher_accuracy(run_dirs: list[Path]) -> float | None:
    """The teacher's accuracy that the runs measured at step 0 (eval/teacher_accuracy; the mean when
    several runs logged one); None when none did (no teacher, a served one, or an older run)."""
    values = []
    for d in run_dirs:
        first = next(iter(eval_rows(d)), {})
        if first.get("eval/teacher_accuracy") is not None:
            values.append(first["eval/teacher_accuracy"])
    return sum(values) / len(values) if values else None


def reach(rows: list[dict], target: float) -> Reached | None:
    """The first evaluation whose accuracy is at least `target` (None: never within the run)."""
    for r in rows:
        if r["eval/accuracy"] >= target - 1e-9:
            return Reached(r["step"], r["flops_total"], r["flops_total_with_data"])
    return None


def reached_fields(rows: list[dict], target: float, suffix: str) -> dict:
    """steps_to_<suffix>, flops_to_<suffix> and flops_with_data_to_<suffix> (None: not reached)."""
    reached = reach(rows, target)
    return {f"steps_to_{suffix}": reached.step if reached else None,
            f"flops_to_{suffix}": reached.flops if reached else None,
            f"flops_with_data_to_{suffix}": reached.flops_with_data if reached else None}


def method_row(name: str, run_dir: Path | list[Path], target: float | None, extra_seconds: float = 0.0) -> dict:
    """One line of the comparison table, from a finished run's files, or from several seeds of one
    config (their mean curve: accuracies, FLOPs and wall time are means over the seeds)."""
    run_dirs = [Path(d) for d in (run_dir if isinstance(run_dir, list) else [run_dir])]
    summaries = [json.loads((d / "summary.json").read_text()) for d in run_dirs]
    all_rows = mean_rows(run_dirs)
    rows = [r for r in all_rows if "eval/accuracy" in r]

    def mean(key: str) -> float:
        return sum(s[key] for s in summaries) / len(summaries)

    reached = reached_fields(rows, target, "target") if target is not None else \
        {"steps_to_target": None, "flops_to_target": None, "flops_with_data_to_target": None}
    return {
        "method": name,
        "run_dir": str(run_dirs[0]),
        "run_dirs": [str(d) for d in run_dirs],
        "seeds": len(run_dirs),
        "start_accuracy": rows[0]["eval/accuracy"] if rows else None,
        "final_accuracy": rows[-1]["eval/accuracy"] if rows else None,
        "best_accuracy": max(r["eval/accuracy"] for r in rows) if rows else None,
        "steps": max(s["steps_done"] for s in summaries),
        "lm_eval": benchmark_scores(all_rows),  # the harness's last scores (eval.lm_eval), {} when none
        # data.sources: each source's final and best accuracy (eval/<source>/accuracy), {} for one source
        "sources": {s: {"final_accuracy": per[-1], "best_accuracy": max(per)}
                    for s in source_labels(run_dirs[0])
                    if (per := [r[f"eval/{s}/accuracy"] for r in rows if f"eval/{s}/accuracy" in r])},
        **reached,
        "flops_total": mean("flops_total"),
        "flops_total_with_data": mean("flops_total_with_data"),
        # Time in the steps (sampling, scoring, training), not in evaluations; SFT adds the time
        # the teacher took to write its data.
        "wall_s": mean("wall_s_total") + extra_seconds,
    }


def run_comparison(out_dir: Path, runs: dict[str, RunConfig], teacher_accuracy: float | None = None,
                   target_fraction: float = TARGET_FRACTION,
                   extra_seconds: dict[str, float] | None = None, console: Console | None = None,
                   notes: dict | None = None) -> dict:
    """Train every config into out_dir/<name>, then compare them (compare_runs): per method, final
    accuracy and the steps and FLOPs to reach target_fraction of the teacher's accuracy (by default
    the one the runs measured at step 0)."""
    from opd.loop import train

    console = console or Console()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, cfg in runs.items():
        summary = train(cfg.model_copy(update={"run_dir": str(out_dir / name)}), console=console)
        if summary["interrupted"]:
            raise KeyboardInterrupt
    return compare_runs({name: [out_dir / name] for name in runs}, out_dir, target_fraction, teacher_accuracy,
                        extra_seconds, notes)


def compare_runs(groups: dict[str, list[Path]], out_dir: Path, target_fraction: float = TARGET_FRACTION,
                 teacher_accuracy: float | None = None, extra_seconds: dict[str, float] | None = None,
                 notes: dict | None = None) -> dict:
    """The comparison of finished runs (`opd compare`, `opd demo`, the experiments): one row per
    group of runs (seeds of one config), written to out_dir/comparison.json and returned. The
    target is target_fraction of the teacher's accuracy (by default the one the runs logged at
    step 0; None without a teacher, then only the common accuracy is compared)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if teacher_accuracy is None:
        teacher_accuracy = logged_teacher_accuracy([d for dirs in groups.values() for d in dirs])
    target = None if teacher_accuracy is None else target_fraction * teacher_accuracy
    table = [method_row(name, dirs, target, (extra_seconds or {}).get(name, 0.0)) for name, dirs in groups.items()]
    missing = [r["method"] for r in table if r["best_accuracy"] is None]
    if missing:
        raise ValueError(f"no graded evaluation (eval/accuracy) in the metrics of {', '.join(missing)}: runs are "
                         f"compared by held-out accuracy, so they need a task or graded eval prompts")
    common = add_common_target(table)
    comparison = {"teacher_accuracy": teacher_accuracy, "target_fraction": target_fraction, "target": target,
                  "common_target": common,
                  # paths relative to the comparison's folder, so that the two can move together
                  "runs": {name: [os.path.relpath(d, out_dir) for d in dirs] for name, dirs in groups.items()},
                  "table": table, **(notes or {})}
    (out_dir / "comparison.json").write_text(json.dumps(comparison, indent=2))
    return comparison


def add_common_target(table: list[dict]) -> float:
    """The blog compares compute "to reach the same accuracy". When a target fixed in advance (95%
    of the teacher) is out of reach in the budget, the highest accuracy that every method reached
    (the lowest of their best evaluations) still gives one: each row gets the steps and FLOPs at
    which it first got there. Returns that accuracy."""
    common = min(r["best_accuracy"] for r in table)
    for r in table:
        rows = [x for x in mean_rows(r.get("run_dirs") or [r["run_dir"]]) if "eval/accuracy" in x]
        r.update(reached_fields(rows, common, "common"))
    return common


# ----------------------------------------------------------------------------------------------
# `opd compare RUN_DIR...`: which runs are seeds of one config, and what to call each group

_NOT_THE_RUN = ("run_dir", "log", "checkpoint")  # where and how a run is logged, not what it computes


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories; a comparison's folder (`opd demo`'s) stands for the runs it compared."""
    out = []
    for path in map(Path, paths):
        if (path / "metrics.jsonl").is_file():
            out.append(path)
        elif (path / "comparison.json").is_file():
            runs = json.loads((path / "comparison.json").read_text())["runs"]
            out += [path / rel for rels in runs.values() for rel in ([rels] if isinstance(rels, str) else rels)]
        else:
            raise FileNotFoundError(f"{path}: not a run directory of opd (no metrics.jsonl) nor a comparison "
                                    f"(no comparison.json)")
    return out


def group_runs(run_dirs: list[Path]) -> dict[str, list[Path]]:
    """Runs whose configs differ only in train.seed are seeds of one config: one group. A group is
    named by its method when no other group has that method, else by its first run's folder."""
    import yaml

    groups: dict[str, list[Path]] = {}
    methods: dict[str, str] = {}
    for d in run_dirs:
        tree = yaml.safe_load((Path(d) / "config.yaml").read_text()) or {}
        tree = {k: v for k, v in tree.items() if k not in _NOT_THE_RUN}
        tree.get("train", {}).pop("seed", None)
        key = json.dumps(tree, sort_keys=True, default=str)
        groups.setdefault(key, []).append(Path(d))
        methods[key] = tree.get("method", "?")
    counts: dict[str, int] = {}
    for key in groups:
        counts[methods[key]] = counts.get(methods[key], 0) + 1
    named = {}
    for key, dirs in groups.items():
        name = methods[key] if counts[methods[key]] == 1 else dirs[0].name
        while name in named:  # two folders of one name in different places
            name = str(dirs[0])
        named[name] = dirs
    return named


# ----------------------------------------------------------------------------------------------
# The printed tables (`opd demo`, `opd compare`)


def print_comparison(comparison: dict, console: Console, title_prefix: str = "") -> None:
    """Two tables (they fit an 80-column terminal): accuracy and cost per method, then the steps and
    FLOPs at which each method first reached the target (and the common accuracy). `title_prefix`
    goes before both titles (the quick demo's "smoke test: ")."""
    target, common, teacher = comparison["target"], comparison.get("common_target"), comparison["teacher_accuracy"]
    rows = comparison["table"]
    one_start = len({r["start_accuracy"] for r in rows}) == 1  # methods from one start: one row for it

    def label(r: dict) -> str:
        return r["method"] + (f" ({r['seeds']} seeds)" if r.get("seeds", 1) > 1 else "")

    results = Table(title=title_prefix + ("one student start, one budget" if one_start else "runs compared"))
    columns = ("", *(() if one_start else ("start",)), "accuracy", "best", "FLOPs", "wall time")
    for column in columns:
        results.add_column(column, justify="right" if column else "left")
    pad = [] if one_start else [""]
    if one_start:
        results.add_row("student start", f"{rows[0]['start_accuracy']:.3f}")
    results.add_row("teacher", *pad, "-" if teacher is None else f"{teacher:.3f}")
    for r in rows:
        results.add_row(label(r), *([] if one_start else [f"{r['start_accuracy']:.3f}"]), f"{r['final_accuracy']:.3f}",
                        f"{r['best_accuracy']:.3f}", f"{r['flops_total']:.2e}", f"{r['wall_s']:.0f} s")
        if r["flops_total_with_data"] > r["flops_total"]:  # SFT on teacher samples: the data's cost paid too
            results.add_row(f"  {r['method']}, data paid", *pad, "", "", f"{r['flops_total_with_data']:.2e}", "")
    console.print(results)

    levels = {**({"target": target} if target is not None else {}), **({"common": common} if common is not None else {})}
    title = "steps and FLOPs to " + " and to ".join(
        ([f"the target ({comparison['target_fraction']:.0%} of the teacher)"] if target is not None else [])
        + (["the common accuracy"] if common is not None else []))
    reaching = Table(title=title_prefix + title)
    reaching.add_column("", no_wrap=True)
    for level in levels.values():
        reaching.add_column(f"steps to {level:.3f}", justify="right")
        reaching.add_column(f"FLOPs to {level:.3f}", justify="right")

    def cells(r: dict, flops: str, with_steps: bool) -> list[str]:  # steps and FLOPs to each level
        out = []
        for suffix in levels:
            step = r.get(f"steps_to_{suffix}")
            out += ["" if not with_steps else "not reached" if step is None else str(step),
                    "-" if step is None else f"{r[f'{flops}_to_{suffix}']:.2e}"]
        return out

    for r in rows:
        reaching.add_row(label(r), *cells(r, "flops", with_steps=True))
        if r["flops_total_with_data"] > r["flops_total"]:  # the steps are the same; only the FLOPs differ
            reaching.add_row(f"  {r['method']}, data paid", *cells(r, "flops_with_data", with_steps=False))
    console.print(reaching)
    names = sorted({k for r in rows for k in r.get("lm_eval", {})})
    if names:  # eval.lm_eval: the harness's benchmarks, one column per task and metric
        benchmarks = Table(title="lm-eval: the last evaluation of each run")
        benchmarks.add_column("")
        for name in names:
            benchmarks.add_column(name.replace("/", "\n"), justify="right")
        for r in rows:
            benchmarks.add_row(label(r), *(_number(r.get("lm_eval", {}).get(n)) for n in names))
        console.print(benchmarks)
    sources = sorted({k for r in rows for k in r.get("sources", {})})
    if sources:  # data.sources: each skill's accuracy (a run's overall accuracy is their mean)
        per_source = Table(title="per source: final accuracy (best)")
        per_source.add_column("")
        for name in sources:
            per_source.add_column(name, justify="right")
        for r in rows:
            got = r.get("sources", {})
            per_source.add_row(label(r), *(f"{got[n]['final_accuracy']:.3f} ({got[n]['best_accuracy']:.3f})"
                                           if n in got else "-" for n in sources))
        console.print(per_source)
    console.print("accuracy: sampled pass@1 on held-out problems; FLOPs: student + teacher, training steps only "
                  "(\"data paid\" adds the teacher's sampling of SFT's data); wall time: training steps, SFT's "
                  "including the teacher's sampling")
    if teacher is None:
        console.print("no teacher accuracy: none of the runs measured an in-process teacher at step 0, so there is "
                      "no target, only the common accuracy")
    if common is not None:
        console.print(f"{common:.3f}, the common accuracy: the highest that every method reached (the lowest of "
                      "their best evaluations), to compare steps and FLOPs at one accuracy when the target is out "
                      "of reach")


def _number(value) -> str:
    return "-" if value is None else f"{value:.3f}"
