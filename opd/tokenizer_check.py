"""Refuse a student/teacher pair whose tokenizers would score different strings under the same ids.

Comparing only the vocabulary size lets two different tokenizers pass; we compare the whole
token -> id map and the special tokens, and say exactly what differs.
"""

from __future__ import annotations

from typing import Callable

from transformers import PreTrainedTokenizerBase


class TokenizerMismatchError(ValueError):
    pass


CROSS_HINT = ("to distil from a teacher of another tokenizer (another family), set teacher.tokenizer_mode=cross "
              "(the sampled loss over byte-aligned chunks; see README, 'A teacher of another tokenizer')")


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
            "student sampled:\n  - " + "\n  - ".join(problems) + "\n" + CROSS_HINT)


# --- A tokenizer we can only query (a served teacher's /tokenize and /detokenize) ---

# Plain text, digits, runs of whitespace, unicode (accents, CJK, emoji, RTL): where BPE
# vocabularies and pre-tokenizers differ. The special tokens' texts and the chat template are added.
PROBE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 123 4567 89012 3.14159 -7 1e-5 2,000,000",
    "a  b   c    d\te\t\tf\ng\n\nh\r\n  indented\n    more",
    "    ",
    "Unicode: café naïve Ærøskøbing straße Привет мир 你好，世界 こんにちは 안녕하세요 مرحبا שלום 🙂🚀👍🏽",
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # code, symbols: <>&|~^%$@!?",
    "Mixed CASE, punctuation... \"quotes\" 'single' (parens) [brackets] {braces} — dashes – ellipsis…",
]

SAMPLE_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "12 + 30 = 42."},
    {"role": "user", "content": "Thanks!"},
]


def probe_texts(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The texts to compare a tokenizer with a served one on: `PROBE_TEXTS`, every special token's
    text (alone and inside a sentence), and the chat template rendered on a sample conversation
    (with and without a system turn, if the template has one)."""
    texts = list(PROBE_TEXTS)
    specials = sorted(set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {})))
    for token in specials:
        texts += [token, f"Before {token} after"]
    if getattr(tokenizer, "chat_template", None):
        for conversation in (SAMPLE_CONVERSATION, SAMPLE_CONVERSATION[1:]):
            try:
                texts.append(tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))
            except Exception:  # a template that refuses e.g. a system turn: the other rendering is enough
                continue
    return texts


def detokenize_slices(vocab_size: int, slices: int = 64, width: int = 32) -> list[list[int]]:
    """`slices` runs of `width` consecutive ids spread evenly over [0, vocab_size)."""
    if vocab_size <= slices * width:
        return [list(range(start, min(start + width, vocab_size))) for start in range(0, vocab_size, width)]
    last = vocab_size - width
    starts = sorted({round(i * last / (slices - 1)) for i in range(slices)}) if slices > 1 else [0]
    return [list(range(start, start + width)) for start in starts]


def _short(value, limit: int = 160) -> str:
    """repr(value), cut to about `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _listed(items: list[str], max_listed: int) -> str:
    """The first `max_listed` items, one per indented line, and how many more there are."""
    more = [f"(and {len(items) - max_listed} more)"] if len(items) > max_listed else []
    return "".join(f"\n    {item}" for item in [*items[:max_listed], *more])


def probe_differences(student: PreTrainedTokenizerBase, encode: Callable[[str], list[int]],
                      decode: Callable[[list[int]], str] | None = None, max_listed: int = 5,
                      texts: list[str] | None = None, id_slices: list[list[int]] | None = None) -> list[str]:
    """Differences between the student's tokenizer and one we can only call (a teacher server):
    `encode(text) -> ids` (no special tokens added) on the probe texts, and `decode(ids) -> text` on
    slices of ids spread over the student's whole vocabulary. A ValueError from either callable
    counts as a difference (e.g. ids the other tokenizer does not have); other exceptions (the
    server is down) propagate. Empty when they agree."""
    texts = probe_texts(student) if texts is None else texts
    encodings = []
    for text in texts:
        ours = student.encode(text, add_special_tokens=False)
        try:
            theirs = list(encode(text))
        except ValueError as err:  # the other tokenizer cannot do it: a difference, with the reason
            encodings.append(f"text {_short(text)} could not be tokenized by the teacher: {err}")
            continue
        if ours != theirs:
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            encodings.append(f"text {_short(text)}: student ids {_short(ours)}, teacher ids {_short(theirs)} "
                             f"(first difference at token {first}: student {ours[first:first + 4]}, "
                             f"teacher {theirs[first:first + 4]})")
    problems = []
    if encodings:
        problems.append(f"{len(encodings)} of {len(texts)} probe texts are tokenized differently:"
                        f"{_listed(encodings, max_listed)}")

    if decode is not None:
        slices = detokenize_slices(len(student)) if id_slices is None else id_slices
        decodings = []
        for ids in slices:
            ours = student.decode(ids)
            try:
                theirs = decode(ids)
            except ValueError as err:
                decodings.append(f"ids {ids[0]}..{ids[-1]} could not be decoded by the teacher: {err}")
                continue
            if ours != theirs:
                decodings.append(f"ids {ids[0]}..{ids[-1]} decode to {_short(ours)} for the student, "
                                 f"{_short(theirs)} for the teacher")
        if decodings:
            problems.append(f"{len(decodings)} of {len(slices)} id ranges decode differently:"
                            f"{_listed(decodings, max_listed)}")
    return problems


def check_tokenizer_probe(student: PreTrainedTokenizerBase, encode: Callable[[str], list[int]],
                          decode: Callable[[list[int]], str] | None = None, teacher: str = "the teacher") -> None:
    """Raise TokenizerMismatchError (same message style as `check_tokenizers_match`) when the
    student's tokenizer and a queried one (`teacher` names it, e.g. the server URL) differ."""
    problems = probe_differences(student, encode, decode)
    if problems:
        raise TokenizerMismatchError(
            f"the student's tokenizer and the tokenizer of {teacher} differ, so the teacher would score different "
            "text than the student sampled:\n  - " + "\n  - ".join(problems) + "\n" + CROSS_HINT)
