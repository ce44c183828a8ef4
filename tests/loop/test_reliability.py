"""Never lose a run (issue 13): one process per run directory, torn metrics lines, checkpoints that
refuse NaN weights and survive a full disk, and one clear line (not a traceback) for damaged input."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import tiny
from opd.cli.main import app
from opd.config import LossConfig, ModelConfig, OptimConfig
from opd.data import PromptDataError, read_documents, read_records
from opd.learner.checkpoint import (CheckpointWriteError, CorruptCheckpointError, NonFiniteWeightsError,
                                    _prune, latest_checkpoint, load_trainer_state, load_weights, rng_state,
                                    save_checkpoint)
from opd.learner import state_file
from opd.learner.learner import Learner
from opd.models import CorruptModelError, ModelNotFoundError, load_model, load_tokenizer
from opd.run_dir import MetricsFileError, RunDirectoryError, RunLock, RunLog, TornLineWarning, read_metrics

runner = CliRunner()
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# 1. one process per run directory


def test_a_second_lock_on_a_run_directory_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with RunLock(run):
        with pytest.raises(RunDirectoryError) as err:
            RunLock(run).acquire()
        message = str(err.value)
        assert f"pid {os.getpid()}" in message and "in use by another opd process" in message
        assert str(run) in message
    with RunLock(run) as again:  # released: free for the next run
        assert again.held
    lock = RunLock(run).acquire()
    lock.release()
    lock.release()  # twice is harmless


HOLDER = textwrap.dedent("""
    import sys, time
    from opd.run_dir import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_a_lock_held_by_another_process_refuses_and_a_killed_holder_does_not_block(tmp_path):
    run = tmp_path / "run"
    script = tmp_path / "hold_the_lock.py"
    script.write_text(HOLDER)
    holder = subprocess.Popen([sys.executable, str(script), str(run), "--marker-argument"], stdout=subprocess.PIPE,
                              text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryError) as err:
            RunLock(run).acquire()
        message = str(err.value)
        assert f"pid {holder.pid}" in message and "hold_the_lock.py" in message and "--marker-argument" in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (run / ".lock").read_text().strip()  # kill -9 left the file with the dead holder's details ...
    with RunLock(run) as lock:  # ... and it does not block: the OS released the flock
        assert lock.held
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()


# ----------------------------------------------------------------------------------------------
# 2. a torn last line of metrics.jsonl


def _write_metrics(path, steps, torn=True, bad_middle=False):
    lines = [json.dumps({"step": s, "loss": 1.0 / (s + 1), **({"eval/accuracy": 0.1 * s} if s % 2 == 0 else {})})
             for s in steps]
    if bad_middle:
        lines.insert(1, '{"step": 1, "lo')
    text = "\n".join(lines) + "\n" + ('{"step": 99, "loss": 0.12' if torn else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_torn_last_line_is_skipped_with_a_warning_and_a_damaged_middle_line_is_named(tmp_path):
    path = _write_metrics(tmp_path / "metrics.jsonl", range(4))
    with pytest.warns(TornLineWarning, match=r"metrics\.jsonl:5: the last line is incomplete"):
        rows = read_metrics(path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an intact file: no warning
        assert len(read_metrics(_write_metrics(tmp_path / "ok.jsonl", range(3), torn=False))) == 3
    bad = _write_metrics(tmp_path / "bad.jsonl", range(4), torn=False, bad_middle=True)
    with pytest.raises(MetricsFileError, match=r"bad\.jsonl:2: not a JSON object .* the file is damaged"):
        read_metrics(bad)


def test_resume_truncates_the_log_to_the_checkpoint_and_drops_a_torn_line(tmp_path, tiny_config):
    cfg = tiny_config()
    path = _write_metrics(tmp_path / "run" / "metrics.jsonl", range(7))
    log = RunLog(cfg, resume_step=4)
    assert [e["eval/accuracy"] for e in log.logged_evals()] == pytest.approx([0.0, 0.2, 0.4])
    for step in (5, 6):
        log.log(step, {"loss": 0.5})
    log.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the torn line is gone
        assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3, 4, 5, 6]  # every step exactly once


def test_report_and_comparison_read_a_log_with_a_torn_last_line(tmp_path):
    from opd.compare import eval_rows
    from opd.report import build_report

    run = tmp_path / "run"
    _write_metrics(run / "metrics.jsonl", range(5))
    with pytest.warns(TornLineWarning):
        assert "accuracy_vs_step.png" in build_report(run).read_text()
    with pytest.warns(TornLineWarning):
        assert [r["step"] for r in eval_rows(run)] == [0, 2, 4]
    _write_metrics(run / "metrics.jsonl", range(5), bad_middle=True)
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 2 and "metrics.jsonl:2: not a JSON object" in result.output
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------------------------
# 3. checkpoints: never from NaN weights, never prune `latest`, a full disk, a corrupt file


@pytest.fixture
def model_and_tokenizer():
    return tiny(hidden=32, seed=3)


def _learner(model):
    """What the loop checkpoints: the learner holding the model."""
    return Learner(model, OptimConfig(), LossConfig(), total_steps=1, micro_batch_size=1)


def _state(step):
    return {"step": step, "totals": {}, "config": {}, "learner": {}, "rng": rng_state()}


def test_no_checkpoint_is_written_from_non_finite_weights(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer
    save_checkpoint(tmp_path, 1, _learner(model), tok, _state(1), keep_last=1)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"step 2: the model's weights are not finite .*"
                                                    r"checkpoints/latest still names step_000001"):
        save_checkpoint(tmp_path, 2, _learner(model), tok, _state(2), keep_last=1)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]  # nothing written, nothing pruned
    assert latest_checkpoint(tmp_path).name == "step_000001"


def test_pruning_never_removes_the_checkpoint_latest_names_nor_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        (root / f"step_{step:06d}").mkdir(parents=True)
    (root / "latest").write_text("step_000002\n")  # e.g. a resumed run whose later checkpoints are abandoned
    _prune(root, keep_last=1, keep="step_000003")
    assert sorted(p.name for p in root.glob("step_*")) == ["step_000002", "step_000003", "step_000004"]


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                                  'message: "No space left on device" })')])
def test_no_space_left_while_checkpointing_is_one_clear_error_and_latest_stays(tmp_path, monkeypatch,
                                                                             model_and_tokenizer, failure):
    model, tok = model_and_tokenizer
    save_checkpoint(tmp_path, 1, _learner(model), tok, _state(1), keep_last=2)

    def full_disk(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise failure

    monkeypatch.setattr(state_file, "save_file", full_disk)  # the trainer state's tensors
    with pytest.raises(CheckpointWriteError) as err:
        save_checkpoint(tmp_path, 2, _learner(model), tok, _state(2), keep_last=2)
    message = str(err.value)
    assert "no space left" in message and str(tmp_path / "checkpoints" / "step_000002") in message
    assert "checkpoints/latest still names step_000001" in message and err.value.errno == errno.ENOSPC
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000001"]  # the partial copy is gone
    assert latest_checkpoint(tmp_path).name == "step_000001"


def test_a_truncated_checkpoint_file_is_named(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer
    checkpoint = save_checkpoint(tmp_path, 1, _learner(model), tok, _state(1), keep_last=1)
    weights = checkpoint / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match=str(weights)):
        load_weights(model, checkpoint / "model")
    for name in ("trainer_state.safetensors", "trainer_state.json"):
        state = checkpoint / name
        state.write_bytes(state.read_bytes()[:40])
        with pytest.raises(CorruptCheckpointError, match=str(state)):
            load_trainer_state(checkpoint)


def test_a_truncated_lora_adapter_is_named(tmp_path):
    model, tok = load_model(ModelConfig(tiny={"hidden_size": 32}, lora={"rank": 2, "target_modules": ["q_proj"]}), CPU)
    checkpoint = save_checkpoint(tmp_path, 1, _learner(model), tok, _state(1), keep_last=1)
    adapter = checkpoint / "model" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:10])
    with pytest.raises(CorruptCheckpointError, match=str(adapter)):
        load_weights(model, checkpoint / "model")


# ----------------------------------------------------------------------------------------------
# 4. data files that are not UTF-8


LATIN1 = "café".encode("latin-1")  # b"caf\xe9": not UTF-8


@pytest.mark.parametrize("name,content,line", [
    ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "' + LATIN1 + b'"}\n', 3),
    ("p.json", b'[\n  {"prompt": "a"},\n  {"prompt": "' + LATIN1 + b'"}\n]\n', 3),
    ("p.csv", b"prompt\nhello\n" + LATIN1 + b"\n", 3),
    ("p.txt", b"one\n" + LATIN1 + b"\n", 2),
])
def test_a_file_that_is_not_utf8_is_named_with_its_line(tmp_path, name, content, line):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(PromptDataError, match=rf"{name}:{line}: not UTF-8 text \(byte 0xe9"):
        read_records(path)


def test_documents_that_are_not_utf8_are_named_and_a_byte_order_mark_is_accepted(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("fine\n")
    (tmp_path / "docs" / "b.md").write_bytes(b"# title\n\nsome " + LATIN1 + b"\n")
    with pytest.raises(PromptDataError, match=r"b\.md:3: not UTF-8"):
        read_documents(tmp_path / "docs")
    with pytest.raises(PromptDataError, match=r"b\.md:3: not UTF-8"):
        read_documents(tmp_path / "docs" / "b.md")
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a"}\n')
    assert read_records(bom)[0][1] == {"prompt": "a"}


def test_the_cli_names_a_prompt_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_bytes(b'{"prompt": "a"}\n{"prompt": "' + LATIN1 + b'"}\n')
    result = runner.invoke(app, ["distill", f"run_dir={tmp_path / 'run'}", "student.tiny.hidden_size=32",
                                 "teacher.tiny.hidden_size=32", f"data.prompts={bad}", "log.progress=false"])
    assert result.exit_code == 2 and f"{bad}:2: not UTF-8 text" in result.output
    assert "Traceback" not in result.output


# ----------------------------------------------------------------------------------------------
# 5. model directories: what is missing, which file is corrupt; the tokenizer alone


@pytest.fixture
def saved_model(tmp_path, model_and_tokenizer):
    model, tok = model_and_tokenizer
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_a_model_directory_without_weights_or_tokenizer_says_which(saved_model):
    (saved_model / "model.safetensors").unlink()
    tokenizer = load_tokenizer(ModelConfig(path=str(saved_model)))  # the tokenizer needs no weights
    assert tokenizer.pad_token_id is not None
    with pytest.raises(ModelNotFoundError, match=r"has config.json but no weights \(\*\.safetensors"):
        load_model(ModelConfig(path=str(saved_model)), CPU)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (saved_model / name).unlink(missing_ok=True)
    with pytest.raises(ModelNotFoundError, match=r"no weights .* and no tokenizer files"):
        load_model(ModelConfig(path=str(saved_model)), CPU)
    with pytest.raises(ModelNotFoundError, match=r"has no tokenizer files"):
        load_tokenizer(ModelConfig(path=str(saved_model)))


def test_a_model_directory_without_tokenizer_files_says_so(saved_model):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (saved_model / name).unlink(missing_ok=True)
    with pytest.raises(ModelNotFoundError, match=r"has no tokenizer files \(none of tokenizer\.json"):
        load_model(ModelConfig(path=str(saved_model)), CPU)


def test_a_corrupt_safetensors_file_in_a_model_directory_is_named(saved_model):
    weights = saved_model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CorruptModelError, match=str(weights)):
        load_model(ModelConfig(path=str(saved_model)), CPU)


def test_load_tokenizer_alone_and_served_models_are_refused(saved_model):
    from opd.tiny import build_tiny_tokenizer

    assert load_tokenizer(ModelConfig(tiny={"hidden_size": 32})).get_vocab() == build_tiny_tokenizer().get_vocab()
    assert load_tokenizer(ModelConfig(path=str(saved_model))).get_vocab() == build_tiny_tokenizer().get_vocab()
    served = ModelConfig(url="http://127.0.0.1:9")
    with pytest.raises(ValueError, match="served at http://127.0.0.1:9"):
        load_tokenizer(served)
    with pytest.raises(ValueError, match="served at http://127.0.0.1:9"):
        load_model(served, CPU)


def test_a_lora_adapter_names_the_model_the_user_gave_not_the_cache(tmp_path, saved_model, monkeypatch):
    import opd.models

    lora = {"rank": 2, "target_modules": ["q_proj"]}
    model, _ = load_model(ModelConfig(path=str(saved_model), lora=lora), CPU)
    assert model.peft_config["default"].base_model_name_or_path == str(saved_model.resolve())
    # a GGUF file is de-quantised into opd's cache; the adapter names that copy, which
    # from_pretrained opens (it cannot open the .gguf file as a base)
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(opd.models, "convert_gguf", lambda path: saved_model)
    model, tok = load_model(ModelConfig(path=str(gguf), lora=lora), CPU)
    assert model.peft_config["default"].base_model_name_or_path == str(saved_model.resolve())
    checkpoint = save_checkpoint(tmp_path / "run", 1, _learner(model), tok, _state(1), keep_last=1)
    adapter_config = json.loads((checkpoint / "model" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(saved_model.resolve())


# ----------------------------------------------------------------------------------------------
# 6. the command line: the demo never deletes a folder it did not create; Ctrl-C exits 130


@pytest.fixture
def no_demo_work(monkeypatch):
    """The demo's work (building models, three runs) replaced by a record of the call: the tests
    check what happens before it, and that it was (or was not) reached."""
    import opd.cli.demo

    calls = []

    def fake(run_dir, quick, overrides, console):
        calls.append(run_dir)
        (run_dir / "comparison.json").write_text("{}")
        return {}

    monkeypatch.setattr(opd.cli.demo, "_run_demo", fake)
    monkeypatch.setattr("opd.compare.cached_model", lambda *a, **k: pytest.fail("a model was built"))
    return calls


@pytest.mark.parametrize("override,expected", [
    ("distil:optim.lr=1", "'distil:' names no method of the demo (did you mean 'distill:'?)"),
    ("rll:optim.lr=1", "the prefixes are distill:, rl:, sft:"),
    ("optim.lrr=1", "optim.lrr: unknown key (did you mean 'optim.lr'?)"),
    ("rl:optim.lrr=1", "(in the demo's rl run)"),
])
def test_demo_refuses_bad_overrides_before_any_work_and_deletes_nothing(tmp_path, no_demo_work, override, expected):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("my notes\n")
    result = runner.invoke(app, ["demo", "--quick", "--run-dir", str(notes), override])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert (notes / "todo.txt").read_text() == "my notes\n" and no_demo_work == []


def test_demo_never_deletes_a_folder_it_did_not_create(tmp_path, no_demo_work):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("my notes\n")
    for extra in ([], ["--overwrite"]):
        result = runner.invoke(app, ["demo", "--quick", "--run-dir", str(notes), *extra])
        assert result.exit_code == 2 and "holds no opd demo" in result.output, result.output
    assert (notes / "todo.txt").read_text() == "my notes\n" and no_demo_work == []


def test_demo_replaces_an_earlier_demo_only_with_overwrite(tmp_path, no_demo_work):
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--quick", "--run-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / ".opd-demo").is_file() and no_demo_work == [out]
    (out / "distill").mkdir()
    result = runner.invoke(app, ["demo", "--quick", "--run-dir", str(out)])
    assert result.exit_code == 2 and "pass --overwrite" in result.output and len(no_demo_work) == 1
    result = runner.invoke(app, ["demo", "--quick", "--run-dir", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert len(no_demo_work) == 2 and not (out / "distill").exists() and (out / ".opd-demo").is_file()


def test_an_interrupted_demo_exits_130(tmp_path, monkeypatch):
    import opd.cli.demo

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(opd.cli.demo, "_run_demo", interrupted)
    result = runner.invoke(app, ["demo", "--quick", "--run-dir", str(tmp_path / "demo")])
    assert result.exit_code == 130 and "interrupted" in result.output


QUICK_RUN = ["student.tiny.hidden_size=32", "teacher.tiny.hidden_size=32", "train.steps=3",
             "train.prompts_per_step=2", "sampling.samples_per_prompt=2", "sampling.max_new_tokens=4",
             "eval.every=0", "data.eval_holdout=0", "log.progress=false", "log.tensorboard=false"]


def test_an_interrupted_run_prints_its_summary_and_exits_130(tmp_path, monkeypatch):
    import opd.loop

    real_train = opd.loop.train

    def stopped_after_one_step(cfg, resume=False, console=None, **kw):  # as a Ctrl-C after the first step
        return real_train(cfg, resume=resume, console=console, stop_after=1, **kw)

    monkeypatch.setattr(opd.loop, "train", stopped_after_one_step)
    run = tmp_path / "run"
    result = runner.invoke(app, ["distill", f"run_dir={run}", *QUICK_RUN])
    assert result.exit_code == 130, result.output
    assert "interrupted after step 1 of 3" in result.output and "--resume" in result.output
    assert json.loads((run / "summary.json").read_text())["interrupted"] is True
    monkeypatch.setattr(opd.loop, "train", real_train)
    result = runner.invoke(app, ["distill", f"run_dir={run}", "--resume", *QUICK_RUN])
    assert result.exit_code == 0, result.output  # finished: 0


def test_ctrl_c_twice_exits_130_without_a_traceback(tmp_path, monkeypatch):
    import opd.loop

    def quit_at_once(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(opd.loop, "train", quit_at_once)
    result = runner.invoke(app, ["sft", f"run_dir={tmp_path / 'run'}", "student.tiny.hidden_size=32"])
    assert result.exit_code == 130 and "interrupted" in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------------------------------------
# GGUF: the tokenizer without de-quantising, a quiet conversion, an adapter that names the file


def write_tiny_gguf(path, model, tokenizer):
    """A tiny Llama as an F32 GGUF file (written with the gguf package, as llama.cpp lays it out)."""
    import gguf

    cfg = model.config
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["id"] for t in spec["added_tokens"]}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in per_layer.items()})
    state = model.state_dict()
    for name, gguf_name in names.items():
        if name in state:
            writer.add_tensor(gguf_name, state[name].float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_tokenizer_loads_without_de_quantising_and_the_conversion_is_quiet(tmp_path, model_and_tokenizer,
                                                                                  capfd):
    from opd.models import cache_root

    pytest.importorskip("gguf")
    model, tok = model_and_tokenizer
    gguf_file = write_tiny_gguf(tmp_path / "tiny.F32.gguf", model, tok)
    before = set((cache_root() / "gguf").glob("*")) if (cache_root() / "gguf").is_dir() else set()
    tokenizer = load_tokenizer(ModelConfig(path=str(gguf_file)))
    assert tokenizer("The river is 12 + 3").input_ids == tok("The river is 12 + 3").input_ids
    after = set((cache_root() / "gguf").glob("*")) if (cache_root() / "gguf").is_dir() else set()
    assert after == before  # nothing de-quantised for the tokenizer alone

    capfd.readouterr()
    student, student_tok = load_model(ModelConfig(path=str(gguf_file), lora={"rank": 2, "target_modules": ["q_proj"]}),
                                      CPU)
    printed = capfd.readouterr()
    assert "de-quantizing" not in printed.err + printed.out  # the GGUF progress bar is silenced
    base = student.peft_config["default"].base_model_name_or_path
    assert Path(base).parent == (cache_root() / "gguf").resolve() and (Path(base) / "config.json").is_file()
    # so the checkpoint's adapter loads with peft alone
    from peft import AutoPeftModelForCausalLM

    checkpoint = save_checkpoint(tmp_path / "run", 1, _learner(student), student_tok, _state(1), keep_last=1)
    ids = torch.tensor([[1, 5, 9, 14]])
    with torch.no_grad():
        loaded = AutoPeftModelForCausalLM.from_pretrained(str(checkpoint / "model"), local_files_only=True)
        expected = student(ids).logits
        # peft resizes the embeddings to the saved tokenizer, which transformers' GGUF reader gives
        # one token more than this hand-written file's vocabulary; the model's own rows must agree
        torch.testing.assert_close(loaded(ids).logits[..., :expected.shape[-1]], expected)
    assert student_tok.get_vocab() == tokenizer.get_vocab()
    # once converted, the tokenizer comes from the cache, and is the same
    assert load_tokenizer(ModelConfig(path=str(gguf_file))).get_vocab() == tokenizer.get_vocab()
