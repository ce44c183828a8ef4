"""Sequences that do not fit a model's context, refused before any work.

A model given more positions than it was built for does not fail: a tiny Llama trains on a 6,606-
token prompt with its 512 positions without a word (RoPE extrapolates into garbage), and a sampler
asked for 1e8 new tokens fails minutes later on a 3 GB allocation. So the longest prompt plus
the tokens to sample (or the longest fixed sequence: sft, midtrain) is compared with the
student's `max_position_embeddings`, an in-process teacher's, and a served teacher's
`max_model_len` (from vLLM's /tokenize), once the data is read.
"""

from __future__ import annotations

from opd.config import ConfigError, RunConfig


def model_positions(model) -> int | None:
    """A Hugging Face model's `max_position_embeddings` (its text config's), or None."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return value if isinstance(value, int) else None


def longest_sequence(cfg: RunConfig, data) -> tuple[int, str]:
    """(tokens, what they are) of the longest sequence the run will feed a model."""
    if cfg.on_policy:
        prompts = [p for p in data.train_prompts] + [p for ps in data.eval_sets.values() for p in ps]
        longest = max((len(p.ids) for p in prompts), default=0)
        new = max(cfg.sampling.max_new_tokens, cfg.eval.max_new_tokens or 0)
        return longest + new, (f"the longest prompt ({longest} tokens) plus max_new_tokens ({new}: "
                               f"sampling.max_new_tokens / eval.max_new_tokens)")
    lengths = [len(s) for pool in data.batches.pools for s in pool.sequences] if data.batches is not None else []
    eval_new = cfg.eval.max_new_tokens or cfg.sampling.max_new_tokens
    eval_longest = max((len(p.ids) for ps in data.eval_sets.values() for p in ps), default=0)
    longest = max(max(lengths, default=0), eval_longest + eval_new if eval_longest else 0)
    return longest, f"the longest training sequence or eval prompt plus max_new_tokens ({longest} tokens)"


def check_context(cfg: RunConfig, data, student_model, teacher) -> None:
    """ConfigError naming the limit when the longest sequence does not fit a model's context."""
    tokens, what = longest_sequence(cfg, data)
    limits = [("the student", model_positions(student_model), "max_position_embeddings")]
    # A routing teacher's members each have their own limit (checked under their names).
    members = getattr(teacher, "teachers", None) or ({"teacher": teacher} if teacher is not None else {})
    for key, member in members.items():
        who = "the teacher" if key == "teacher" else f"teacher {key!r}"
        served = getattr(member, "max_model_len", None)
        limits.append((f"{who} server", served, "max_model_len") if served is not None else
                      (who, model_positions(getattr(member, "model", None)), "max_position_embeddings"))
    for who, limit, name in limits:
        if limit is not None and tokens > limit:
            raise ConfigError(f"{what} is {tokens} tokens, more than {who}'s {name}={limit}: lower "
                              f"data.max_prompt_tokens (overlong prompts are skipped or truncated) or max_new_tokens")
