"""Tiny models and a tokenizer built locally, for tests and the embedded default run.

Nothing here touches a model hub: the tokenizer is a byte-level BPE trained in well under a second on
an embedded corpus (training is deterministic, so every build gives the same token -> id map), and
the models are small Llamas with random weights drawn from a given seed.
"""

from __future__ import annotations

import functools
import itertools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from opd.config import TinyModelConfig

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]

# A small chat template: role markers are special tokens, each assistant turn ends with EOS.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>' }}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ '</s>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_SUBJECTS = ["the river", "a small robot", "my neighbour", "the old library", "a red kite", "the winter sea",
             "a quiet village", "the morning train", "a lost key", "the garden", "a paper boat", "the mountain"]
_ASKS = ["Write one sentence about {}.", "Describe {} in a few words.", "Tell a short story about {}.",
         "What do you think of {}?", "Give three facts about {}.", "Write a short poem about {}."]


def demo_prompts() -> list[str]:
    """The built-in prompt set: every (request, subject) pair, 72 prompts in a fixed order."""
    return [ask.format(subject) for ask, subject in itertools.product(_ASKS, _SUBJECTS)]


_ADJECTIVES = ["quiet", "bright", "old", "small", "cold", "happy", "slow", "green", "tall", "kind"]
_VERBS = ["waits", "shines", "sings", "moves", "sleeps", "grows", "turns", "rests"]
_PLACES = ["by the sea", "under the bridge", "in the rain", "at night", "near the hill", "in the sun"]


def demo_answer(subject: str, rng) -> str:
    """A short answer in the built-in corpus's style, e.g. 'The river is quiet. It sings in the rain.'"""
    first = f"{subject[0].upper()}{subject[1:]} is {rng.choice(_ADJECTIVES)} and {rng.choice(_ADJECTIVES)}."
    second = f"It {rng.choice(_VERBS)} {rng.choice(_PLACES)}."
    return f"{first} {second}" if rng.random() < 0.7 else first


def demo_conversations(count: int, seed: int = 0) -> list[list[dict]]:
    """Seeded user/assistant pairs over the built-in prompts: what a tiny teacher learns to say."""
    import random

    rng = random.Random(seed)
    conversations = []
    for _ in range(count):
        ask, subject = rng.choice(_ASKS), rng.choice(_SUBJECTS)
        conversations.append([{"role": "user", "content": ask.format(subject)},
                              {"role": "assistant", "content": demo_answer(subject, rng)}])
    return conversations


def _corpus() -> list[str]:
    """What the tiny tokenizer learns its merges from: the built-in conversations and the built-in
    tasks' text (arithmetic, the knowledge base, instructions), so that their words and names are
    a few tokens each. Digits are always single tokens (see the pre-tokenizer)."""
    from opd.config import TaskConfig
    from opd.tasks import documents, make_records

    texts = [m["content"] for conv in demo_conversations(200) for m in conv]
    for name in ("arithmetic", "knowledge", "instruction"):
        task = TaskConfig(name=name, train_size=200, eval_size=20)
        for record in make_records(task, "train"):
            texts += [m["content"] for m in record["messages"]] + [record.get("completion") or ""]
    texts += documents(TaskConfig(name="knowledge"))
    return texts + ["Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000, and signs: + - * / = ( ) . , ! ? : ;"]


def read_corpus_files(paths: tuple[str, ...]) -> list[str]:
    """The text of the user's corpus files: a .jsonl file's string fields (prompts, messages,
    answers, documents), any other file as it is."""
    import json
    from pathlib import Path

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from strings(v)

    texts = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"tiny.tokenizer_corpus: {path} is not a file")
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".jsonl":
            texts += [s for line in text.splitlines() if line.strip() for s in strings(json.loads(line))]
        else:
            texts += text.splitlines()
    return texts


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int, corpus_files: tuple[str, ...] = ()) -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    # Digits split one by one (as in Llama-style tokenizers): numbers are written digit by digit,
    # which small models learn arithmetic on far more easily than on multi-digit tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # the user's text first: BPE ranks pairs by count, and ties by first appearance
    tok.train_from_iterator(read_corpus_files(corpus_files) + _corpus(), trainer=trainer)
    return tok.to_str()


def build_tiny_tokenizer(vocab_size: int = 768, corpus_files: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with pad/bos/eos, role tokens and a chat template, trained on the
    built-in corpus and on `corpus_files` (the user's own text, see TinyModelConfig.tokenizer_corpus)."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size, tuple(corpus_files))),
        pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(cfg: TinyModelConfig, tokenizer) -> LlamaForCausalLM:
    """A small Llama with random weights drawn from `cfg.seed` (the global RNG is left untouched),
    then trained for `cfg.pretrain_steps` on the built-in conversations if asked. Pretrained
    models are cached under OPD_CACHE, keyed by their config."""
    if cfg.pretrain_steps:
        return _cached_pretrained(cfg, tokenizer)
    return _random_tiny_model(cfg, tokenizer)


def _random_tiny_model(cfg: TinyModelConfig, tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.init_std,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _cached_pretrained(cfg: TinyModelConfig, tokenizer) -> LlamaForCausalLM:
    import hashlib
    import json
    import os
    import shutil

    from opd.models import cache_root

    spec = cfg.model_dump(mode="json")
    if not spec["tokenizer_corpus"]:
        del spec["tokenizer_corpus"]  # the key of a model built before the field existed
    if spec["vocab_size"] == 768:
        del spec["vocab_size"]  # likewise
    key = hashlib.sha256(json.dumps([spec, tokenizer.backend_tokenizer.to_str() if cfg.tokenizer_corpus
                                     else _tokenizer_json(len(tokenizer))], sort_keys=True).encode()).hexdigest()[:16]
    target = cache_root() / "tiny" / key
    if (target / "config.json").is_file():
        return LlamaForCausalLM.from_pretrained(target)
    model = _random_tiny_model(cfg, tokenizer)
    pretrain_on_conversations(model, tokenizer, cfg.pretrain_steps, seed=cfg.seed)
    tmp = target.with_name(f"{key}.tmp{os.getpid()}")
    model.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # written meanwhile by another process
        shutil.rmtree(tmp, ignore_errors=True)
    return model


def pretrain_on_conversations(model, tokenizer, steps: int, seed: int = 0, batch_size: int = 16,
                              lr: float = 3e-3) -> list[float]:
    """Next-token training on the built-in conversations (all tokens), so that a tiny model has
    consistent preferences a student can learn. Returns the loss of each step."""
    conversations = demo_conversations(512, seed=seed)
    encoded = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"] for c in conversations]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        rows = [encoded[i] for i in torch.randint(len(encoded), (batch_size,), generator=generator).tolist()]
        width = max(map(len, rows))
        ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
        labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses
