"""`opd compare` on finished runs of different methods, and the teacher's ceiling that every run
with a teacher measures at step 0."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from helpers import TINY_RUN
from opd.cli.main import app
from opd.config import TinyModelConfig
from opd.loop import train
from opd.config import load_config
from opd.tiny import build_tiny_model, build_tiny_tokenizer

runner = CliRunner()
QUICK_TASK = ["task.name=arithmetic", "task.train_size=32", "task.eval_size=8", "train.steps=4", "eval.every=2",
              "eval.samples_per_prompt=2", "sampling.max_new_tokens=12"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A saved tiny teacher, and a distill and an rl run from one student with it (a few seconds each)."""
    root = tmp_path_factory.mktemp("compare")
    tokenizer = build_tiny_tokenizer()
    teacher = build_tiny_model(TinyModelConfig(hidden_size=64, seed=2, pretrain_steps=200), tokenizer)
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    base = [o for o in TINY_RUN if not o.startswith("teacher.")] + [f"teacher.path={root / 'teacher'}", *QUICK_TASK]
    for method, extra in {"distill": [], "rl": ["loss.kl_coef=0", "optim.lr=1e-3"]}.items():
        train(load_config(None, [*base, f"method={method}", f"run_dir={root / method}", *extra]))
    return root


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_compare_gives_the_cells_that_the_metrics_say(runs):
    out = runs / "cmp"
    result = runner.invoke(app, ["compare", str(runs / "distill"), str(runs / "rl"), "--target", "0.5",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    comparison = json.loads((out / "comparison.json").read_text())
    teacher = _metrics(runs / "distill")[0]["eval/teacher_accuracy"]
    assert comparison["teacher_accuracy"] == pytest.approx(teacher) and comparison["target"] == pytest.approx(0.5 * teacher)

    # every cell, computed here from the runs' own files
    table = {r["method"]: r for r in comparison["table"]}
    assert set(table) == {"distill", "rl"}
    bests = {}
    for method, row in table.items():
        evals = [r for r in _metrics(runs / method) if "eval/accuracy" in r]
        accuracies = [r["eval/accuracy"] for r in evals]
        summary = json.loads((runs / method / "summary.json").read_text())
        assert [r["step"] for r in evals] == [0, 2, 4]
        assert (row["start_accuracy"], row["final_accuracy"], row["best_accuracy"]) == \
            (accuracies[0], accuracies[-1], max(accuracies))
        reached = [r for r in evals if r["eval/accuracy"] >= 0.5 * teacher - 1e-9]
        assert row["steps_to_target"] == (reached[0]["step"] if reached else None)
        assert row["flops_to_target"] == (reached[0]["flops_total"] if reached else None)
        assert row["flops_total"] == summary["flops_total"] and row["wall_s"] == summary["wall_s_total"]
        bests[method] = max(accuracies)
    common = min(bests.values())
    assert comparison["common_target"] == common
    for method, row in table.items():
        first = next(r for r in _metrics(runs / method) if r.get("eval/accuracy", -1) >= common - 1e-9)
        assert (row["steps_to_common"], row["flops_to_common"]) == (first["step"], first["flops_total"])

    for text in ("distill", "rl", "teacher", f"{teacher:.3f}", "steps to"):
        assert text in result.output
    page = (out / "report.html").read_text()
    assert 'id="table"' in page and (out / "accuracy_vs_flops.png").stat().st_size > 1000


def test_compare_groups_seeds_of_one_config_and_refuses_what_is_not_a_run(runs, tmp_path):
    result = runner.invoke(app, ["compare", str(tmp_path), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 2 and "not a run directory of opd" in result.output
    from opd.compare import group_runs

    # a second seed of the distill config is grouped with the first; rl stays apart
    seed = tmp_path / "distill_seed1"
    seed.mkdir()
    tree = yaml.safe_load((runs / "distill" / "config.yaml").read_text())
    tree["train"]["seed"], tree["run_dir"] = 1, str(seed)
    (seed / "config.yaml").write_text(yaml.safe_dump(tree))
    groups = group_runs([runs / "distill", seed, runs / "rl"])
    assert groups == {"distill": [runs / "distill", seed], "rl": [runs / "rl"]}


def test_the_teachers_step_0_accuracy_is_what_opd_eval_gives_the_teacher(runs, tmp_path):
    logged = _metrics(runs / "distill")[0]
    assert 0.0 <= logged["eval/teacher_accuracy"] <= 1.0
    out = tmp_path / "teacher.json"
    result = runner.invoke(app, ["eval", str(runs / "teacher"), "--config", str(runs / "distill" / "config.yaml"),
                                 "--output", str(out)])
    assert result.exit_code == 0, result.output
    evaluated = json.loads(out.read_text())["sets"]["arithmetic"]
    assert logged["eval/teacher_accuracy"] == evaluated["accuracy"]
    # the teacher audit: its mean entropy on the student's samples, at every evaluation
    assert all(r["eval/teacher_entropy"] > 0 for r in _metrics(runs / "distill") if "eval/accuracy" in r)
    # the rl run (kl_coef 0: the teacher only evaluates) measured the same ceiling
    assert _metrics(runs / "rl")[0]["eval/teacher_accuracy"] == logged["eval/teacher_accuracy"]
