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
    # Several teachers: the name of the teacher that scores this prompt's samples (None: none, reward
    # only) and of the source it came from (data.sources).
    teacher: str | None = None
    source: str | None = None


def read_text(path: str | Path) -> str:
    """A text file's contents as UTF-8; anything else is a PromptDataError naming the file and the
    line (and column) of the first byte that is not UTF-8."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")  # a byte-order mark is not content
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise PromptDataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); "
                              f"save the file as UTF-8") from None


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """(where, record) pairs; `where` is 'file:line' for line-based files, 'file[row]' otherwise."""
    path = Path(path)
    if not path.is_file():
        raise PromptDataError(f"prompt file not found: {path.resolve()}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        text = read_text(path)
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
    if builders[suffix] in ("csv", "text"):
        read_text(path)  # a file that is not UTF-8: named here, with its line, not deep inside `datasets`
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
                   overlong: str = "skip", route=None, source: str | None = None) -> tuple[list[Prompt], int]:
    """Prompts and the number skipped for being longer than `max_tokens` (overlong='skip');
    overlong='truncate' keeps the last `max_tokens` tokens, next to where the answer starts.
    `route(where, record)`: the name of the record's teacher (raising PromptDataError for none)."""
    prompts, skipped = [], 0
    for where, record in records:
        teacher = route(where, record) if route is not None else None
        ids = encode_prompt(where, record, tokenizer)
        if not ids:
            raise PromptDataError(f"{where}: the prompt is empty (no tokens)")
        if len(ids) > max_tokens:
            if overlong == "skip":
                skipped += 1
                continue
            ids = ids[-max_tokens:]
        prompts.append(Prompt(ids=ids, text=tokenizer.decode(ids), record=record, teacher=teacher, source=source))
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


class MixedSchedule:
    """Batches that mix several prompt sources (data.sources) by weight. Slot k of the run (step *
    per_step + j) goes to the source furthest behind its share (largest w_i * (k + 1) - taken_i,
    ties to the earlier source), so every prefix of the run follows the weights to within one
    prompt per source, and a step's mix is as even as its size allows; within a source, prompts
    come in its own PromptSchedule order. `indices` index the sources' prompts concatenated in
    order. A batch depends only on the step (exact resume)."""

    def __init__(self, sizes: list[int], weights: list[float], per_step: int, seed: int):
        self.shares = [w / sum(weights) for w in weights]
        self.offsets = np.cumsum([0] + sizes[:-1]).tolist()
        self.per_step = per_step
        self.schedules = [PromptSchedule(n, 1, seed + i) for i, n in enumerate(sizes)]
        self._slots: list[tuple[int, int]] = []  # (source, how many of its prompts came before), per slot
        self._taken = [0] * len(sizes)

    def _extend(self, slots: int) -> None:
        while len(self._slots) < slots:
            k = len(self._slots) + 1
            source = max(range(len(self.shares)), key=lambda i: (self.shares[i] * k - self._taken[i], -i))
            self._slots.append((source, self._taken[source]))
            self._taken[source] += 1

    def sources(self, step: int) -> list[int]:
        """The source of each prompt of the step's batch."""
        self._extend((step + 1) * self.per_step)
        return [source for source, _ in self._slots[step * self.per_step:(step + 1) * self.per_step]]

    def indices(self, step: int) -> list[int]:
        self._extend((step + 1) * self.per_step)
        return [self.offsets[source] + self.schedules[source].indices(ordinal)[0]
                for source, ordinal in self._slots[step * self.per_step:(step + 1) * self.per_step]]


# ----------------------------------------------------------------------------------------------
# Fixed token sequences: SFT examples (prompt + completion) and mid-training documents


@dataclass
class Example:
    """A prompt and the completion to learn (loss on the completion only)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    record: dict = field(default_factory=dict)

    @property
    def ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids


def _completion_of(where: str, record: dict) -> tuple[dict, str]:
    """(the record's prompt part, the completion text): `completion` next to `prompt`/`messages`,
    or `messages` whose last turn is the assistant's."""
    if not isinstance(record, dict):
        raise PromptDataError(f"{where}: each record must be a JSON object, got {type(record).__name__}")
    if isinstance(record.get("completion"), str):
        return record, record["completion"]
    messages = record.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict) \
            and messages[-1].get("role") == "assistant":
        _check_messages(where, messages)
        if len(messages) < 2:
            raise PromptDataError(f"{where}: `messages` holds only the assistant turn; there is no prompt")
        return {**record, "messages": messages[:-1]}, messages[-1]["content"]
    raise PromptDataError(f"{where}: an SFT example needs a `completion` string (next to `prompt` or `messages`) "
                          f"or `messages` ending with an assistant turn (found keys: {sorted(record)})")


def encode_examples(records: list[tuple[str, dict]], tokenizer, max_tokens: int) -> tuple[list[Example], int]:
    """SFT examples and how many were skipped because their prompt alone fills `max_tokens`.

    The completion is tokenized on its own and ends with EOS, exactly as the sampler would have
    produced it; an example longer than `max_tokens` keeps its prompt and loses the completion's end.
    """
    examples, skipped = [], 0
    for where, record in records:
        prompt_record, text = _completion_of(where, record)
        prompt_ids = encode_prompt(where, prompt_record, tokenizer)
        completion_ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        if not record.get("truncated"):  # a sample cut at max_new_tokens did not end: do not teach it to stop
            completion_ids.append(tokenizer.eos_token_id)
        if len(prompt_ids) >= max_tokens:
            skipped += 1
            continue
        examples.append(Example(prompt_ids, completion_ids[:max_tokens - len(prompt_ids)], record))
    return examples, skipped


def read_documents(path: str | Path) -> list[str]:
    """Plain documents: a .txt/.md file (one document), a folder of them (sorted by name), or
    JSONL records with a `text` field."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".txt", ".md") and p.is_file())
        if not files:
            raise PromptDataError(f"{path.resolve()}: no .txt or .md documents in this folder")
        return [read_text(f) for f in files]
    if not path.is_file():
        raise PromptDataError(f"documents not found: {path.resolve()}")
    if path.suffix.lower() in (".txt", ".md"):
        return [read_text(path)]
    texts = []
    for where, record in read_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise PromptDataError(f"{where}: a document record needs a `text` string (found: {keys})")
        texts.append(record["text"])
    return texts


def pack_documents(texts: list[str], tokenizer, seq_tokens: int) -> list[list[int]]:
    """Concatenate the documents (each followed by EOS) and cut the stream into rows of
    `seq_tokens`: no padding at all, as in pre-training."""
    stream: list[int] = []
    for text in texts:
        stream += list(tokenizer(text, add_special_tokens=False).input_ids) + [tokenizer.eos_token_id]
    rows = [stream[i:i + seq_tokens] for i in range(0, len(stream), seq_tokens)]
    return [row for row in rows if len(row) >= 2]  # a row of one token has nothing to predict


class LengthBucketedSchedule:
    """Batches of examples of similar length, so that padding does not dominate: each epoch is
    shuffled from (seed, epoch), cut into windows of `window` batches, each window sorted by length
    and cut into batches, and the batches of a window shuffled again. A batch depends only on the
    step number (exact resume); the last incomplete batch of an epoch is dropped."""

    def __init__(self, lengths: list[int], per_step: int, seed: int, window: int = 16):
        if len(lengths) < per_step:
            raise PromptDataError(f"{len(lengths)} examples, fewer than the {per_step} needed for one step "
                                  f"(train.prompts_per_step)")
        self.lengths, self.per_step, self.seed, self.window = lengths, per_step, seed, window
        self.batches_per_epoch = len(lengths) // per_step
        self._epoch_cache: tuple[int, list[list[int]]] | None = None

    def _epoch(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.lengths))[:self.batches_per_epoch * self.per_step]
            batches = []
            span = self.window * self.per_step
            for start in range(0, len(order), span):
                window = sorted(order[start:start + span].tolist(), key=lambda i: self.lengths[i])
                chunk = [window[i:i + self.per_step] for i in range(0, len(window), self.per_step)]
                batches += [chunk[j] for j in rng.permutation(len(chunk))]
            self._epoch_cache = (epoch, batches)
        return self._epoch_cache[1]

    def epoch_of(self, step: int) -> int:
        return step // self.batches_per_epoch

    def indices(self, step: int) -> list[int]:
        return self._epoch(self.epoch_of(step))[step % self.batches_per_epoch]


@dataclass
class SequencePool:
    """Fixed sequences to train on, `per_step` of them in each step's batch. The loss is on tokens
    from `targets_from[i]` on. `costs` are FLOPs already spent producing each sequence (a teacher
    writing SFT data), charged the first time the sequence is trained on."""

    sequences: list[list[int]]
    targets_from: list[int]
    per_step: int
    costs: list[float] | None = None

    @classmethod
    def of_examples(cls, examples: list[Example], per_step: int) -> "SequencePool":
        costs = [float((e.record.get("cost") or {}).get("flops", 0.0)) for e in examples]
        return cls([e.ids for e in examples], [len(e.prompt_ids) for e in examples], per_step,
                   costs if any(costs) else None)


class SequenceBatches:
    """sft / midtrain: each step's batch, drawn from one or more pools (documents and chat data
    mixed at a fixed ratio), every pool length-bucketed. Depends only on the step (exact resume)."""

    def __init__(self, pools: list[SequencePool], seed: int):
        self.pools = [p for p in pools if p.per_step > 0]
        self.schedules = [LengthBucketedSchedule([len(s) for s in p.sequences], p.per_step, seed + i)
                          for i, p in enumerate(self.pools)]

    def batch(self, step: int) -> tuple[list[list[int]], list[int], float]:
        """(sequences, where each one's targets start, FLOPs of data produced for this step)."""
        sequences, targets_from, cost = [], [], 0.0
        for pool, schedule in zip(self.pools, self.schedules):
            indices = schedule.indices(step)
            sequences += [pool.sequences[i] for i in indices]
            targets_from += [pool.targets_from[i] for i in indices]
            if pool.costs is not None and schedule.epoch_of(step) == 0:
                cost += sum(pool.costs[i] for i in indices)
        return sequences, targets_from, cost
