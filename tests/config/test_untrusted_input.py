"""Nothing read from a run folder or a data file runs code (issue 25): a checkpoint's trainer
state is JSON + safetensors, an older opd's pickle is read only with --trust-checkpoint, and a
data record's grader may name only a built-in grader."""

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from opd.cli.main import app
from opd.config import load_config
from opd.learner.checkpoint import UntrustedCheckpointError, latest_checkpoint, load_trainer_state
from opd.loop import train
from opd.run_dir import read_metrics

SFT = ["method=sft", "task.name=arithmetic", "task.train_size=64", "task.eval_size=4", "student.tiny.hidden_size=32",
       "train.prompts_per_step=8", "optim.warmup_steps=0", "log.progress=false", "log.tensorboard=false",
       "checkpoint.every=0"]


class _RunsAShellCommand:
    """What a crafted trainer_state.pt holds: unpickling it calls os.system."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _as_legacy_pickle(checkpoint, state) -> None:
    """Make `checkpoint` look as an older opd wrote it: the trainer state as one pickle."""
    (checkpoint / "trainer_state.json").unlink()
    (checkpoint / "trainer_state.safetensors").unlink()
    torch.save(state, checkpoint / "trainer_state.pt")


def _weights(run_dir, step):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "model" / "model.safetensors"))


def test_a_checkpoint_is_stored_without_pickle_and_round_trips(tmp_path):
    run_dir = tmp_path / "run"
    train(load_config(None, [*SFT, "train.steps=2", f"run_dir={run_dir}"]), stop_after=1)
    checkpoint = latest_checkpoint(run_dir)
    assert sorted(p.name for p in checkpoint.iterdir()) == ["model", "trainer_state.json", "trainer_state.safetensors"]
    state = load_trainer_state(checkpoint)
    assert state["step"] == 1 and state["config"]["method"] == "sft"
    assert isinstance(state["rng"]["python"], tuple) and state["rng"]["torch"].dtype == torch.uint8
    moments = state["learner"]["optimizer"]["state"]
    assert moments and all(isinstance(k, int) for k in moments)  # the optimizer's int keys survive JSON
    assert all(isinstance(v, torch.Tensor) for m in moments.values() for v in m.values())
    json.loads((checkpoint / "trainer_state.json").read_text())  # plain JSON a user can read


def test_a_crafted_pickle_checkpoint_is_refused_and_runs_nothing(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    cfg = load_config(None, [*SFT, "train.steps=2", f"run_dir={run_dir}"])
    train(cfg, stop_after=1)
    _as_legacy_pickle(latest_checkpoint(run_dir), {"step": _RunsAShellCommand(f"touch {marker}")})
    with pytest.raises(UntrustedCheckpointError, match="pickle.*--trust-checkpoint"):
        train(cfg, resume=True)
    assert not marker.exists()
    # the command line: one line naming the file and the flag, no traceback, nothing run
    config = tmp_path / "run.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in [("run_dir", run_dir)]))
    result = CliRunner().invoke(app, ["sft", "--config", str(config), *SFT[1:], "train.steps=2", "--resume"])
    assert result.exit_code == 2, result.output
    assert "trainer_state.pt" in result.output and "--trust-checkpoint" in result.output
    assert "Traceback" not in result.output and not marker.exists()


def test_a_checkpoint_of_an_older_opd_resumes_exactly_with_trust_checkpoint(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    base = [*SFT, "train.steps=3"]
    train(load_config(None, [*base, f"run_dir={straight}"]))
    train(load_config(None, [*base, f"run_dir={split}"]), stop_after=1)
    checkpoint = latest_checkpoint(split)
    _as_legacy_pickle(checkpoint, load_trainer_state(checkpoint))
    with pytest.raises(UntrustedCheckpointError):
        train(load_config(None, [*base, f"run_dir={split}"]), resume=True)
    train(load_config(None, [*base, f"run_dir={split}"]), resume=True, trust_checkpoint=True)
    a, b = _weights(straight, 3), _weights(split, 3)
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    drop = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_s") and not k.endswith("_s_total")} for r in rows]
    assert drop(read_metrics(straight / "metrics.jsonl")) == drop(read_metrics(split / "metrics.jsonl"))
    assert (latest_checkpoint(split) / "trainer_state.json").is_file()  # written in the safe format from then on


# ----------------------------------------------------------------------------------------------
# 2. a data record's grader

EXEC_RECORD = {"messages": [{"role": "user", "content": "What is 2+2?"}], "answer": "4", "grader": "builtins:exec"}


def test_a_record_naming_a_callable_as_its_grader_is_refused_and_never_called(tmp_path):
    from opd.tasks import GraderError, grade

    marker = tmp_path / "marker"
    completion = f"import pathlib; pathlib.Path({str(marker)!r}).touch()"  # what exec() would run
    with pytest.raises(GraderError, match="'builtins:exec'.*only a built-in grader.*data.grader"):
        grade(dict(EXEC_RECORD), completion)
    assert not marker.exists()
    assert grade({**EXEC_RECORD, "grader": "exact"}, "4").score == 1.0  # a built-in name is fine


def test_opd_rl_refuses_the_record_before_any_work(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(EXEC_RECORD) + "\n" + json.dumps({**EXEC_RECORD, "grader": "exact"}) + "\n")
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["rl", f"data.prompts={prompts}", f"data.eval_prompts={prompts}",
                                      "student.tiny.hidden_size=32", "train.steps=1", "train.prompts_per_step=2",
                                      "sampling.samples_per_prompt=2", "sampling.max_new_tokens=4",
                                      "log.progress=false", "log.tensorboard=false", f"run_dir={run_dir}"])
    assert result.exit_code == 2, result.output
    assert "'builtins:exec'" in result.output and "data.grader" in result.output and "Traceback" not in result.output
    assert not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text()


def test_a_module_function_grader_from_the_run_config_is_still_called(tmp_path, monkeypatch):
    from opd.tasks import grade

    (tmp_path / "my_grader.py").write_text("def score(completion, record):\n    return completion == record['answer']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    record = {k: v for k, v in EXEC_RECORD.items() if k != "grader"}
    assert grade(record, "4", default_grader="my_grader:score").score == 1.0
