"""`opd export`: what it writes loads with transformers (and peft for an adapter) alone, and gives
the checkpoint's own logits."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from helpers import TINY_RUN
from opd.cli.main import app
from opd.config import load_config
from opd.export import export
from opd.learner.checkpoint import latest_checkpoint, load_weights
from opd.loop import train
from opd.models import load_model


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    train(load_config(None, [f"run_dir={run_dir}", *TINY_RUN, "train.steps=1", "student.lora.rank=4",
                             "optim.lr=5e-2"]))
    return run_dir


def _checkpoint_logits(run_dir, ids):
    cfg = load_config(run_dir / "config.yaml", [])
    model, _ = load_model(cfg.student, torch.device("cpu"))
    load_weights(model, latest_checkpoint(run_dir) / "model")
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[1, 17, 42, 99, 5, 250, 7]])


def test_a_merged_export_is_a_plain_model_with_the_checkpoints_logits(lora_run, tmp_path):
    result = export(str(lora_run), tmp_path / "merged", merge=True)
    assert result["kind"] == "merged"
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    with torch.no_grad():
        exported = model(IDS).logits
    expected = _checkpoint_logits(lora_run, IDS)
    torch.testing.assert_close(exported, expected, atol=1e-5, rtol=1e-5)
    # the adapter did change the model: the check would fail on the base alone
    base, _ = load_model(load_config(lora_run / "config.yaml", []).student, torch.device("cpu"))
    with torch.no_grad():
        assert not torch.allclose(base(IDS).logits, expected, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_an_adapter_export_loads_with_peft_alone(lora_run, tmp_path):
    from peft import AutoPeftModelForCausalLM

    out = tmp_path / "adapter"
    result = export(str(latest_checkpoint(lora_run)), out)
    config = json.loads((out / "adapter_config.json").read_text())
    # a tiny base exists only in memory: it is written beside the adapter and named by its path
    assert result["kind"] == "adapter" and config["base_model_name_or_path"] == str((out / "base").resolve())
    model = AutoPeftModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    with torch.no_grad():
        exported = model(IDS).logits
        with model.disable_adapter():
            plain = model(IDS).logits
    torch.testing.assert_close(exported, _checkpoint_logits(lora_run, IDS), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(exported, plain, atol=1e-4)  # the adapter is applied, not lost


def test_export_refuses_a_folder_that_holds_something(lora_run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["export", str(lora_run), str(tmp_path / "out"), "--merge"])
    assert result.exit_code == 2 and "already exists and is not empty" in result.output
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    result = CliRunner().invoke(app, ["export", str(lora_run), str(tmp_path / "new"), "--merge"])
    assert result.exit_code == 0, result.output
    assert "merged into its base" in result.output and (tmp_path / "new" / "config.json").is_file()
