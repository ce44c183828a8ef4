"""The student's sampler: in process (`hf`, opd.sampler.hf) or on vLLM (`vllm`, opd.sampler.vllm)."""

from __future__ import annotations

from pathlib import Path

from opd.models import DTYPES, eos_token_ids
from opd.sampler.hf import HFSampler


def build_sampler(cfg, learner, tokenizer, model, run_dir: Path):
    """The run's sampler for `sampling.backend` and `train.max_staleness` (see opd.components);
    with `env:` it runs that Env's episodes (opd.envs.episodes)."""
    sampler = _backend_sampler(cfg, learner, tokenizer, model, run_dir)
    return with_env(cfg, sampler)


def with_env(cfg, sampler):
    """The sampler running cfg.env's episodes, or itself without an env."""
    if getattr(cfg, "env", None) is None:
        return sampler
    from opd.envs import env_factory
    from opd.envs.episodes import EpisodeSampler
    return EpisodeSampler(sampler, env_factory(cfg.env.class_, cfg.env.args()), cfg.env.max_turns, cfg.env.max_tokens)


def _backend_sampler(cfg, learner, tokenizer, model, run_dir: Path):
    from opd.sampler.vllm import VLLMSampler, VLLMServerSampler

    if cfg.sampling.backend == "hf":
        return HFSampler(model, tokenizer, cfg.sampling, own_copy=cfg.train.max_staleness > 0,
                         dtype=DTYPES[cfg.sampling.dtype] if cfg.sampling.dtype else None)
    eos_ids = eos_token_ids(model, tokenizer)

    def export(directory: Path) -> None:
        learner.export_policy(directory, tokenizer)

    def export_weights(directory: Path) -> None:
        learner.export_policy(directory, tokenizer, weights_only=True)

    if cfg.sampling.url is not None:
        sync_dir = Path(cfg.sampling.sync_dir or Path(run_dir) / "sampler_weights")
        return VLLMServerSampler(cfg.sampling.url, export, tokenizer, cfg.sampling, sync_dir, eos_ids,
                                 export_weights=export_weights, policy_weights=learner.policy_weights)
    max_len = cfg.data.max_prompt_tokens + max(cfg.sampling.max_new_tokens, cfg.eval.max_new_tokens or 0)
    positions = getattr(model.config, "max_position_embeddings", None)
    rows = cfg.train.prompts_per_step * cfg.sampling.samples_per_prompt  # what a step samples at once
    return VLLMSampler(learner.policy_weights, export, tokenizer, cfg.sampling, next(model.parameters()).dtype,
                       min(max_len, positions or max_len), cfg.train.seed, eos_ids, model_config=model.config,
                       rows=rows)

