"""k steps off-policy (train.max_staleness=k): the queue of batches sampled ahead, its exact
resume, the staleness logged per step, and the teacher-KL term taken from the learner's
recomputed log-probs (sampling.recompute_logprobs) on a stale batch. CPU only."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY_RUN, chat_ids, sampler, tiny
from opd.config import ConfigError, LossConfig, OptimConfig, load_config
from opd.learner.learner import Learner
from opd.loop import step_advantages, train
from opd.prefetch import StudentBatches, recompute_behaviour
from opd.teacher.hf import HFTeacher

TIMING_KEYS = {"sample_s", "score_s", "train_s", "sync_s", "wall_s_total", "sample_s_total", "score_s_total",
               "train_s_total", "eval_s_total"}
PROMPTS = ["Describe the garden in a few words.", "Hi", "Write one sentence about the winter sea, please, now.",
           "Give three facts."]


def run_config(run_dir, *overrides):
    return load_config(None, [f"run_dir={run_dir}", *TINY_RUN, *overrides])


def steps_of(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows if "staleness" in r]


def final_weights(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "model" / "model.safetensors"))


@pytest.mark.parametrize("k, extra", [(2, []), (3, []), (2, ["sampling.recompute_logprobs=true"])],
                         ids=["k2", "k3", "k2-recompute"])
def test_k_steps_off_resumes_bit_identically(tmp_path, k, extra):
    run = ["train.steps=5", f"train.max_staleness={k}", "log.rollouts_every=1", *extra]
    train(run_config(tmp_path / "straight", *run))
    first = train(run_config(tmp_path / "split", *run), stop_after=2)
    assert first["interrupted"] and first["steps_done"] == 2
    # the checkpoint of step 2 holds the batches of steps 3..2+k, sampled ahead
    state = json.loads((tmp_path / "split" / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["batch_ahead"]["queue"]] == list(range(3, min(2 + k, 5) + 1))
    train(run_config(tmp_path / "split", *run), resume=True)

    straight, split = steps_of(tmp_path / "straight"), steps_of(tmp_path / "split")
    # staleness per step: 0 (sampled at step 1), then one more each step up to k
    assert [r["staleness"] for r in straight] == [min(s, k) for s in range(5)]
    assert split == straight
    a, b = final_weights(tmp_path / "straight", 5), final_weights(tmp_path / "split", 5)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[name], b[name]) for name in a)
    for step in (3, 5):
        assert (tmp_path / "split" / "rollouts" / f"step_{step:06d}.jsonl").read_text() == \
            (tmp_path / "straight" / "rollouts" / f"step_{step:06d}.jsonl").read_text()


def test_staleness_of_any_size_is_accepted_and_recompute_goes_with_it(tmp_path):
    cfg = run_config(tmp_path / "run", "train.max_staleness=3", "sampling.recompute_logprobs=true",
                     "sampling.importance_cap=2.0")
    assert cfg.train.max_staleness == 3 and cfg.sampling.recompute_logprobs
    with pytest.raises(ConfigError, match=r"train\.max_staleness"):
        run_config(tmp_path / "run", "train.max_staleness=-1")


@pytest.fixture(scope="module")
def stale_batch():
    """A batch sampled by an older student (seed 1), a current student (seed 3: other weights, the
    same shapes) and a teacher's scores of the batch."""
    old, tok = tiny(hidden=32, seed=1)
    current, _ = tiny(hidden=32, seed=3)
    torch.manual_seed(0)
    batch = sampler(old, tok, samples_per_prompt=3, max_new_tokens=12).sample(chat_ids(tok, PROMPTS))
    teacher, _ = tiny(hidden=48, seed=2)
    scores = HFTeacher(teacher, tok).score(batch)
    return batch, current, tok, scores


def test_the_recomputed_kl_term_equals_a_synchronous_runs_on_the_same_batch(stale_batch, tmp_path):
    batch, current, tok, scores = stale_batch
    learner = Learner(current, OptimConfig(), LossConfig(chunk_size=5), total_steps=1, micro_batch_size=5)
    cfg = run_config(tmp_path / "run", "sampling.recompute_logprobs=true", "train.max_staleness=2")
    stale = copy.copy(batch)
    recompute_behaviour(cfg, learner, stale, staleness=2)

    # A synchronous run samples from the current student, so its behaviour log-probs are the
    # current student's: those of the same tokens, scored teacher-forced by another code path.
    synchronous = copy.copy(batch)
    synchronous.behaviour_logprobs = HFTeacher(copy.deepcopy(current), tok).score(batch).logprobs * batch.completion_mask
    sync_cfg = run_config(tmp_path / "run")
    expected = step_advantages(sync_cfg, synchronous, scores, None)
    torch.testing.assert_close(step_advantages(cfg, stale, scores, None), expected, atol=1e-5, rtol=0)
    # the stale student's KL term is another one: what the recomputation corrects
    assert (step_advantages(sync_cfg, batch, scores, None) - expected).abs().max() > 0.1

    # the importance ratio still corrects for the staleness: the engine's log-probs stay the behaviour's
    assert torch.equal(stale.behaviour_logprobs, batch.behaviour_logprobs) and stale.importance_weights is None


def test_a_capped_stale_batch_is_weighted_by_the_current_over_the_old_policy(stale_batch, tmp_path):
    batch, current, _, _ = stale_batch
    learner = Learner(current, OptimConfig(), LossConfig(chunk_size=5), total_steps=1, micro_batch_size=5)
    cfg = run_config(tmp_path / "run", "sampling.recompute_logprobs=true", "sampling.importance_cap=1.2",
                     "train.max_staleness=1")
    capped = copy.copy(batch)
    out = recompute_behaviour(cfg, learner, capped, staleness=1)
    mask = batch.completion_mask
    assert torch.equal(capped.behaviour_logprobs, capped.recomputed_logprobs)
    expected = torch.exp(capped.recomputed_logprobs - batch.behaviour_logprobs).clamp(max=1.2) * mask
    assert torch.equal(capped.importance_weights, expected)
    assert float(expected.max()) == pytest.approx(1.2) and float(expected[mask.bool()].min()) < 0.9  # both sides of 1
    assert out["importance_weight_mean"] == pytest.approx(float(expected.sum()) / float(mask.sum()))


def test_a_batch_saved_ahead_by_an_older_opd_resumes_as_one_step_stale(stale_batch, tmp_path):
    batch, *_ = stale_batch

    class Components:  # only what restoring the queue reads
        learner = type("L", (), {"device": torch.device("cpu")})()

    batches = StudentBatches(run_config(tmp_path / "run", "train.max_staleness=1"), Components(), schedule=None)
    batches.restore({"step": 7, "batch": batch})  # the one-batch state an opd before the queue saved
    taken, staleness = batches.take(7)
    assert taken is not None and staleness == 1 and torch.equal(taken.tokens, batch.tokens)
    batches.close()
