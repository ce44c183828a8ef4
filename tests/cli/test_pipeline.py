"""`opd pipeline`: phases in order, each an ordinary run in its own folder, models handed on by
{phase: NAME}; --resume skips finished phases and continues the unfinished one."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from opd.cli.main import app
from opd.pipeline import PipelineInterrupted, run_pipeline

runner = CliRunner()

PIPELINE = {
    "common": {
        "task": {"train_size": 32, "eval_size": 4, "knowledge": {"people": 4}},
        "eval": {"tasks": ["knowledge", "instruction"], "samples_per_prompt": 1},
        "sampling": {"max_new_tokens": 12, "samples_per_prompt": 2},
        "data": {"eval_holdout": 0, "max_seq_tokens": 64},
        "train": {"prompts_per_step": 4, "micro_batch_size": 8},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "log": {"progress": False, "tensorboard": False, "rollouts_every": 0},
        "checkpoint": {"every": 0},
    },
    "phases": {
        "base": {"method": "eval", "student": {"tiny": {"hidden_size": 32, "seed": 2, "pretrain_steps": 20}}},
        "midtrain": {"method": "midtrain", "student": {"phase": "base"}, "task": {"name": "knowledge"},
                     "data": {"chat_ratio": 0.5}, "train": {"steps": 4}},
        "restore": {"method": "distill", "student": {"phase": "midtrain"}, "teacher": {"phase": "base"},
                    "task": {"name": "instruction"}, "train": {"steps": 2}},
    },
}


def test_three_phases_run_in_order_and_resume_skips_the_finished_ones(tmp_path):
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), **PIPELINE}, sort_keys=False))
    run = tmp_path / "run"

    # stopped in phase 2 after 2 of its 4 steps, as a Ctrl-C would (a checkpoint is saved)
    with pytest.raises(PipelineInterrupted):
        run_pipeline(config, stop_after=("midtrain", 2))
    base_results = (run / "base" / "results.json").stat().st_mtime_ns
    assert not (run / "restore").exists()

    result = runner.invoke(app, ["pipeline", "--config", str(config)])
    assert result.exit_code == 2 and "--resume" in result.output  # never silently redone over

    result = runner.invoke(app, ["pipeline", "--config", str(config), "--resume"])
    assert result.exit_code == 0, result.output
    assert "phase base: finished earlier, skipped" in result.output
    assert (run / "base" / "results.json").stat().st_mtime_ns == base_results  # phase 1 was not run again
    assert "resuming from" in result.output  # phase 2 continued from its checkpoint
    midtrain_steps = [json.loads(line)["step"] for line in (run / "midtrain" / "metrics.jsonl").read_text().splitlines()]
    assert midtrain_steps == [0, 1, 2, 3, 4]

    state = json.loads((run / "pipeline.json").read_text())
    assert list(state["phases"]) == ["base", "midtrain", "restore"] and all(p["finished"] for p in state["phases"].values())
    restore = state["phases"]["restore"]["config"]
    # the restore phase started from midtrain's final model and learned from the base model
    assert restore["student"]["path"] == str(run / "midtrain" / "checkpoints" / "step_000004" / "model")
    assert restore["teacher"]["tiny"]["seed"] == 2
    # one table: the same evaluations after every phase
    for phase in state["phases"].values():
        assert {"knowledge/accuracy", "instruction/accuracy"} <= set(phase["evals"])
    for text in ("knowledge/accuracy", "instruction/accuracy", "(eval)", "(midtrain)", "(distill)", "restore"):
        assert text in result.output


def test_a_phase_can_only_name_an_earlier_phase(tmp_path):
    bad = {"run_dir": str(tmp_path / "run"), "phases": {
        "restore": {"method": "distill", "student": {"phase": "midtrain"}, "teacher": {"tiny": {}}},
        "midtrain": {"method": "midtrain", "student": {"tiny": {}}}}}
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump(bad, sort_keys=False))
    result = runner.invoke(app, ["pipeline", "--config", str(config)])
    assert result.exit_code == 2 and "{phase: midtrain} names no earlier phase" in result.output
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_the_shipped_personalize_pipeline_is_valid(tmp_path):
    """configs/pipeline_personalize.yaml: every phase's config is valid and the models are handed on."""
    from pathlib import Path

    from opd.pipeline import check_pipeline, read_pipeline

    spec = read_pipeline(Path(__file__).resolve().parents[2] / "configs" / "pipeline_personalize.yaml")
    configs = check_pipeline(spec, tmp_path, ["base:student.path=models/base"])
    assert [method for method, _ in configs.values()] == ["eval", "midtrain", "distill", "eval"]
    restore = configs["restore"][1]
    assert restore.teacher.path == "models/base" and "midtrain" in restore.student.path
    assert configs["midtrain"][1].data.chat_ratio == 0.3


def test_a_lora_phase_cannot_be_handed_on(tmp_path):
    from opd.config import ConfigError
    from opd.pipeline import check_pipeline

    spec = {"phases": {"sft": {"method": "sft", "task": {"name": "arithmetic"},
                               "student": {"tiny": {}, "lora": {"rank": 4}}},
                       "next": {"method": "eval", "student": {"phase": "sft"}}}}
    with pytest.raises(ConfigError, match="LoRA adapter"):
        check_pipeline(spec, tmp_path, [])
