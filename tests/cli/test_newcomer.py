"""What a newcomer meets first: --version, help that shows flags as flags, clear pointers when a
path is not what they think."""

import json

from typer.testing import CliRunner

from opd.cli.main import app

runner = CliRunner()


def test_version_and_flags_in_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("opd ")
    help_text = runner.invoke(app, ["distill", "--help"]).output
    assert "--resume" in help_text and "<bool>" not in help_text


def test_eval_of_a_comparison_folder_names_its_runs(tmp_path):
    for name in ("distill", "rl"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text("method: distill\n")
    (tmp_path / "comparison.json").write_text(json.dumps({"runs": {"distill": "distill", "rl": "rl"}}))
    result = runner.invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 2
    assert "is a comparison of runs" in result.output and f"opd eval {tmp_path / 'distill'}" in result.output


def test_a_missing_local_model_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    result = runner.invoke(app, ["eval", "models/student", "--task", "arithmetic"])
    assert result.exit_code == 2 and "not found" in result.output
    assert "huggingface-cli download" not in result.output and "example_own_data.yaml" in result.output
