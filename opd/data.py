"""Prompts: read records from JSONL / JSON / Parquet (or any `datasets`-loadable local file),
turn `messages` (chat, via the tokenizer's template) or `prompt` (raw text) into token ids, and
hand out a fixed, seeded order of batches that a resumed run can recompute from the step alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class PromptDataError(ValueError):
    pass


@dataclass
class Prompt:
    ids: list[int]
    text: str  # the prompt as the model sees it (template applied)
    record: dict = field(default_factory=dict)  # the original record: reference answers etc. for graders


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """(where, record) pairs; `where` is 'file:line' for line-based files, 'file[row]' otherwise."""
    path = Path(path)
    if not path.is_file():
        raise PromptDataError(f"prompt file not found: {path.resolve()}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                raise PromptDataError(f"{path}: not valid JSON: {err}") from None
            return [(f"{path}[{i}]", r) for i, r in enumerate(rows)]
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise PromptDataError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}): "
                                      f"{line[:80]!r}") from None
        return records
    builders = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".txt": "text", ".arrow": "arrow"}
    if suffix not in builders:
        raise PromptDataError(f"{path}: unsupported prompt file type {suffix!r} "
                              f"(use .jsonl, .json, .parquet, .csv, .tsv, .arrow)")
    from datasets import load_dataset

    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    dataset = load_dataset(builders[suffix], data_files=str(path), split="train", **kwargs)
    return [(f"{path}[{i}]", dict(r)) for i, r in enumerate(dataset)]


def _check_messages(where: str, messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise PromptDataError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise PromptDataError(f"{where}: messages[{i}] must be an object with string `role` and `content`, "
                                  f"got {m!r:.80}")


def encode_prompt(where: str, record, tokenizer) -> list[int]:
    if not isinstance(record, dict):
        raise PromptDataError(f"{where}: each record must be a JSON object, got {type(record).__name__}")
    if "messages" in record and record["messages"] is not None:
        _check_messages(where, record["messages"])
        if tokenizer.chat_template is None:
            raise PromptDataError(f"{where}: `messages` needs a chat template, and this tokenizer has none "
                                  f"(use a `prompt` field with raw text instead)")
        encoded = tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=True,
                                                return_dict=True)
        return list(encoded["input_ids"])
    if isinstance(record.get("prompt"), str):
        return list(tokenizer(record["prompt"]).input_ids)
    raise PromptDataError(f"{where}: a record needs a `messages` list or a `prompt` string "
                          f"(found keys: {sorted(record)})")


def encode_prompts(records: list[tuple[str, dict]], tokenizer, max_tokens: int,
                   overlong: str = "skip") -> tuple[list[Prompt], int]:
    """Prompts and the number skipped for being longer than `max_tokens` (overlong='skip');
    overlong='truncate' keeps the last `max_tokens` tokens, next to where the answer starts."""
    prompts, skipped = [], 0
    for where, record in records:
        ids = encode_prompt(where, record, tokenizer)
        if not ids:
            raise PromptDataError(f"{where}: the prompt is empty (no tokens)")
        if len(ids) > max_tokens:
            if overlong == "skip":
                skipped += 1
                continue
            ids = ids[-max_tokens:]
        prompts.append(Prompt(ids=ids, text=tokenizer.decode(ids), record=record))
    return prompts, skipped


class PromptSchedule:
    """Batches for step 0, 1, 2, ...: the prompt list is reshuffled every epoch from (seed, epoch),
    so a batch depends only on the step number and a resumed run sees the same prompts."""

    def __init__(self, num_prompts: int, per_step: int, seed: int):
        if num_prompts == 0:
            raise PromptDataError("no prompts left to train on (all skipped or the file is empty)")
        self.num_prompts, self.per_step, self.seed = num_prompts, per_step, seed

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts)

    def indices(self, step: int) -> list[int]:
        positions = range(step * self.per_step, (step + 1) * self.per_step)
        return [int(self._permutation(p // self.num_prompts)[p % self.num_prompts]) for p in positions]
