"""Comparisons of methods: the target is the first evaluation at or above it, with its FLOPs."""

import json

import pytest

from opd.compare import add_common_target, config_key, method_row, reach
from opd.config import load_config


def _rows(accuracies, flops_per_step=10.0, data_per_step=0.0):
    return [{"step": 5 * i, "eval/accuracy": a, "flops_total": 5 * i * flops_per_step,
             "flops_total_with_data": 5 * i * (flops_per_step + data_per_step)} for i, a in enumerate(accuracies)]


def test_reach_is_the_first_evaluation_at_or_above_the_target():
    rows = _rows([0.2, 0.5, 0.79, 0.8, 0.7, 0.9], data_per_step=30.0)
    reached = reach(rows, 0.8)
    assert (reached.step, reached.flops, reached.flops_with_data) == (15, 150.0, 600.0)
    assert reach(rows, 0.95) is None
    assert reach(rows, 0.1).step == 0  # a start already at the target counts at step 0


def test_method_row_reads_a_finished_run(tmp_path):
    run = tmp_path / "rl"
    run.mkdir()
    rows = _rows([0.3, 0.6, 0.5])
    lines = rows[:1] + [{"step": 3, "loss": 1.0}] + rows[1:]  # training rows without evaluation are skipped
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (run / "summary.json").write_text(json.dumps({"steps_done": 10, "flops_total": 100.0,
                                                  "flops_total_with_data": 100.0, "wall_s_total": 7.0}))
    row = method_row("rl", run, target=0.55, extra_seconds=2.0)
    assert row["start_accuracy"] == 0.3 and row["final_accuracy"] == 0.5 and row["best_accuracy"] == 0.6
    assert row["steps_to_target"] == 5 and row["flops_to_target"] == 50.0 and row["wall_s"] == 9.0
    assert method_row("rl", run, target=0.7)["steps_to_target"] is None


def test_cache_keys_ignore_where_a_run_is_written_but_not_what_it_computes():
    base = ["method=sft", "student.tiny.hidden_size=32", "task.name=arithmetic"]
    a = load_config(None, [*base, "run_dir=a", "log.progress=false"])
    b = load_config(None, [*base, "run_dir=b"])
    c = load_config(None, [*base, "run_dir=a", "optim.lr=1e-3"])
    assert config_key(a) == config_key(b) != config_key(c)
    # teacher samples depend on the teacher, the task and the sampling, not on the student
    d = load_config(None, [*base, "student.tiny.hidden_size=64"])
    assert config_key(a, only=("teacher", "task", "sampling", "data")) == \
        config_key(d, only=("teacher", "task", "sampling", "data"))


def test_common_target_is_the_highest_accuracy_every_method_reached(tmp_path):
    table = []
    for name, accuracies in {"fast": [0.3, 0.6, 0.7], "slow": [0.3, 0.4, 0.5, 0.55]}.items():
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(accuracies)))
        (run / "summary.json").write_text(json.dumps({"steps_done": 15, "flops_total": 150.0,
                                                      "flops_total_with_data": 150.0, "wall_s_total": 1.0}))
        table.append(method_row(name, run, target=0.9))
    assert add_common_target(table) == 0.55  # the slow method's best
    fast, slow = table
    assert (fast["steps_to_common"], fast["flops_to_common"]) == (5, 50.0)
    assert (slow["steps_to_common"], slow["flops_to_common"]) == (15, 150.0)
    assert fast["steps_to_target"] is None and slow["steps_to_target"] is None


def test_seeds_of_one_config_are_one_row_of_their_mean_curve(tmp_path):
    runs = []
    for seed, accuracies in enumerate([[0.2, 0.4, 0.6], [0.2, 0.6, 0.4]]):
        run = tmp_path / f"seed{seed}"
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(accuracies)))
        (run / "summary.json").write_text(json.dumps({"steps_done": 10, "flops_total": 100.0 + seed,
                                                      "flops_total_with_data": 100.0 + seed, "wall_s_total": 2.0 * seed}))
        runs.append(run)
    row = method_row("distill", runs, target=0.5)
    assert row["seeds"] == 2 and row["start_accuracy"] == 0.2
    assert row["final_accuracy"] == row["best_accuracy"] == 0.5  # the mean curve: 0.2, 0.5, 0.5
    assert row["steps_to_target"] == 5 and row["flops_total"] == 100.5 and row["wall_s"] == 1.0


def test_a_run_over_several_sources_compares_by_their_mean_and_keeps_each(tmp_path):
    from io import StringIO

    from rich.console import Console

    from opd.compare import print_comparison

    run = tmp_path / "routed"
    run.mkdir()
    (run / "config.yaml").write_text("method: distill\ndata:\n  sources:\n  - {task: arithmetic, teacher: math}\n"
                                     "  - {prompts: data/chat.jsonl, name: chat, teacher: chat}\n")
    rows = [{"step": 5 * i, "eval/arithmetic/accuracy": a, "eval/chat/accuracy": c, "flops_total": 10.0 * i,
             "flops_total_with_data": 10.0 * i} for i, (a, c) in enumerate([(0.2, 0.4), (0.6, 0.3), (0.5, 0.5)])]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({"steps_done": 10, "flops_total": 20.0,
                                                  "flops_total_with_data": 20.0, "wall_s_total": 1.0}))
    row = method_row("routed", run, target=0.46)
    assert row["start_accuracy"] == pytest.approx(0.3) and row["final_accuracy"] == pytest.approx(0.5)
    assert row["steps_to_target"] == 10  # the means are 0.3, 0.45, 0.5
    assert row["sources"] == {"arithmetic": {"final_accuracy": 0.5, "best_accuracy": 0.6},
                              "chat": {"final_accuracy": 0.5, "best_accuracy": 0.5}}
    out = StringIO()
    print_comparison({"target": None, "common_target": None, "teacher_accuracy": None, "target_fraction": 0.95,
                      "table": [row]}, Console(file=out, width=120))
    assert "per source" in out.getvalue() and "0.500 (0.600)" in out.getvalue()
