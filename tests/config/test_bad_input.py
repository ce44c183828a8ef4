"""Bad input is one clear line, before any work where possible, never a traceback and never
silent (issue 25): a server's malformed answers, a full disk under the logs, a torn pipeline.json,
settings a library would reject later, sequences longer than a model's context."""

import errno
import json

import pytest
import yaml
from typer.testing import CliRunner

from opd.cli.main import app
from opd.config import ConfigError, load_config
from opd.run_dir import RunDirectoryError, RunLog
from opd.teacher.remote import TeacherResponseError, _Sequence, parse_vllm

SFT = ["method=sft", "task.name=arithmetic", "task.train_size=32", "task.eval_size=4", "student.tiny.hidden_size=32",
       "train.prompts_per_step=8", "optim.warmup_steps=0", "log.progress=false", "log.tensorboard=false",
       "checkpoint.every=0"]


# ----------------------------------------------------------------------------------------------
# a server's answers


def test_a_top_k_candidate_whose_log_prob_is_not_a_number_is_named():
    sequence = _Sequence(row=3, start=0, ids=[1, 5], columns=[1])
    entries = [None, {"5": {"logprob": -0.1}, "7": {"logprob": "high"}}]
    with pytest.raises(TeacherResponseError, match=r"row 3, position 1.*top-k log-prob of token 7 is 'high'"):
        parse_vllm(entries, sequence, 2, "http://127.0.0.1:1")
    entries[1]["7"] = {"logprob": [0]}
    with pytest.raises(TeacherResponseError, match="not a log-probability"):
        parse_vllm(entries, sequence, 2, "http://127.0.0.1:1")


@pytest.mark.parametrize("answer", [{"tokens": "abc"}, [1, 2, 3], {"tokens": [1, "x"]}, {"count": 3}])
def test_a_tokenize_answer_of_the_wrong_shape_is_one_line(answer):
    from test_teacher_limits import Server

    from opd.config import ModelConfig
    from opd.teacher.remote import RemoteTeacher
    from opd.tiny import build_tiny_tokenizer

    server = Server(tokenize=answer)
    try:
        with RemoteTeacher(ModelConfig(url=server.url, retry_for_s=0)) as teacher:
            with pytest.raises(TeacherResponseError, match=r"answered POST /tokenize with .*not \{\"tokens\""):
                teacher.check_tokenizer(build_tiny_tokenizer())
    finally:
        server.close()


# ----------------------------------------------------------------------------------------------
# the disk filling under the logs


def test_a_full_disk_under_metrics_jsonl_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").symlink_to("/dev/full")  # every write: ENOSPC, from the kernel
    config = tmp_path / "run.yaml"
    config.write_text(f"run_dir: {run_dir}\n")
    result = CliRunner().invoke(app, ["sft", "--config", str(config), *SFT[1:], "train.steps=1"])
    assert result.exit_code == 2, result.output
    assert "could not write metrics.jsonl" in result.output and "no space left on the device" in result.output
    assert "Traceback" not in result.output


def test_a_full_disk_under_tensorboard_is_one_line(tmp_path, monkeypatch):
    cfg = load_config(None, [*SFT, f"run_dir={tmp_path / 'run'}", "log.tensorboard=true"])
    log = RunLog(cfg, resume_step=None)

    def full(*args, **kwargs):  # what the event writer raises when its file cannot grow
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(log.tensorboard, "add_scalar", full)
    with pytest.raises(RunDirectoryError, match="could not write the TensorBoard events .* at step 1: no space left"):
        log.log(1, {"loss": 1.0})
    monkeypatch.undo()
    log.close()
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text())["step"] == 1  # the row itself was written


# ----------------------------------------------------------------------------------------------
# pipeline.json


@pytest.mark.parametrize("content", ['{"phases": {"base": {"fini', "[1, 2]", '{"phases": ["base"]}',
                                     '{"phases": {"base": {"finished": true}}}'])
def test_a_torn_or_foreign_pipeline_json_is_one_line(tmp_path, content):
    from test_pipeline import PIPELINE

    from opd.pipeline import run_pipeline

    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), **PIPELINE}, sort_keys=False))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "pipeline.json").write_text(content)
    with pytest.raises(ConfigError, match=r"pipeline.json .*(cannot be read|is not the state of a pipeline).*move it"):
        run_pipeline(config, resume=True)
    assert not (tmp_path / "run" / "base").exists()  # nothing ran


def test_pipeline_json_is_written_atomically(tmp_path, monkeypatch):
    from opd import pipeline

    path = tmp_path / "pipeline.json"
    pipeline.write_state(path, {"phases": {"a": {"finished": False}}})
    replaced = []
    monkeypatch.setattr(pipeline.os, "replace", lambda src, dst: replaced.append((src, dst)))
    pipeline.write_state(path, {"phases": {}})  # the rename that never happens (a crash): the old state stays
    assert json.loads(path.read_text()) == {"phases": {"a": {"finished": False}}}
    assert replaced and replaced[0][1] == path


# ----------------------------------------------------------------------------------------------
# settings a library would reject later, or that do nothing useful


@pytest.mark.parametrize("overrides,message", [
    (["optim.betas=[0.9, 1.0]"], r"betas=\[0.9, 1.0\]: each must be in \[0, 1\)"),
    (["optim.betas=[-0.1, 0.99]"], r"each must be in \[0, 1\)"),
    (["optim.lr=.inf"], "optim.lr: Input should be a finite number"),
    (["optim.lr=.nan"], "optim.lr: Input should be a finite number"),
    (["student.tiny.num_heads=3"], "num_heads=3 must divide hidden_size=32"),
    (["sampling.stop=['']"], "stop: an empty string matches everywhere"),
    (["teacher.tiny.hidden_size=32", "teacher.top_k=4", "loss.kind=topk_forward_kl"],
     r"teacher.top_k: top-k log-probs come from a served teacher"),
])
def test_settings_that_would_fail_later_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["student.tiny.hidden_size=32", *overrides])


# ----------------------------------------------------------------------------------------------
# sequences longer than the model's context


@pytest.mark.parametrize("extra,what", [
    (["sampling.max_new_tokens=100"], "the longest prompt"),
    (["sampling.max_new_tokens=100000000"], "the longest prompt"),
    (["data.max_prompt_tokens=512", "student.tiny.max_position_embeddings=16", "sampling.max_new_tokens=4"],
     "the longest prompt"),
])
def test_prompt_plus_max_new_tokens_beyond_the_context_is_refused_before_any_work(tmp_path, extra, what):
    from opd.loop import train

    run_dir = tmp_path / "run"
    base = ["method=rl", "task.name=arithmetic", "task.train_size=16", "task.eval_size=4",
            "student.tiny.hidden_size=32", "student.tiny.max_position_embeddings=64", "log.progress=false",
            "log.tensorboard=false", f"run_dir={run_dir}"]
    with pytest.raises(ConfigError, match=f"{what}.* more than the student's max_position_embeddings="):
        train(load_config(None, [*base, *extra]))
    assert not (run_dir / "metrics.jsonl").exists()


def test_an_sft_sequence_beyond_the_context_is_refused(tmp_path):
    from opd.loop import train

    cfg = load_config(None, [*SFT, "student.tiny.max_position_embeddings=8", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="longest training sequence.*max_position_embeddings=8"):
        train(cfg)
