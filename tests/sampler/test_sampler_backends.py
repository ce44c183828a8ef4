"""Sampling backends and off-policy corrections: one-step-off sampling (train.max_staleness=1; k steps
off are in test_staleness.py), the learner's recomputed behaviour log-probs and truncated importance
weights, the merged policy an inference engine loads, engine completions laid out as the HF sampler
lays them out, and the config checks around them. CPU only, without vLLM."""

import copy
import importlib.util
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY_RUN, chat_ids, sampler, tiny
from opd.config import ConfigError, LoraConfig, LossConfig, OptimConfig, SamplingConfig, load_config
from opd.learner.learner import Learner
from opd.loop import train
from opd.rollouts import sampled_batch
from opd.sampler.hf import HFSampler

PROMPTS = ["Describe the garden in a few words.", "Hi", "Write one sentence about the winter sea, please, now.",
           "Give three facts."]
TIMING_KEYS = {"sample_s", "score_s", "train_s", "sync_s", "wall_s_total", "sample_s_total", "score_s_total", "train_s_total",
               "eval_s_total"}


def run_config(run_dir, *overrides):
    return load_config(None, [f"run_dir={run_dir}", *TINY_RUN, *overrides])


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timings(row):
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def final_weights(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "model" / "model.safetensors"))


RUN4 = ["train.steps=4", "log.rollouts_every=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """4-step distill runs, same seed: synchronous, and one-step-off (shared by the tests below)."""
    root = tmp_path_factory.mktemp("staleness")
    train(run_config(root / "sync", *RUN4, "train.max_staleness=0"))
    train(run_config(root / "stale", *RUN4, "train.max_staleness=1"))
    return root / "sync", root / "stale"


# 1. one-step-off sampling


def test_one_step_off_run_trains_and_starts_like_the_synchronous_one(runs):
    sync_dir, stale_dir = runs
    sync, stale = metrics(sync_dir), metrics(stale_dir)
    assert [r["step"] for r in stale if "staleness" in r] == [1, 2, 3, 4]
    # step 1 has nothing sampled ahead; every later batch came from the weights before the previous update
    assert [r["staleness"] for r in stale if "staleness" in r] == [0, 1, 1, 1]
    assert [r["staleness"] for r in sync if "staleness" in r] == [0, 0, 0, 0]

    step1_sync = next(r for r in sync if r["step"] == 1)
    step1_stale = next(r for r in stale if r["step"] == 1)
    assert "teacher_kl" in step1_sync and "loss" in step1_sync
    # the same seed samples the same first batch from the same weights: step 1 is the same step
    # (bit-exact needs the sampler's copy to compute as the learner's model does: with
    # requires_grad=False, F.linear on the prefill's non-contiguous last position takes another
    # ATen path in lm_head, ~1e-6 apart)
    assert without_timings(step1_stale) == without_timings(step1_sync)
    assert (stale_dir / "rollouts" / "step_000001.jsonl").read_text() == \
        (sync_dir / "rollouts" / "step_000001.jsonl").read_text()
    # step 2's batch differs: drawn from the pre-update weights with a seed of its own
    assert (stale_dir / "rollouts" / "step_000002.jsonl").read_text() != \
        (sync_dir / "rollouts" / "step_000002.jsonl").read_text()

    for row in stale[1:]:  # it trains: finite losses, updates not skipped
        assert row["skipped"] == 0 and torch.isfinite(torch.tensor(row["loss"]))
    # off-policy by one update: the importance ratio is no longer exactly 1 after step 1
    assert step1_stale["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
    assert any(abs(r["ratio_mean"] - 1.0) > 1e-4 for r in stale if r["step"] >= 2)

    a, b = final_weights(sync_dir, 4), final_weights(stale_dir, 4)
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)  # a different algorithm after step 1


# 2. exact resume with a batch sampled ahead


def test_one_step_off_resume_is_bit_identical(runs, tmp_path):
    _, straight = runs
    split = tmp_path / "split"
    first = train(run_config(split, *RUN4, "train.max_staleness=1"), stop_after=2)
    assert first["interrupted"] and first["steps_done"] == 2
    second = train(run_config(split, *RUN4, "train.max_staleness=1"), resume=True)
    assert second["steps_done"] == 4 and not second["interrupted"]

    a, b = final_weights(straight, 4), final_weights(split, 4)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows = metrics(split)
    steps = [r["step"] for r in rows]
    assert sorted(steps) == steps and len(steps) == len(set(steps)) and steps[-4:] == [1, 2, 3, 4]
    assert [without_timings(r) for r in rows] == [without_timings(r) for r in metrics(straight)]
    # step 3 used the batch sampled during step 2 and saved with its checkpoint
    assert next(r for r in rows if r["step"] == 3)["staleness"] == 1
    assert (split / "rollouts" / "step_000003.jsonl").read_text() == \
        (straight / "rollouts" / "step_000003.jsonl").read_text()


# 3. the learner's log-probs are the sampler's


@pytest.fixture(scope="module")
def student_batch():
    model, tok = tiny(hidden=32, seed=1)
    torch.manual_seed(0)
    rollouts = sampler(model, tok, samples_per_prompt=3, max_new_tokens=12).sample(chat_ids(tok, PROMPTS))
    return model, tok, rollouts


def test_policy_logprobs_equal_the_samplers(student_batch):
    model, _, rollouts = student_batch
    # uneven micro-batches and chunks: the layout must not matter
    learner = Learner(model, OptimConfig(), LossConfig(chunk_size=5), total_steps=1, micro_batch_size=5)
    model.train()
    logprobs, entropy = learner.policy_logprobs(rollouts)
    assert model.training  # the mode is restored
    assert logprobs.shape == entropy.shape == rollouts.tokens.shape
    mask = rollouts.completion_mask
    assert mask.sum() > 20
    torch.testing.assert_close(logprobs, rollouts.behaviour_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy, rollouts.entropy, atol=1e-4, rtol=0)
    assert torch.all(logprobs[mask == 0] == 0) and torch.all(entropy[mask == 0] == 0)
    assert torch.all(entropy[mask == 1] > 0) and torch.all(logprobs[mask == 1] < 0)
    assert not logprobs.requires_grad


# 4. recomputed behaviour log-probs through the loop


def test_recomputed_logprobs_match_the_hf_sampler_in_a_run(tmp_path):
    train(run_config(tmp_path / "recompute", "train.steps=2", "sampling.recompute_logprobs=true"))
    train(run_config(tmp_path / "capped", "train.steps=2", "sampling.recompute_logprobs=true",
                     "sampling.importance_cap=2.0"))
    recompute = [r for r in metrics(tmp_path / "recompute") if r["step"] >= 1]
    capped = [r for r in metrics(tmp_path / "capped") if r["step"] >= 1]
    assert len(recompute) == len(capped) == 2
    for row in recompute + capped:
        # learner and HF sampler are the same model: only float rounding separates them
        assert 0 <= row["logprob_mismatch"] < 1e-4
        assert row["ratio_mean"] == pytest.approx(1.0, abs=1e-4)
        assert "entropy" in row
    assert all("importance_weight_mean" not in r for r in recompute)
    for row in capped:
        assert row["importance_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    # weights of ~1 leave the step as it was
    assert capped[0]["loss"] == pytest.approx(recompute[0]["loss"], rel=1e-3, abs=1e-5)
    assert capped[0]["teacher_kl"] == recompute[0]["teacher_kl"]


def test_bf16_sampler_in_a_run_with_the_bf16_learner(tmp_path):
    """sampling.dtype=bfloat16 beside train.compute_dtype=bfloat16 (whose fp32 attention the copy
    inherits): the run trains, and its samples' log-probs are the bf16 copy's, near the learner's."""
    train(run_config(tmp_path / "run", "train.steps=2", "sampling.dtype=bfloat16", "train.compute_dtype=bfloat16",
                     "sampling.recompute_logprobs=true"))
    rows = [r for r in metrics(tmp_path / "run") if r["step"] >= 1]
    assert len(rows) == 2
    for row in rows:
        # bf16 rounds the logits by ~1e-2 of their size; the same model in fp32 gives < 1e-4 (above)
        assert 1e-4 < row["logprob_mismatch"] < 0.05, row["logprob_mismatch"]
        assert row["ratio_mean"] == pytest.approx(1.0, abs=1e-4)  # the learner's log-probs are the behaviour's


def test_recompute_behaviour_weights_each_token_by_the_capped_ratio(student_batch, tmp_path):
    from opd.prefetch import recompute_behaviour

    model, _, rollouts = student_batch
    learner = Learner(model, OptimConfig(), LossConfig(chunk_size=5), total_steps=1, micro_batch_size=5)
    mask = rollouts.completion_mask
    # an engine whose log-probs are off: +0.5 on even rows (ratio e^-0.5), -1 on odd rows (e^1 > cap 2)
    delta = torch.where(torch.arange(rollouts.batch_size)[:, None] % 2 == 0, 0.5, -1.0) * mask
    batch = copy.copy(rollouts)
    batch.behaviour_logprobs = rollouts.behaviour_logprobs + delta
    cfg = run_config(tmp_path / "run", "sampling.recompute_logprobs=true", "sampling.importance_cap=2.0")
    out = recompute_behaviour(cfg, learner, batch)

    n = float(mask.sum())
    torch.testing.assert_close(batch.behaviour_logprobs, rollouts.behaviour_logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.entropy, rollouts.entropy, atol=1e-4, rtol=0)
    assert out["logprob_mismatch"] == pytest.approx(float(delta.abs().sum()) / n, rel=1e-4)
    expected = torch.where(delta > 0, torch.exp(torch.tensor(-0.5)), torch.tensor(2.0)) * mask
    torch.testing.assert_close(batch.importance_weights, expected, atol=1e-4, rtol=0)
    assert out["importance_weight_mean"] == pytest.approx(float(expected.sum()) / n, rel=1e-4)

    # without a cap only the log-probs are replaced
    plain = copy.copy(rollouts)
    plain.behaviour_logprobs = rollouts.behaviour_logprobs + delta
    out = recompute_behaviour(run_config(tmp_path / "run", "sampling.recompute_logprobs=true"), learner, plain)
    assert plain.importance_weights is None and "importance_weight_mean" not in out


# 5. truncated importance weights enter the policy-gradient loss


def test_importance_weights_scale_the_policy_gradient(student_batch):
    model, _, rollouts = student_batch
    mask = rollouts.completion_mask
    gen = torch.Generator().manual_seed(0)
    advantages = torch.randn(mask.shape, generator=gen) * mask
    weights = torch.rand(mask.shape, generator=gen) * 2 * mask

    def step(batch, adv):
        m = copy.deepcopy(model)
        learner = Learner(m, OptimConfig(lr=1e-3, warmup_steps=0, grad_clip=None), LossConfig(chunk_size=7),
                          total_steps=10, micro_batch_size=5)
        out = learner.train_step(batch, adv)
        return out["loss"], [p.grad.clone() for p in m.parameters()]

    def with_weights(w):
        batch = copy.copy(rollouts)
        batch.importance_weights = w
        return batch

    base_loss, base_grads = step(rollouts, advantages)
    half_loss, half_grads = step(with_weights(0.5 * mask), advantages)
    assert abs(base_loss) > 1e-3
    assert half_loss == pytest.approx(0.5 * base_loss, rel=1e-5)
    for g, h in zip(base_grads, half_grads):
        torch.testing.assert_close(h, 0.5 * g, atol=1e-8, rtol=1e-5)

    # a per-token weight w is the same as an advantage w * A (on policy the ratio is 1)
    w_loss, w_grads = step(with_weights(weights), advantages)
    wa_loss, wa_grads = step(rollouts, weights * advantages)
    n = mask.sum()
    assert w_loss == pytest.approx(wa_loss, rel=1e-5)
    assert w_loss == pytest.approx(float(-(weights * advantages).sum() / n), rel=1e-4)
    for a, b in zip(w_grads, wa_grads):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-5)
    assert rollouts.importance_weights is None  # the shallow copies did not touch the shared batch


# 6. the merged LoRA policy an engine loads


def test_lora_policy_weights_are_the_merged_model(student_batch, tmp_path):
    from transformers import AutoModelForCausalLM

    from opd.models import apply_lora

    base, tok, rollouts = student_batch
    peft_model = apply_lora(copy.deepcopy(base), LoraConfig(rank=4, alpha=8.0))
    learner = Learner(peft_model, OptimConfig(lr=5e-2, warmup_steps=0), LossConfig(), 10, 6)
    advantages = torch.randn(rollouts.completion_mask.shape, generator=torch.Generator().manual_seed(1))
    learner.train_step(rollouts, advantages * rollouts.completion_mask)
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # trained: the merge is not the base

    ids = torch.tensor([chat_ids(tok, PROMPTS[:1])[0]])
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
    weights = learner.policy_weights()
    merged = copy.deepcopy(peft_model).merge_and_unload()
    expected = merged.state_dict()
    assert weights.keys() == expected.keys()
    assert not [k for k in weights if "lora_" in k or "base_layer" in k]
    for name in expected:
        torch.testing.assert_close(weights[name], expected[name], atol=1e-6, rtol=0, msg=name)
    assert any(not torch.allclose(weights[k], base.state_dict()[k]) for k in weights)
    with torch.no_grad():  # the trained model is untouched (still an adapter over its base)
        torch.testing.assert_close(peft_model(input_ids=ids).logits, before, atol=0, rtol=0)
    assert any("lora_" in n for n, _ in peft_model.named_parameters())

    learner.export_policy(tmp_path / "policy", tok)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert not any("lora_" in k for k in load_file(str(tmp_path / "policy" / "model.safetensors")))
    assert not (tmp_path / "policy" / "model.safetensors.partial").exists()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=0)
    learner.export_policy(tmp_path / "policy", tok)  # exported again after each step: overwrites


def test_full_model_policy_weights_are_its_state_dict(student_batch):
    model, _, _ = student_batch
    learner = Learner(model, OptimConfig(), LossConfig(), 1, 4)
    weights = learner.policy_weights()
    state = model.state_dict()
    assert weights.keys() == state.keys()
    assert all(torch.equal(weights[k], state[k]) for k in state)


# 7. engine completions in the HF sampler's layout


def test_sampled_batch_rebuilds_the_hf_samplers_layout():
    model, tok = tiny(hidden=64, seed=2, pretrain_steps=200)  # the run's teacher: it ends with EOS
    ids = chat_ids(tok, PROMPTS)
    assert len({len(p) for p in ids}) == len(ids)  # prompts of different lengths: left padding
    torch.manual_seed(3)
    r = sampler(model, tok, samples_per_prompt=2, max_new_tokens=10).sample(ids, prompts=PROMPTS)
    assert r.truncated.any() and not r.truncated.all()  # both kinds of row

    width = r.prompt_width
    lengths = r.completion_lengths.long().tolist()
    completions = [r.tokens[i, width:width + n].tolist() for i, n in enumerate(lengths)]
    logprobs = [r.behaviour_logprobs[i, width:width + n].tolist() for i, n in enumerate(lengths)]
    ended = (~r.truncated).tolist()
    rebuilt = sampled_batch(ids, completions, logprobs, ended, 2, tok.pad_token_id, prompts=PROMPTS)

    assert rebuilt.prompt_width == width
    assert torch.equal(rebuilt.tokens, r.tokens)
    assert torch.equal(rebuilt.attention_mask, r.attention_mask)
    assert torch.equal(rebuilt.completion_mask, r.completion_mask)
    assert torch.equal(rebuilt.behaviour_logprobs, r.behaviour_logprobs)
    assert torch.equal(rebuilt.truncated, r.truncated)
    assert torch.equal(rebuilt.group_ids, r.group_ids)
    assert rebuilt.prompts == PROMPTS and rebuilt.entropy is None and rebuilt.importance_weights is None
    assert rebuilt.tokens.dtype == r.tokens.dtype and rebuilt.completion_mask.dtype == r.completion_mask.dtype


# 8. vLLM not installed


def real_vllm_installed() -> bool:
    # tests/vllm is on pytest's sys.path as a namespace package named `vllm`: only a spec with a
    # file is the real engine
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


@pytest.mark.skipif(real_vllm_installed(), reason="vLLM is installed here")
def test_vllm_backend_without_vllm_says_how_to_install(tmp_path, monkeypatch):
    from opd.components import build

    # None in sys.modules makes `import vllm` fail, so that the tests/vllm folder cannot pass for it
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ConfigError) as err:
        build(run_config(tmp_path / "run", "sampling.backend=vllm"))
    message = str(err.value)
    assert "pip install" in message and "opd[vllm]" in message and "sampling.backend=vllm" in message


# 9. config checks


@pytest.mark.parametrize("overrides, key", [
    (["sampling.url=http://localhost:8000/v1"], "sampling.url"),
    (["sampling.importance_cap=2.0"], "sampling.importance_cap"),
    (["sampling.backend=vllm", "sampling.dtype=bfloat16"], "sampling.engine_args.dtype"),
], ids=["url-needs-vllm", "cap-needs-recompute", "dtype-is-the-hf-samplers"])
def test_inconsistent_sampling_settings_are_refused(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_config(tmp_path / "run", *overrides)


def test_consistent_sampling_settings_are_accepted(tmp_path):
    cfg = run_config(tmp_path / "run", "sampling.backend=vllm", "sampling.url=http://localhost:8000/v1",
                     "sampling.recompute_logprobs=true", "sampling.importance_cap=2.0")
    assert cfg.sampling.importance_cap == 2.0 and cfg.train.max_staleness == 0
    with pytest.raises(ConfigError, match=r"train\.max_staleness"):
        run_config(tmp_path / "run", "train.max_staleness=-1")
    with pytest.raises(ConfigError, match=r"sampling\.importance_cap"):
        run_config(tmp_path / "run", "sampling.recompute_logprobs=true", "sampling.importance_cap=0.5")


# 10. a sampler with its own copy of the weights


def test_own_copy_sampler_follows_the_learner_only_after_sync():
    model, tok = tiny(hidden=32, seed=4, init_std=0.2)
    ids = chat_ids(tok, PROMPTS[:3])
    cfg = SamplingConfig(samples_per_prompt=2, max_new_tokens=8)
    own = HFSampler(model, tok, cfg, own_copy=True)
    shared = HFSampler(model, tok, cfg)
    assert all(p.requires_grad for p in model.parameters())  # the learner's model is left trainable
    assert not {p.data_ptr() for p in own.model.parameters()} & {p.data_ptr() for p in model.parameters()}

    before = own.sample(ids, seed=11)
    torch.manual_seed(123)  # `seed` alone decides the batch, not torch's global generator
    again = own.sample(ids, seed=11)
    assert torch.equal(before.tokens, again.tokens)
    assert torch.equal(before.behaviour_logprobs, again.behaviour_logprobs)
    assert torch.equal(shared.sample(ids, seed=11).tokens, before.tokens)  # same weights, same draws

    with torch.no_grad():  # the learner's update
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    moved = shared.sample(ids, seed=11)
    assert not torch.equal(moved.behaviour_logprobs, before.behaviour_logprobs)
    stale = own.sample(ids, seed=11)  # still the old weights
    assert torch.equal(stale.tokens, before.tokens)
    assert torch.equal(stale.behaviour_logprobs, before.behaviour_logprobs)
    assert torch.equal(own.sample(ids, greedy=True).tokens, HFSampler(
        copy.deepcopy(own.model), tok, cfg).sample(ids, greedy=True).tokens)

    own.sync_weights()
    synced = own.sample(ids, seed=11)
    assert torch.equal(synced.tokens, moved.tokens)
    # bit-exact only if the copy keeps the learner's requires_grad flags (other matmul paths otherwise)
    assert torch.equal(synced.behaviour_logprobs, moved.behaviour_logprobs), \
        float((synced.behaviour_logprobs - moved.behaviour_logprobs).abs().max())
    assert torch.equal(own.sample(ids, greedy=True).tokens, shared.sample(ids, greedy=True).tokens)


def test_bf16_sampler_samples_from_a_bf16_copy_that_follows_the_learner():
    """sampling.dtype=bfloat16: the sampler decodes a bf16 copy of the learner's weights (through
    the lean decoder, attention in fp32), its log-probs are that copy's own forward's and near the
    fp32 model's; sync_weights brings the copy to the learner's new weights; the learner's model
    stays fp32 and trainable."""
    from opd.sampler.decoder import LeanDecoder
    from opd.teacher.hf import HFTeacher

    model, tok = tiny(hidden=32, seed=4, init_std=0.2)
    ids = chat_ids(tok, PROMPTS[:3])
    cfg = SamplingConfig(samples_per_prompt=2, max_new_tokens=12)
    assert HFSampler(model, tok, cfg, dtype=torch.float32).model is model  # its own dtype: shared
    bf16 = HFSampler(model, tok, cfg, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32} and all(p.requires_grad for p in model.parameters())

    r = bf16.sample(ids, seed=3)
    assert bf16.decoder_class is LeanDecoder, bf16.lean_unsupported
    mask = r.completion_mask.bool()
    own_forward = HFTeacher(copy.deepcopy(bf16.model), tok, chunk_size=8).score(r).logprobs
    fp32_forward = HFTeacher(copy.deepcopy(model), tok, chunk_size=8).score(r).logprobs
    # the model's own bf16 forward attends in bf16, the decoder in fp32: within bf16's rounding
    assert float((own_forward - r.behaviour_logprobs)[mask].abs().max()) < 0.1
    mismatch = (fp32_forward - r.behaviour_logprobs)[mask].abs()
    assert 0 < float(mismatch.mean()) < 0.03 and float(mismatch.max()) < 0.2

    with torch.no_grad():  # the learner's update
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    assert not torch.equal(bf16.model.lm_head.weight, model.lm_head.weight.bfloat16())
    bf16.sync_weights()
    for mine, learners in zip(bf16.model.parameters(), model.parameters()):
        assert mine.dtype == torch.bfloat16 and torch.equal(mine, learners.bfloat16())


def test_a_lora_students_own_copy_is_the_merged_policy_and_follows_the_adapter():
    """Under LoRA the sampler's own copy is a plain model with the adapter merged (W + s B A): no
    LoRA modules, so the lean decoder joins its products; it samples what the LoRA model samples,
    and after the adapter moves, sync_weights brings the merged weights along. The learner's
    model keeps its adapter, trainable."""
    from opd.models import apply_lora, merged_weights
    from opd.sampler.decoder import LeanDecoder

    base, tok = tiny(hidden=32, seed=4, init_std=0.2)
    model = apply_lora(base, LoraConfig(rank=4, alpha=8.0))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]

    def move_adapter(scale):
        with torch.no_grad():
            for p in lora_b:
                p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))

    move_adapter(0.3)  # a trained adapter: the merge is not the base
    ids = chat_ids(tok, PROMPTS[:3])
    cfg = SamplingConfig(samples_per_prompt=2, max_new_tokens=10)
    own, shared = HFSampler(model, tok, cfg, own_copy=True), HFSampler(model, tok, cfg)
    assert not any("lora" in name for name, _ in own.model.named_modules())
    assert any("lora" in name for name, _ in model.named_modules()) and all(p.requires_grad for p in lora_b)

    def same_samples():
        mine, theirs = own.sample(ids, seed=5), shared.sample(ids, seed=5)
        assert own.decoder_class is LeanDecoder, own.lean_unsupported
        assert torch.equal(mine.tokens, theirs.tokens)
        torch.testing.assert_close(mine.behaviour_logprobs, theirs.behaviour_logprobs, atol=1e-5, rtol=1e-5)
        return mine

    before = same_samples()
    move_adapter(0.5)
    assert not torch.equal(shared.sample(ids, seed=5).behaviour_logprobs, before.behaviour_logprobs)
    own.sync_weights()
    same_samples()
    for name, tensor in merged_weights(model).items():
        torch.testing.assert_close(own.model.state_dict()[name], tensor, msg=name)
