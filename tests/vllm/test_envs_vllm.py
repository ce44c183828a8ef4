"""Env episodes on the real vLLM-cpu engine (colocated): each turn one batched generate call, the
sampled ids kept, environment tokens out of the loss mask (`make test-vllm`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm", reason="the vLLM sampler tests run in .venv-vllm (make test-vllm)")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py
from helpers import chat_ids, tiny  # noqa: E402

from opd.config import LossConfig, OptimConfig, SamplingConfig  # noqa: E402
from opd.data import Prompt  # noqa: E402
from opd.envs import StepOutcome  # noqa: E402
from opd.envs.episodes import EpisodeSampler  # noqa: E402
from opd.learner.learner import Learner  # noqa: E402
from opd.models import eos_token_ids  # noqa: E402
from opd.sampler.vllm import VLLMSampler  # noqa: E402


class TwoTools:
    def reset(self, record):
        self.turn = 0
        return list(record["messages"])

    def step(self, text):
        self.turn += 1
        if self.turn == 3:
            return StepOutcome(done=True, reward=1.0)
        return StepOutcome([{"role": "tool", "content": f"result {self.turn}"}], done=False, tool_calls=1)


def test_vllm_runs_multi_turn_episodes():
    model, tok = tiny(hidden=32, num_heads=1, seed=3)
    learner = Learner(model, OptimConfig(warmup_steps=0), LossConfig(), 10, 8)
    inner = VLLMSampler(learner.policy_weights, lambda d: learner.export_policy(d, tok), tok,
                        SamplingConfig(samples_per_prompt=2, max_new_tokens=6), torch.float32, 256, 0,
                        eos_token_ids(model, tok))
    calls = []
    sample = inner.sample
    inner.sample = lambda ids, **kw: calls.append(len(ids)) or sample(ids, **kw)
    texts = ["Hi", "What is 2*3?"]
    prompts = [Prompt(ids, t, {"messages": [{"role": "user", "content": t}]}) for ids, t in zip(chat_ids(tok, texts), texts)]
    try:
        batch = EpisodeSampler(inner, TwoTools, max_turns=4, max_tokens=200).sample([p.ids for p in prompts],
                                                                                    prompts=prompts, seed=1)
    finally:
        inner.close()
    assert calls == [2, 4, 4]  # turn 1: two prompts x 2 samples; then one call per turn over the 4 episodes
    assert batch.multi_turn and batch.env_rewards.tolist() == [1.0] * 4
    environment = batch.completion_mask.bool() & ~batch.loss_mask.bool()
    assert bool(environment.any()) and bool((batch.behaviour_logprobs[environment] == 0).all())
    assert bool((batch.behaviour_logprobs[batch.loss_mask.bool()] < 0).all())
    for row in range(4):
        assert "<|tool|>result 2" in tok.decode(batch.tokens[row][batch.completion_mask[row].bool()].tolist())
