"""The student sampled by the real vLLM-cpu engine (sampling.backend=vllm), colocated in this
process and served: the distribution it samples, its log-probs, the weight sync after a step, and
whole runs (distill, resume, one-step-off). These run inside .venv-vllm, where opd is installed
beside vLLM (`make test-vllm`).

vLLM's CPU attention supports head sizes 32, 64, 80, ... only: the tiny students here have one
head of 32 (or two of 32).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="the vLLM sampler tests run in .venv-vllm (make test-vllm)")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; a tiny model needs little

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py
from helpers import TINY_RUN, chat_ids, tiny  # noqa: E402

from opd.config import LoraConfig, LossConfig, ModelConfig, OptimConfig, SamplingConfig, load_config  # noqa: E402
from opd.learner.learner import Learner  # noqa: E402
from opd.loop import train  # noqa: E402
from opd.models import eos_token_ids, load_model  # noqa: E402
from opd.run_dir import read_metrics  # noqa: E402
from opd.sampler.vllm import VLLMSampler, VLLMServerSampler  # noqa: E402
from opd.vllm_server import VLLMServer  # noqa: E402

PROMPTS = ["Describe the garden in a few words.", "Hi", "Write one sentence about the winter sea, please, now."]


def colocated(learner: Learner, tokenizer, model, **sampling) -> VLLMSampler:
    return VLLMSampler(learner.policy_weights, lambda d: learner.export_policy(d, tokenizer), tokenizer,
                       SamplingConfig(**sampling), torch.float32, 256, 0, eos_token_ids(model, tokenizer))


def learner_of(model, lr=1e-2) -> Learner:
    return Learner(model, OptimConfig(lr=lr, warmup_steps=0), LossConfig(), 10, 8)


@pytest.fixture(scope="module")
def talker():
    """A tiny model pretrained to answer in short sentences ending with EOS (2 heads of 32)."""
    return tiny(hidden=64, num_heads=2, seed=2, pretrain_steps=200)


def test_first_token_frequencies_follow_the_model_not_its_generation_config(tmp_path):
    """A checkpoint whose generation_config asks for temperature 0.7 and top_p 0.9: vLLM must still
    sample from the model's temperature-1 distribution, the one the student is trained on."""
    model, tok = tiny(hidden=32, num_heads=1, seed=3, init_std=0.3)
    model.generation_config.temperature, model.generation_config.top_p = 0.7, 0.9
    model.generation_config.do_sample = True
    model.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    assert json.loads((tmp_path / "student" / "generation_config.json").read_text())["top_p"] == 0.9
    model, tok = load_model(ModelConfig(path=str(tmp_path / "student")), torch.device("cpu"))
    prompt = chat_ids(tok, ["Hi"])[0]
    sampler = colocated(learner_of(model), tok, model, samples_per_prompt=4000, max_new_tokens=1)
    try:
        r = sampler.sample([prompt], seed=0)
    finally:
        sampler.close()
    first = r.tokens[:, r.prompt_width]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    probs = logits.softmax(-1)
    counts = torch.bincount(first, minlength=probs.numel()).float() / first.numel()
    top = probs.topk(5).indices
    # binomial standard error at n=4000 is below 0.008; allow 4 of them
    assert (counts[top] - probs[top]).abs().max() < 0.032
    biased = (logits / 0.7).softmax(-1)
    assert (biased[top] - probs[top]).abs().max() > 0.06  # the check can tell the two apart
    torch.testing.assert_close(r.behaviour_logprobs[:, r.prompt_width], probs.log()[first], atol=1e-4, rtol=1e-4)


def test_behaviour_logprobs_and_layout_equal_the_learner(talker):
    model, tok = talker
    learner = learner_of(model)
    sampler = colocated(learner, tok, model, samples_per_prompt=4, max_new_tokens=40)
    try:
        r = sampler.sample(chat_ids(tok, PROMPTS), seed=1)
    finally:
        sampler.close()
    logprobs, entropy = learner.policy_logprobs(r)
    torch.testing.assert_close(r.behaviour_logprobs, logprobs, atol=1e-4, rtol=1e-4)
    assert r.entropy is None  # the engine returns the sampled token's log-prob only
    assert r.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert r.completion_mask[:, :r.prompt_width].sum() == 0
    finished = 0
    for i in range(r.batch_size):
        length = int(r.completion_lengths[i])
        completion = r.tokens[i, r.prompt_width:].tolist()
        if not r.truncated[i]:
            finished += 1
            assert completion[length - 1] == tok.eos_token_id  # EOS is the last completion token
            assert all(t == tok.pad_token_id for t in completion[length:])
        else:
            assert length == 40
    assert finished >= 8  # the pretrained model does stop, and vLLM stops with it


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_after_a_step_and_a_sync_the_engine_samples_the_updated_learner(lora):
    spec = ModelConfig(tiny={"hidden_size": 32, "num_heads": 1, "seed": 4, "init_std": 0.3},
                       lora=LoraConfig(rank=4, alpha=8) if lora else None)
    model, tok = load_model(spec, torch.device("cpu"))
    learner = learner_of(model, lr=3e-2)
    sampler = colocated(learner, tok, model, samples_per_prompt=4, max_new_tokens=12)
    prompts = chat_ids(tok, PROMPTS)
    try:
        before = sampler.sample(prompts, seed=5)
        old_logprobs, _ = learner.policy_logprobs(before)
        advantages = torch.randn_like(before.behaviour_logprobs) * before.completion_mask
        if lora:  # the adapter starts at zero (B = 0); a couple of steps move it clearly
            learner.train_step(before, advantages)
        learner.train_step(before, advantages)
        new_logprobs, _ = learner.policy_logprobs(before)
        assert (new_logprobs - old_logprobs).abs().max() > 1e-2  # the step changed the policy

        sampler.sync_weights()
        after = sampler.sample(prompts, seed=5)
        expected, _ = learner.policy_logprobs(after)
        torch.testing.assert_close(after.behaviour_logprobs, expected, atol=1e-4, rtol=1e-4)
    finally:
        sampler.close()


def run_cfg(tmp_path: Path, name: str, *extra: str):
    overrides = [o for o in TINY_RUN if not o.startswith("student.tiny.")]
    overrides += ["student.tiny.hidden_size=32", "student.tiny.num_heads=1", "student.tiny.seed=1",
                  "train.steps=6", f"run_dir={tmp_path / name}", *extra]
    return load_config(None, overrides)


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "model" / "model.safetensors"))


def test_a_distill_run_on_vllm_learns_like_hf_and_resumes_exactly(tmp_path):
    learn = ("student.tiny.pretrain_steps=40", "train.steps=30", "train.prompts_per_step=8",
             "sampling.max_new_tokens=20")
    runs = {"hf": train(run_cfg(tmp_path, "hf", *learn)),
            "vllm": train(run_cfg(tmp_path, "vllm", *learn, "sampling.backend=vllm"))}
    steps = {name: [m for m in read_metrics(Path(s["run_dir"]) / "metrics.jsonl") if m["step"] > 0]
             for name, s in runs.items()}
    drop = {}
    for name, rows in steps.items():  # the training batches' KL, first 5 steps against the last 5
        kl = [m["teacher_kl"] for m in rows]
        drop[name] = 1 - (sum(kl[-5:]) / 5) / (sum(kl[:5]) / 5)
    # measured: about 11% for both (HF 4.02 -> 3.59, vLLM 4.03 -> 3.60); eval KL falls too
    assert drop["hf"] > 0.05 and drop["vllm"] > 0.05, drop
    assert drop["vllm"] > 0.5 * drop["hf"], drop
    assert runs["vllm"]["last_eval"]["eval/teacher_kl"] < runs["vllm"]["start_eval"]["eval/teacher_kl"]
    assert max(m["logprob_mismatch"] for m in steps["vllm"]) < 1e-4  # synced every step (measured ~2e-7)

    # Stop after 3 steps, resume: the same weights as an uninterrupted run on vLLM.
    straight = run_cfg(tmp_path, "vllm_straight", "sampling.backend=vllm")
    train(straight)
    split = run_cfg(tmp_path, "vllm_resumed", "sampling.backend=vllm")
    train(split, stop_after=3)
    train(split, resume=True)
    resumed = read_metrics(Path(split.run_dir) / "metrics.jsonl")
    assert [m["step"] for m in resumed if m["step"] > 0] == [1, 2, 3, 4, 5, 6]
    expected, got = final_weights(Path(straight.run_dir)), final_weights(Path(split.run_dir))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)


def test_one_step_off_sampling_on_vllm(tmp_path):
    sync = read_metrics(Path(train(run_cfg(tmp_path, "sync", "sampling.backend=vllm", "train.steps=4"))["run_dir"])
                        / "metrics.jsonl")
    off = read_metrics(Path(train(run_cfg(tmp_path, "off", "sampling.backend=vllm", "train.steps=4",
                                          "train.max_staleness=1"))["run_dir"]) / "metrics.jsonl")
    steps = [m for m in off if m["step"] > 0]
    assert [m["staleness"] for m in steps] == [0, 1, 1, 1]
    first_sync = next(m for m in sync if m["step"] == 1)
    assert steps[0]["teacher_kl"] == pytest.approx(first_sync["teacher_kl"], abs=1e-6)
    assert steps[0]["loss"] == pytest.approx(first_sync["loss"], abs=1e-6)
    assert all(m["teacher_kl"] == m["teacher_kl"] for m in steps)  # finite: it trained


def served_student_syncs(server_url, learner, model, tok, tmp_path, **sampling):
    """Sample, train a step, sync, sample again: the server samples the learner's new weights."""
    sampler = VLLMServerSampler(server_url, lambda d: learner.export_policy(d, tok), tok,
                                SamplingConfig(samples_per_prompt=3, max_new_tokens=10, **sampling), tmp_path / "sync",
                                eos_token_ids(model, tok),
                                export_weights=lambda d: learner.export_policy(d, tok, weights_only=True),
                                policy_weights=learner.policy_weights)
    try:
        prompts = chat_ids(tok, PROMPTS)
        before = sampler.sample(prompts, seed=2)
        expected, _ = learner.policy_logprobs(before)
        torch.testing.assert_close(before.behaviour_logprobs, expected.cpu(), atol=1e-4, rtol=1e-4)
        for _ in range(2):  # the second sync is the disk path's weights-only one
            learner.train_step(before, torch.randn_like(before.behaviour_logprobs) * before.completion_mask)
            sampler.sync_weights()
        after = sampler.sample(prompts, seed=2)
        expected = learner.policy_logprobs(after)[0].cpu()  # (a learner on a GPU: compared on the CPU)
        stale = learner_of(tiny(hidden=32, num_heads=1, seed=4, init_std=0.3)[0]).policy_logprobs(after)[0]
        assert (stale - expected).abs().max() > 1e-2  # the old weights would give other log-probs
        torch.testing.assert_close(after.behaviour_logprobs, expected, atol=1e-4, rtol=1e-4)
    finally:
        sampler.close()


def test_a_served_student_reloads_the_learners_weights(tmp_path, vllm_python_or_skip):
    """sampling.url: the learner writes safetensors, the server reloads them (VLLM_SERVER_DEV_MODE);
    the config and tokenizer are written at the first sync only."""
    model, tok = tiny(hidden=32, num_heads=1, seed=4, init_std=0.3)
    model.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    learner = learner_of(model, lr=3e-2)
    server = VLLMServer(vllm_python_or_skip, tmp_path / "student", tmp_path / "server.log", dev_mode=True)
    server.start()
    try:
        served_student_syncs(server.url, learner, model, tok, tmp_path)
        sync = tmp_path / "sync"
        # written once (first sync), the weights after it (each later sync)
        assert (sync / "config.json").stat().st_mtime_ns < (sync / "model.safetensors").stat().st_mtime_ns
        assert (sync / "tokenizer.json").stat().st_mtime_ns <= (sync / "config.json").stat().st_mtime_ns + 10**9
    finally:
        server.stop()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL weight transfer needs a CUDA GPU (CUDA vLLM)")
def test_a_served_student_on_a_gpu_receives_the_weights_by_nccl(tmp_path, vllm_python_or_skip):
    """sampling.weight_sync=nccl: vLLM's weight transfer (the server started with
    --weight-transfer-config), no disk: nothing is written to sync_dir."""
    spec = ModelConfig(tiny={"hidden_size": 32, "num_heads": 1, "seed": 4, "init_std": 0.3})
    model, tok = load_model(spec, torch.device("cuda"))
    model.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    learner = learner_of(model, lr=3e-2)
    server = VLLMServer(vllm_python_or_skip, tmp_path / "student", tmp_path / "server.log",
                        extra_args=("--weight-transfer-config", '{"backend": "nccl"}'))
    server.start()
    try:
        served_student_syncs(server.url, learner, model, tok, tmp_path, weight_sync="nccl")
        assert not (tmp_path / "sync").exists()
    finally:
        server.stop()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA vLLM); CI has none")
def test_colocated_on_a_gpu_in_bf16_stays_in_sync():
    """On a GPU in bf16 the engine's kernels differ from the learner's: the mismatch is small, not 0."""
    spec = ModelConfig(tiny={"hidden_size": 64, "num_heads": 2, "seed": 4, "init_std": 0.3}, dtype="bfloat16")
    model, tok = load_model(spec, torch.device("cuda"))
    learner = learner_of(model, lr=3e-2)
    sampler = VLLMSampler(learner.policy_weights, lambda d: learner.export_policy(d, tok), tok,
                          SamplingConfig(samples_per_prompt=4, max_new_tokens=12), torch.bfloat16, 256, 0,
                          eos_token_ids(model, tok))
    try:
        prompts = chat_ids(tok, PROMPTS)
        batch = sampler.sample(prompts, seed=5)
        learner.train_step(batch, torch.randn_like(batch.behaviour_logprobs) * batch.completion_mask)
        sampler.sync_weights()
        after = sampler.sample(prompts, seed=5)
        expected, _ = learner.policy_logprobs(after)
        mask = after.completion_mask.bool()
        assert (after.behaviour_logprobs - expected)[mask].abs().mean() < 0.05
    finally:
        sampler.close()


def test_the_cpu_engine_starts_with_a_kv_cache_sized_for_the_step_and_says_what_to_set_when_it_cannot(
        talker, monkeypatch, capfd):
    """Without VLLM_CPU_KVCACHE_SPACE (vllm-cpu would want 92% of the RAM free), the colocated
    engine gets a KV cache for the step's rows and starts; a cache that cannot fit is one line
    naming the setting."""
    from opd.config import ConfigError
    from opd.vllm_memory import kv_cache_bytes

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    model, tok = talker
    learner = learner_of(model)
    eos = eos_token_ids(model, tok)
    sampler = VLLMSampler(learner.policy_weights, lambda d: learner.export_policy(d, tok), tok,
                          SamplingConfig(samples_per_prompt=2, max_new_tokens=8), torch.float32, 256, 0, eos,
                          model_config=model.config, rows=8)
    try:
        assert sampler.engine_args["kv_cache_memory_bytes"] == kv_cache_bytes(model.config, 8, 256, 4)
        assert sampler.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == kv_cache_bytes(
            model.config, 8, 256, 4)
        assert sampler.sample(chat_ids(tok, PROMPTS[:2]), seed=1).batch_size == 4
        capfd.readouterr()
        sampler.sync_weights()  # a step's sync prints nothing
        sampler.sync_weights()
        out = capfd.readouterr()
        assert "Failed to load weights" not in out.out + out.err and "Reloading" not in out.out + out.err
    finally:
        sampler.close()
    with pytest.raises(ConfigError, match="does not fit .*kv_cache_memory_bytes") as caught:
        VLLMSampler(learner.policy_weights, lambda d: learner.export_policy(d, tok), tok,
                    SamplingConfig(engine_args={"kv_cache_memory_bytes": 2**50}), torch.float32, 256, 0, eos,
                    model_config=model.config, rows=8)
    assert "\n" not in str(caught.value)
