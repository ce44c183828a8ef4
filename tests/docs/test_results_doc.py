"""experiments/RESULTS.md states the setting of the code that ships: its setting block is what
experiments/write_results.py generates from opd/cli/demo.py's recipe, and every result that
recorded a recipe was made with that recipe."""

import importlib.util
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def _write_results():
    spec = importlib.util.spec_from_file_location("write_results", EXPERIMENTS / "write_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_md_states_the_demos_current_recipe():
    write_results = _write_results()
    text = (EXPERIMENTS / "RESULTS.md").read_text()
    block = text.split("<!-- results:setting -->\n", 1)[1].split("<!-- /results:setting -->", 1)[0]
    assert block == write_results.expected_setting() + "\n", \
        "RESULTS.md's setting differs from opd/cli/demo.py's recipe: run experiments/write_results.py (and rerun " \
        "the experiments if the recipe changed)"


def test_a_result_made_with_another_recipe_is_refused():
    from opd.cli.demo import demo_recipe

    write_results = _write_results()
    other = demo_recipe()
    other["student_start"] = {**other["student_start"], "steps": 700}
    with pytest.raises(SystemExit, match="student_start.steps"):
        write_results.check_recipes({"sft_vs_distill": {"recipe": other}}, demo_recipe())
    assert write_results.check_recipes({"a": {"recipe": demo_recipe()}, "b": {}}, demo_recipe()) == ["b"]


def test_tool_env_results_md_is_what_its_script_writes_from_results_json(tmp_path):
    """experiments/tool_env/RESULTS.md: every figure comes from results.json, through the script."""
    import json

    spec = importlib.util.spec_from_file_location("tool_env_run", EXPERIMENTS / "tool_env" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = json.loads((EXPERIMENTS / "tool_env" / "results.json").read_text())
    module.write_results(results, tmp_path / "RESULTS.md")
    assert (tmp_path / "RESULTS.md").read_text() == (EXPERIMENTS / "tool_env" / "RESULTS.md").read_text(), \
        "experiments/tool_env/RESULTS.md differs from its results.json: run experiments/tool_env/run.py --results"
    assert results["models"]["teacher"]["accuracy"] >= 0.8 > 0.2 >= results["models"]["no_tool"]["accuracy"]
