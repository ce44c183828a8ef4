"""Refuse a student/teacher pair whose tokenizers would score different strings under the same ids.

Comparing only the vocabulary size lets two different tokenizers pass; we compare the whole
token -> id map and the special tokens, and say exactly what differs.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class TokenizerMismatchError(ValueError):
    pass


def tokenizer_differences(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase,
                          max_listed: int = 5) -> list[str]:
    """Human-readable differences between two tokenizers; empty when they are interchangeable."""
    problems = []
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if len(s_vocab) != len(t_vocab):
        problems.append(f"vocabulary size: student {len(s_vocab)}, teacher {len(t_vocab)}")

    moved = sorted((s_vocab[tok], tok, t_vocab[tok]) for tok in s_vocab.keys() & t_vocab.keys()
                   if s_vocab[tok] != t_vocab[tok])
    if moved:
        shown = "; ".join(f"{tok!r} is {s} in the student, {t} in the teacher" for s, tok, t in moved[:max_listed])
        more = f" (and {len(moved) - max_listed} more)" if len(moved) > max_listed else ""
        problems.append(f"{len(moved)} tokens have different ids: {shown}{more}")

    for name, only, other in (("student", s_vocab.keys() - t_vocab.keys(), s_vocab),
                              ("teacher", t_vocab.keys() - s_vocab.keys(), t_vocab)):
        if only:
            listed = sorted(only, key=other.get)
            shown = ", ".join(f"{tok!r} (id {other[tok]})" for tok in listed[:max_listed])
            more = f" (and {len(only) - max_listed} more)" if len(only) > max_listed else ""
            problems.append(f"{len(only)} tokens only in the {name}: {shown}{more}")

    for attr in ("bos_token", "eos_token", "unk_token"):
        s_tok, t_tok = getattr(student, attr), getattr(teacher, attr)
        if s_tok != t_tok:
            problems.append(f"{attr}: student {s_tok!r}, teacher {t_tok!r}")
    s_special = set(student.all_special_tokens)
    t_special = set(teacher.all_special_tokens)
    # pad is set by opd when a tokenizer has none, so it is not compared.
    s_special.discard(student.pad_token)
    t_special.discard(teacher.pad_token)
    if s_special != t_special:
        problems.append(f"special tokens: only in the student {sorted(s_special - t_special)}, "
                        f"only in the teacher {sorted(t_special - s_special)}")
    return problems


def check_tokenizers_match(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> None:
    problems = tokenizer_differences(student, teacher)
    if problems:
        raise TokenizerMismatchError(
            "the student and teacher tokenizers differ, so the teacher would score different text than the "
            "student sampled:\n  - " + "\n  - ".join(problems))
