import pytest
import torch

from opd.config import ModelConfig
from opd.models import LogitsHead, ModelNotFoundError, load_model


def test_hub_id_not_in_local_cache_fails_with_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError) as err:
        load_model(ModelConfig(path="SomeOrg/some-model-1B"), torch.device("cpu"))
    message = str(err.value)
    assert "'SomeOrg/some-model-1B' not found" in message and str(tmp_path / "hf") in message
    assert "never downloads" in message


def test_directory_without_config_and_missing_gguf(tmp_path):
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        load_model(ModelConfig(path=str(tmp_path)), torch.device("cpu"))
    with pytest.raises(ModelNotFoundError, match="GGUF file not found"):
        load_model(ModelConfig(path=str(tmp_path / "m.gguf")), torch.device("cpu"))


def test_local_directory_round_trip_and_dtype(tmp_path):
    model, tok = load_model(ModelConfig(tiny={"hidden_size": 32}), torch.device("cpu"))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = load_model(ModelConfig(path=str(tmp_path / "m"), dtype="bfloat16"), torch.device("cpu"))
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert loaded_tok.get_vocab() == tok.get_vocab()


def test_lora_student_trains_only_adapters():
    model, _ = load_model(ModelConfig(tiny={"hidden_size": 32}, lora={"rank": 4, "target_modules": ["q_proj", "v_proj"]}),
                          torch.device("cpu"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    LogitsHead(model).verify(100)  # the chunked head path sees through the peft wrapper


def test_logits_head_reproduces_the_forward():
    model, tok = load_model(ModelConfig(tiny={"hidden_size": 32}), torch.device("cpu"))
    head = LogitsHead(model)
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        got = head.logits(head.hidden(ids, mask))
        unpadded = model(input_ids=ids[:1, 2:]).logits
    torch.testing.assert_close(got[0, 2:], unpadded[0], atol=1e-5, rtol=1e-4)  # left padding is invisible
