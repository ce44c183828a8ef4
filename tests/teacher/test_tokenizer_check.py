import json

import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from opd.tiny import build_tiny_tokenizer
from opd.tokenizer_check import TokenizerMismatchError, check_tokenizers_match, tokenizer_differences


def rebuilt(edit):
    base = build_tiny_tokenizer()
    spec = json.loads(base.backend_tokenizer.to_str())
    edit(spec)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"])


def test_identical_tokenizers_pass():
    check_tokenizers_match(build_tiny_tokenizer(), build_tiny_tokenizer())


def test_one_swapped_pair_of_tokens_is_refused_and_named():
    def swap(spec):
        vocab = spec["model"]["vocab"]
        vocab["Ġthe"], vocab["Ġis"] = vocab["Ġis"], vocab["Ġthe"]

    student, teacher = build_tiny_tokenizer(), rebuilt(swap)
    assert len(student) == len(teacher)  # a size check alone would pass
    with pytest.raises(TokenizerMismatchError) as err:
        check_tokenizers_match(student, teacher)
    message = str(err.value)
    assert "2 tokens have different ids" in message
    the_s, the_t = student.get_vocab()["Ġthe"], teacher.get_vocab()["Ġthe"]
    assert f"'Ġthe' is {the_s} in the student, {the_t} in the teacher" in message
    assert "'Ġis'" in message


def test_different_special_tokens_are_named():
    teacher = build_tiny_tokenizer()
    teacher.eos_token = "<|assistant|>"
    problems = tokenizer_differences(build_tiny_tokenizer(), teacher)
    assert any(p.startswith("eos_token: student '</s>', teacher '<|assistant|>'") for p in problems)


def test_extra_tokens_are_listed():
    teacher = build_tiny_tokenizer()
    teacher.add_tokens(["<tool>"])
    problems = tokenizer_differences(build_tiny_tokenizer(), teacher)
    assert any("vocabulary size" in p for p in problems)
    assert any("1 tokens only in the teacher: '<tool>'" in p for p in problems)
