"""Where a run's data comes from: the prompts the student samples from (distill, rl), the fixed
sequences it trains on (sft, midtrain), and the evaluation sets, from files, a built-in task or the
built-in demo prompts. Reading and encoding files is `opd.data`; this module decides what to read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from opd.config import NO_TEACHER, ConfigError, RunConfig, SourceConfig
from opd.data import (MixedSchedule, Prompt, PromptDataError, PromptSchedule, SequenceBatches, SequencePool,
                      encode_examples, encode_prompts, pack_documents, read_documents, read_records)
from opd.tasks import documents as task_documents, make_records


@dataclass
class RunData:
    """What a run trains and evaluates on."""

    train_prompts: list[Prompt] = field(default_factory=list)  # distill / rl: prompts the student samples from
    batches: SequenceBatches | None = None  # sft / midtrain: fixed sequences
    eval_sets: dict[str, list[Prompt]] = field(default_factory=dict)  # "": the run's own; else eval.tasks
    skipped: int = 0  # prompts or examples skipped for length
    # data.sources: (number of prompts, weight) of each source, whose prompts lie in train_prompts in order
    mix: list[tuple[int, float]] | None = None

    def prompt_schedule(self, per_step: int, seed: int) -> PromptSchedule | MixedSchedule:
        """Which prompts each step samples from: one shuffled list, or the sources mixed by weight."""
        if self.mix is None:
            return PromptSchedule(len(self.train_prompts), per_step, seed)
        return MixedSchedule([n for n, _ in self.mix], [w for _, w in self.mix], per_step, seed)


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


def router(cfg: RunConfig, source_teacher: str | None = None):
    """route(where, record) -> the name of the teacher that scores the record's samples, or None (no
    teacher: reward only). A record's own `data.teacher_field` wins over its source's teacher; a
    record left without one when several teachers exist is a PromptDataError naming it."""
    names = list(cfg.teacher_specs)
    field_name = cfg.data.teacher_field

    def route(where: str, record) -> str | None:
        named = record.get(field_name) if field_name and isinstance(record, dict) else None
        if named is not None:
            if named == NO_TEACHER and cfg.method == "rl":
                return None
            if named not in names:
                raise PromptDataError(f"{where}: {field_name}={named!r} names no teacher; the teachers are "
                                      f"{', '.join(names) or 'none'}")
            return named
        if source_teacher == NO_TEACHER or not names:
            return None
        if source_teacher is not None:
            return source_teacher
        if len(names) == 1:
            return names[0]
        if cfg.method == "rl":
            return None  # reward only
        hint = f" or the record's `{field_name}` field" if field_name else " (or data.teacher_field)"
        raise PromptDataError(f"{where}: no teacher for this prompt among {', '.join(names)}: set its source's "
                              f"`teacher`{hint}")

    return route


def source_records(cfg: RunConfig, source: SourceConfig, split: str) -> list[tuple[str, dict]] | None:
    """A source's records (None: no eval file or task, so its eval prompts are held out), each
    given the source's grader when it names none itself."""
    path = source.prompts if split == "train" else source.eval_prompts
    if path is not None:
        records = read_records(path)
    elif source.task is not None:
        records = task_records(cfg, split, source.task)
    else:
        return None
    if source.grader is None:
        return records
    return [(where, {**r, "grader": source.grader} if isinstance(r, dict) and not r.get("grader") else r)
            for where, r in records]


def load_sources(cfg: RunConfig, data: RunData, prompts_of) -> None:
    """data.sources: every source's train prompts (concatenated in order, mixed by weight) and its
    own eval set, eval/<source>/..."""
    data.mix = []
    for source in cfg.data.sources:
        route = router(cfg, source.teacher)
        prompts = prompts_of(source_records(cfg, source, "train"), route, source.label)
        eval_records = source_records(cfg, source, "eval")
        if eval_records is None:
            prompts, held = holdout(prompts, cfg.data.eval_holdout, cfg.train.seed)
        else:
            held = prompts_of(eval_records, route, source.label)
        if not prompts:
            raise PromptDataError(f"data.sources ({source.label}): no prompts left to train on (all skipped or the "
                                  f"file is empty)")
        data.train_prompts += prompts
        data.mix.append((len(prompts), source.weight))
        if held:
            data.eval_sets[source.label] = held


def task_teacher(cfg: RunConfig, task: str) -> str | None:
    """The teacher of an eval.tasks set: that of a source of the same task, else the only one."""
    for source in cfg.data.sources:
        if source.task == task and source.teacher != NO_TEACHER:
            return source.teacher or (next(iter(cfg.teacher_specs)) if len(cfg.teacher_specs) == 1 else None)
    return next(iter(cfg.teacher_specs)) if len(cfg.teacher_specs) == 1 else None


def load_data(cfg: RunConfig, tokenizer) -> RunData:
    data = RunData()
    route = router(cfg) if cfg.routed else None

    def prompts_of(records, route=route, source=None):
        prompts, skipped = encode_prompts(records, tokenizer, cfg.data.max_prompt_tokens, cfg.data.overlong,
                                          route, source)
        data.skipped += skipped
        return prompts

    def examples_of(records):
        examples, skipped = encode_examples(records, tokenizer, cfg.data.max_seq_tokens)
        data.skipped += skipped
        return examples

    if cfg.data.sources:
        load_sources(cfg, data, prompts_of)
        for name in cfg.eval.tasks:
            teacher = task_teacher(cfg, name)
            data.eval_sets[name] = prompts_of(task_records(cfg, "eval", name), lambda w, r, t=teacher: t)
        return data
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
        teacher = task_teacher(cfg, name)
        data.eval_sets[name] = prompts_of(task_records(cfg, "eval", name), lambda w, r, t=teacher: t)
    return data
