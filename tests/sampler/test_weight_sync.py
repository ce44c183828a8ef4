"""A served student's weight sync, the parts that need no vLLM: the disk path writes the
directory once and then only the weights; the NCCL path (vLLM's weight transfer) is refused on a
machine without CUDA before any request, and needs a served student. The syncs themselves, with
a real server, are in tests/vllm/test_vllm_sampler.py."""

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY_RUN, tiny
from opd.config import ConfigError, LossConfig, OptimConfig, SamplingConfig, load_config
from opd.learner.learner import Learner


def test_a_weights_only_export_rewrites_the_weights_and_nothing_else(tmp_path):
    model, tok = tiny(hidden=32, seed=1)
    learner = Learner(model, OptimConfig(), LossConfig(), 1, 8)
    learner.export_policy(tmp_path, tok)
    written = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= written.keys()
    (tmp_path / "config.json").write_text("{}")  # a weights-only export must leave it as it is
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    learner.export_policy(tmp_path, tok, weights_only=True)
    assert (tmp_path / "config.json").read_text() == "{}"
    assert (tmp_path / "tokenizer.json").stat().st_mtime_ns == written["tokenizer.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written)  # no new file, no partial left
    weights = load_file(str(tmp_path / "model.safetensors"))
    name, tensor = next(iter(learner.policy_weights().items()))
    assert torch.equal(weights[name], tensor)  # the updated weights


def test_nccl_weight_sync_needs_a_served_student(tmp_path):
    with pytest.raises(ConfigError, match=r"sampling\.weight_sync=nccl .* sampling\.url"):
        load_config(None, [f"run_dir={tmp_path}", *TINY_RUN, "sampling.backend=vllm", "sampling.weight_sync=nccl"])
    cfg = load_config(None, [f"run_dir={tmp_path}", *TINY_RUN, "sampling.backend=vllm", "sampling.weight_sync=nccl",
                             "sampling.url=http://127.0.0.1:9/v1"])
    assert cfg.sampling.weight_sync == "nccl" and cfg.sampling.weight_sync_port == 29650


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the NCCL path is tested with a server (tests/vllm)")
def test_nccl_weight_sync_is_refused_without_cuda_before_any_request(tmp_path):
    from opd.sampler.vllm import VLLMServerSampler

    _, tok = tiny(hidden=32, seed=1)
    cfg = SamplingConfig(weight_sync="nccl")
    # port 9 (discard): nothing answers there, so any request would fail with another error
    with pytest.raises(ConfigError, match=r"sampling\.weight_sync=nccl .* no CUDA device.*weight_sync=disk"):
        VLLMServerSampler("http://127.0.0.1:9", lambda d: None, tok, cfg, tmp_path, [tok.eos_token_id],
                          policy_weights=dict)
