"""Where a run's data comes from: the prompts the student samples from (distill, rl), the fixed
sequences it trains on (sft, midtrain), and the evaluation sets, from files, a built-in task or the
built-in demo prompts. Reading and encoding files is `opd.data`; this module decides what to read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from opd.config import ConfigError, RunConfig
from opd.data import (Prompt, PromptDataError, SequenceBatches, SequencePool, encode_examples, encode_prompts,
                      pack_documents, read_documents, read_records)
from opd.tasks import documents as task_documents, make_records


@dataclass
class RunData:
    """What a run trains and evaluates on."""

    train_prompts: list[Prompt] = field(default_factory=list)  # distill / rl: prompts the student samples from
    batches: SequenceBatches | None = None  # sft / midtrain: fixed sequences
    eval_sets: dict[str, list[Prompt]] = field(default_factory=dict)  # "": the run's own; else eval.tasks
    skipped: int = 0  # prompts or examples skipped for length


def task_records(cfg: RunConfig, split: str, name: str | None = None) -> list[tuple[str, dict]]:
    task = cfg.task if name is None else cfg.task.model_copy(update={"name": name})
    return [(f"task {task.name} ({split}) #{i}", r) for i, r in enumerate(make_records(task, split))]


def holdout(items: list, count: int, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded sample of at most a quarter of `items` is held out."""
    count = min(count, len(items) // 4)
    held = set(np.random.default_rng(seed).permutation(len(items))[:count].tolist())
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def prompt_records(cfg: RunConfig, split: str = "train") -> list[tuple[str, dict]]:
    """The prompts to sample from: data.prompts (or data.eval_prompts for split=eval), else the
    task's generated prompts, else the built-in demo prompts."""
    path = cfg.data.prompts if split == "train" else cfg.data.eval_prompts
    if path is not None:
        return read_records(path)
    if cfg.task.name != "none":
        return task_records(cfg, split)
    if split != "train":
        raise ConfigError("no eval prompts: set data.eval_prompts or task.name")
    from opd.tiny import demo_prompts

    return [(f"built-in[{i}]", {"messages": [{"role": "user", "content": text}]})
            for i, text in enumerate(demo_prompts())]


def load_data(cfg: RunConfig, tokenizer) -> RunData:
    data = RunData()

    def prompts_of(records):
        prompts, skipped = encode_prompts(records, tokenizer, cfg.data.max_prompt_tokens, cfg.data.overlong)
        data.skipped += skipped
        return prompts

    def examples_of(records):
        examples, skipped = encode_examples(records, tokenizer, cfg.data.max_seq_tokens)
        data.skipped += skipped
        return examples

    # The run's own eval prompts: a file or the task's eval split; without either, held out below.
    has_eval_source = cfg.data.eval_prompts is not None or cfg.task.name != "none"
    eval_prompts = prompts_of(prompt_records(cfg, "eval")) if has_eval_source else None
    per_step, seed = cfg.train.prompts_per_step, cfg.train.seed

    if cfg.on_policy:
        data.train_prompts = prompts_of(prompt_records(cfg, "train"))
        if eval_prompts is None:
            data.train_prompts, eval_prompts = holdout(data.train_prompts, cfg.data.eval_holdout, seed)
    elif cfg.method == "sft":
        if cfg.data.completions is not None:
            records = read_records(cfg.data.completions)
        elif cfg.task.name != "none":
            records = task_records(cfg, "train")
        else:
            raise ConfigError("method=sft needs examples: data.completions (a file, e.g. from `opd sample`) or "
                              "task.name (the task's reference solutions)")
        examples = examples_of(records)
        if eval_prompts is None:
            examples, held = holdout(examples, cfg.data.eval_holdout, seed)
            eval_prompts = [Prompt(e.prompt_ids, tokenizer.decode(e.prompt_ids), e.record) for e in held]
        data.batches = SequenceBatches([SequencePool.of_examples(examples, per_step)], seed)
    else:  # midtrain
        if cfg.data.documents is not None:
            texts = read_documents(cfg.data.documents)
        else:
            try:
                texts = task_documents(cfg.task)
            except ValueError as err:
                raise ConfigError(f"method=midtrain needs data.documents, or task.name=knowledge for the "
                                  f"built-in knowledge base ({err})") from None
        rows = pack_documents(texts, tokenizer, cfg.data.max_seq_tokens)
        chat_rows = round(cfg.data.chat_ratio * per_step)
        pools = [SequencePool(rows, [1] * len(rows), per_step - chat_rows)]
        if chat_rows:
            if cfg.data.chat is not None:
                chat = read_records(cfg.data.chat)
            elif cfg.task.name != "none":
                chat = task_records(cfg, "train")
            else:
                raise ConfigError("data.chat_ratio > 0 needs chat examples: data.chat or task.name")
            pools.append(SequencePool.of_examples(examples_of(chat), chat_rows))
        try:
            data.batches = SequenceBatches(pools, seed)
        except PromptDataError as err:
            raise PromptDataError(f"{err}; documents give {len(rows)} rows of data.max_seq_tokens="
                                  f"{cfg.data.max_seq_tokens} tokens") from None
    if eval_prompts:
        data.eval_sets[""] = eval_prompts
    for name in cfg.eval.tasks:
        data.eval_sets[name] = prompts_of(task_records(cfg, "eval", name))
    return data
