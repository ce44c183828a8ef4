"""The loop never loses a run: divergence is skipped and stops cleanly, a changed learning rate
takes effect on resume, a run directory has one writer, a crash before the first checkpoint is
resumable (issue: never lose a run)."""

from io import StringIO

import pytest
import torch
from rich.console import Console

from opd.config import ConfigError, load_config
from opd.learner.checkpoint import latest_checkpoint, load_trainer_state
from opd.loop import NonFiniteTrainingError, train
from opd.run_dir import RunDirectoryError, RunLock, read_metrics

SFT = ["method=sft", "task.name=arithmetic", "task.train_size=64", "task.eval_size=4", "student.tiny.hidden_size=32",
       "train.prompts_per_step=8", "optim.warmup_steps=0", "log.progress=false", "log.tensorboard=false"]


def test_divergence_skips_updates_stops_the_run_and_never_checkpoints_nan(tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(None, [*SFT, "optim.lr=1e6", "train.steps=6", "checkpoint.every=1", "checkpoint.keep_last=1",
                             "train.max_nonfinite_steps=2", f"run_dir={run_dir}"])
    with pytest.raises(NonFiniteTrainingError, match=r"step 3: .*not finite for 2 steps in a row.*step_000001"):
        train(cfg)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["skipped"] for r in rows[1:]] == [0, 1, 1] and rows[-1]["nonfinite_steps"] == 2
    latest = latest_checkpoint(run_dir)
    assert latest.name == "step_000001"  # the skipped steps wrote none, and pruning kept it
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(latest / "model" / "model.safetensors")).values())


def test_a_learning_rate_changed_on_resume_takes_effect_and_is_recorded(tmp_path):
    run_dir = tmp_path / "run"
    base = [*SFT, "train.steps=3", "optim.lr=1e-3", "checkpoint.every=0", f"run_dir={run_dir}"]
    train(load_config(None, base), stop_after=1)
    out = StringIO()
    train(load_config(None, [*base, "optim.lr=5e-2", "optim.weight_decay=0.1"]), resume=True,
          console=Console(file=out, width=300))
    assert "differs from the checkpoint's in: optim.lr, optim.weight_decay" in out.getvalue()
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["lr"] for r in rows[1:]] == pytest.approx([1e-3, 5e-2, 5e-2])
    assert "lr: 0.05" in (run_dir / "config.yaml").read_text()
    state = load_trainer_state(latest_checkpoint(run_dir))
    group = state["learner"]["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == 0.1 and group["initial_lr"] == 5e-2


def test_settings_that_cannot_change_on_resume_are_refused_by_name(tmp_path):
    run_dir = tmp_path / "run"
    base = [*SFT, "train.steps=2", f"run_dir={run_dir}"]
    train(load_config(None, base), stop_after=1)
    with pytest.raises(ConfigError, match="student.tiny.hidden_size cannot change on resume"):
        train(load_config(None, [*base, "student.tiny.hidden_size=48"]), resume=True)


def test_a_second_process_on_the_run_directory_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    with RunLock(run_dir):  # another run holds it
        with pytest.raises(RunDirectoryError, match="in use by another opd process"):
            train(load_config(None, [*SFT, "train.steps=1", f"run_dir={run_dir}"]))
    assert not (run_dir / "metrics.jsonl").exists()
    train(load_config(None, [*SFT, "train.steps=1", f"run_dir={run_dir}"]))  # released: it runs


def test_resume_before_the_first_checkpoint_starts_the_run_again(tmp_path):
    run_dir = tmp_path / "run"
    cfg = load_config(None, [*SFT, "train.steps=2", "checkpoint.every=0", f"run_dir={run_dir}"])
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "eval/accuracy": 0.5}\n{"step": 1, "lo')  # a crash
    with pytest.raises(RunDirectoryError, match="pass --resume"):
        train(cfg)
    out = StringIO()
    summary = train(cfg, resume=True, console=Console(file=out, width=300))
    assert "no checkpoint" in out.getvalue() and "starting the run from step 0" in out.getvalue()
    assert summary["steps_done"] == 2
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [0, 1, 2]


def test_the_summary_of_an_interrupted_run_says_no_final_evaluation_ran(tmp_path, monkeypatch):
    import opd.cli.main as cli

    run_dir = tmp_path / "run"
    cfg = load_config(None, [*SFT, "train.steps=4", "eval.every=0", f"run_dir={run_dir}"])
    summary = train(cfg, stop_after=2)
    assert summary["interrupted"] and summary["last_eval_step"] == 0
    out = StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=300))
    cli._print_summary(summary)
    assert "no final evaluation: the last one is of step 0" in out.getvalue()
    summary = train(cfg, resume=True)  # the resumed invocation reads the logged evaluations
    assert summary["last_eval_step"] == 4 and not summary["interrupted"]

    out = StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=300))
    cli._print_summary({**summary, "start_eval": None, "last_eval": {}, "last_eval_step": None})
    assert "no evaluation set" in out.getvalue()


@pytest.mark.parametrize("free", [0, 10 << 30])
def test_any_failed_checkpoint_write_is_one_clear_error_and_a_full_disk_says_so(tmp_path, monkeypatch, free):
    """torch.save reports a full disk in its own words ("basic_ios::clear: iostream error", seen with a
    real full tmpfs in scripts/chaos.py): the free space decides whether to say "no space left"."""
    import collections

    import opd.learner.checkpoint as ckpt

    run_dir = tmp_path / "run"
    cfg = load_config(None, [*SFT, "train.steps=2", "checkpoint.every=1", f"run_dir={run_dir}"])
    train(cfg, stop_after=1)

    def failing_save(obj, path, *args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.state_file, "save_file", failing_save)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: usage(free + 1, 1, free))
    with pytest.raises(ckpt.CheckpointWriteError) as err:
        train(cfg, resume=True)
    message = str(err.value)
    assert ("no space left on the device" in message) == (free == 0)
    assert "basic_ios" in message or free == 0
    assert "checkpoints/latest still names step_000001" in message
    monkeypatch.undo()
    assert latest_checkpoint(run_dir).name == "step_000001"
    assert train(cfg, resume=True)["steps_done"] == 2
