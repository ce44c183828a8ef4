"""The command line: the quick demo runs the whole path; bad input is one clear message, exit 2."""

import json
from pathlib import Path

import pytest

from typer.testing import CliRunner

from opd.cli.main import app

runner = CliRunner()


def test_quick_demo_compares_three_methods_and_writes_the_report(tmp_path):
    """The whole demo path on a tiny budget: builds (cached), teacher samples, three runs, the table,
    comparison.json and report.html with its sections. Not the scientific result."""
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--quick", "--run-dir", str(out), "log.progress=false"])
    assert result.exit_code == 0, result.output
    for row in ("student start", "teacher", "distill", "rl", "sft", "steps to", "wall time"):
        assert row in result.output
    assert "--quick is a smoke test" in result.output  # and both tables say so
    assert "smoke test: one student start" in result.output and "smoke test: steps and" in result.output
    comparison = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in comparison["table"]] == ["distill", "rl", "sft"]
    # the models it printed are usable paths (not the build's .partial folder, nor checkpoints/latest)
    models = result.output.split("models (Hugging Face folders", 1)[1].splitlines()[1:6]
    paths = [line.split(None, 2)[-1].strip() for line in models]
    assert len(paths) == 5 and all((Path(p) / "config.json").is_file() and ".partial" not in p for p in paths), paths
    assert comparison["target"] == pytest.approx(0.95 * comparison["teacher_accuracy"])
    for r in comparison["table"]:
        evals = [json.loads(line) for line in (out / r["method"] / "metrics.jsonl").read_text().splitlines()
                 if "eval/accuracy" in line]
        assert [e["step"] for e in evals] == [0, 2, 4]
        assert r["start_accuracy"] == comparison["table"][0]["start_accuracy"]  # one start, one eval set
        assert r["final_accuracy"] == evals[-1]["eval/accuracy"] and r["steps"] == 4
    sft = comparison["table"][2]
    # SFT on teacher samples: both accountings, the data's cost is what the teacher paid to write it
    assert sft["flops_total_with_data"] > sft["flops_total"] > 0
    assert comparison["table"][0]["flops_total_with_data"] == comparison["table"][0]["flops_total"]
    # the common accuracy is the lowest best: every method reached it, the weakest at its best evaluation
    assert comparison["common_target"] == min(r["best_accuracy"] for r in comparison["table"])
    assert all(r["steps_to_common"] is not None for r in comparison["table"])

    page = (out / "report.html").read_text()
    for section in ('id="table"', 'id="curves"', 'id="rollouts"', "accuracy_vs_step.png", "accuracy_vs_flops.png",
                    "teacher_kl_vs_step.png", 'class="tok"'):
        assert section in page
    for png in ("accuracy_vs_step.png", "accuracy_vs_flops.png", "teacher_kl_vs_step.png"):
        assert (out / png).stat().st_size > 1000
    # `opd report` on the folder rebuilds the comparison page
    (out / "report.html").unlink()
    assert runner.invoke(app, ["report", str(out)]).exit_code == 0 and 'id="table"' in (out / "report.html").read_text()


def test_distill_reports_config_errors_by_key(tmp_path):
    result = runner.invoke(app, ["distill", "student.tiny.hidden_size=32", "teacher.tiny.hidden_sise=64"])
    assert result.exit_code == 2
    assert "teacher.tiny.hidden_sise: unknown key" in result.output and "Traceback" not in result.output


def test_distill_reports_bad_prompt_files(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a"}\n{oops}\n')
    result = runner.invoke(app, ["distill", f"run_dir={tmp_path / 'run'}", "student.tiny.hidden_size=32",
                                 "teacher.tiny.hidden_size=32", f"data.prompts={bad}", "log.progress=false"])
    assert result.exit_code == 2
    assert f"{bad}:2: not valid JSON" in result.output


def test_a_config_naming_another_method_is_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("method: rl\nstudent: {tiny: {hidden_size: 32}}\n")
    result = runner.invoke(app, ["sft", "--config", str(config)])
    assert result.exit_code == 2 and "says method: rl, but this is `opd sft`" in result.output


def test_rl_without_a_grader_is_refused_before_training(tmp_path):
    result = runner.invoke(app, ["rl", f"run_dir={tmp_path / 'run'}", "student.tiny.hidden_size=32", "log.progress=false"])
    assert result.exit_code == 2 and "method=rl needs a reward for every prompt" in result.output


def test_tasks_sample_sft_and_eval_from_the_command_line(tmp_path):
    """The whole off-policy path: write task data, let a teacher sample it, SFT on it, evaluate."""
    data = tmp_path / "arith.jsonl"
    result = runner.invoke(app, ["tasks", "arithmetic", "--out", str(data), "--count", "12"])
    assert result.exit_code == 0, result.output
    assert len(data.read_text().splitlines()) == 12

    common = ["student.tiny.hidden_size=32", "teacher.tiny.hidden_size=32", "log.progress=false",
              "sampling.max_new_tokens=8", "train.prompts_per_step=4"]
    samples = tmp_path / "teacher.jsonl"
    result = runner.invoke(app, ["sample", "--out", str(samples), f"data.prompts={data}", *common])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 12 * 4 and all(r["cost"]["flops"] > 0 and "completion" in r and "score" in r for r in rows)

    run = tmp_path / "sft"
    result = runner.invoke(app, ["sft", f"run_dir={run}", f"data.completions={samples}", "train.steps=2",
                                 "data.eval_holdout=4", "eval.samples_per_prompt=2", *common])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["flops_data_total"] > 0 and summary["flops_total_with_data"] > summary["flops_total"] > 0
    assert "eval/accuracy" in summary["last_eval"] and "eval/teacher_kl" in summary["last_eval"]

    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", str(run), "--task", "arithmetic", "--task", "instruction", "-k", "2",
                                 "--output", str(out), "task.eval_size=6"])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert set(results["sets"]) == {"arithmetic", "instruction"} and results["checkpoint"].endswith("step_000002")
    assert results["sets"]["arithmetic"]["prompts"] == 6 and "accuracy" in results["sets"]["instruction"]
    assert any(k.startswith("check/") for k in results["sets"]["instruction"])
    assert "accuracy" in result.output
