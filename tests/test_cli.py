"""The command line: the quick demo runs the whole path; bad input is one clear message, exit 2."""

import json

from typer.testing import CliRunner

from opd.cli.main import app

runner = CliRunner()


def test_quick_demo_runs_end_to_end(tmp_path):
    result = runner.invoke(app, ["demo", "--quick", "--run-dir", str(tmp_path / "demo"), "log.progress=false"])
    assert result.exit_code == 0, result.output
    assert "teacher KL (sampled, per token)" in result.output and "(4/4 steps)" in result.output
    rows = [json.loads(line) for line in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert (tmp_path / "demo" / "checkpoints" / "latest").read_text().strip() == "step_000004"


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
