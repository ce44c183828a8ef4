"""A teacher of another tokenizer (teacher.tokenizer_mode=cross): byte spans, chunk alignment, the
chunk estimator (equal to today's with one tokenizer; its expected gradient, by enumeration, with two
tiny tokenizers of different vocabulary sizes), config refusals and the loop's metrics."""

import functools
import itertools
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from opd.advantages import compute_advantages
from opd.alignment import AlignmentError, align, align_row, byte_ends, end_of_turn_ids, teacher_text_ids
from opd.config import ConfigError
from opd.data import Prompt
from opd.losses.policy_gradient import policy_gradient_loss
from opd.roles import TeacherScores
from opd.rollouts import sampled_batch
from opd.teacher.cross import CrossTokenizerTeacher
from opd.tiny import build_tiny_tokenizer


@functools.lru_cache(maxsize=None)
def tokenizer(size: int):
    return build_tiny_tokenizer(size)


STUDENT, TEACHER = 768, 300  # two tiny BPEs: another vocabulary size is another set of merges


# --- byte spans ---

@pytest.mark.parametrize("text", ["The river is quiet.", "café naïve", "你好，世界", "🙂🚀👍🏽 ok", "a  b\n\tc"])
def test_byte_ends_tile_the_utf8_text(text):
    tok = tokenizer(STUDENT)
    ids = tok.encode(text, add_special_tokens=False)
    decoded, ends = byte_ends(tok, ids)
    assert decoded == text
    data = text.encode("utf-8")
    exact = [int(e) for e in ends if e == int(e)]
    assert exact == sorted(exact) and exact[-1] == len(data)
    for e in ends:  # an end inside a character is marked .5, every exact end is a character boundary
        if e != int(e):
            assert 0 < e < len(data) and (data[int(e) + 1] & 0xC0) == 0x80
        else:
            data[:int(e)].decode("utf-8")  # a whole number of characters


def test_tokens_that_split_a_character_close_no_chunk():
    tok = tokenizer(STUDENT)
    ids = tok.encode("é🙂", add_special_tokens=False)
    assert len(ids) == 6  # two bytes, four bytes: byte-level pieces
    _, ends = byte_ends(tok, ids)
    assert ends == [0.5, 2.0, 2.5, 2.5, 2.5, 6.0]
    student, teacher, chunks = align(ends, [2.0, 6.0])
    assert (student, teacher, chunks) == ([0, 0, 1, 1, 1, 1], [0, 1], 2)


def test_a_completion_cut_inside_a_character_keeps_its_whole_text():
    tok = tokenizer(STUDENT)
    ids = tok.encode("ok 你", add_special_tokens=False)[:-1]  # the last byte of 你 was never sampled
    text, ends = byte_ends(tok, ids)
    assert text == "ok "
    assert ends[-1] > len(text.encode())  # its tokens lie past the text: a chunk without teacher tokens


def test_alignment_of_two_tokenizers_on_multibyte_text():
    s, t = tokenizer(STUDENT), tokenizer(TEACHER)
    text = "The river is quiet. café 你好 🙂"
    ids = s.encode(text, add_special_tokens=False) + [s.eos_token_id]
    a = align_row(s, t, ids, True, end_of_turn_ids(t))
    assert t.decode(a.teacher_ids[:-1]) == text and a.teacher_ids[-1] == t.eos_token_id
    assert len(a.student_chunk) == len(ids) and len(a.teacher_chunk) == len(a.teacher_ids)
    assert a.student_chunk[-1] == a.teacher_chunk[-1] == a.chunks - 1  # the end of turn: a chunk of its own
    # chunks partition both sides into the same texts
    s_text = ["".join(s.decode([i]) for i, c in zip(ids, a.student_chunk) if c == k) for k in range(a.chunks - 1)]
    for k in range(a.chunks - 1):
        s_bytes = s.decode([i for i, c in zip(ids, a.student_chunk) if c == k]).encode()
        t_bytes = t.decode([i for i, c in zip(a.teacher_ids, a.teacher_chunk) if c == k]).encode()
        assert s_bytes == t_bytes, (k, s_text[k])
    assert max(sz[1] for sz in a.sizes()) > 1 and 1 < a.chunks < len(ids)


def test_rows_that_do_not_decode_back_are_refused():
    s, t = tokenizer(STUDENT), tokenizer(TEACHER)
    with pytest.raises(AlignmentError, match="special token"):
        align_row(s, t, s.encode("a <|user|> b", add_special_tokens=False), False, [t.eos_token_id])
    with pytest.raises(AlignmentError, match="not UTF-8"):
        byte_ends(s, s.encode("é", add_special_tokens=False)[1:] + s.encode("a", add_special_tokens=False))

    class Lossy:  # a tokenizer that drops a character: its ids do not decode back
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": t(text.replace("q", ""), add_special_tokens=False)["input_ids"]}

        def __getattr__(self, name):
            return getattr(t, name)

    with pytest.raises(AlignmentError, match="decode back"):
        teacher_text_ids(Lossy(), "quiet")


# --- a tabular teacher over the teacher tokenizer's ids (the Teacher contract) ---

TEACHER_SCALE = 2.0


@functools.lru_cache(maxsize=None)
def teacher_table(prefix: tuple) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(repr(prefix).encode()))
    return F.log_softmax(torch.randn(TEACHER, generator=g) * TEACHER_SCALE, -1)


class TabularTeacher:
    """log p_T(token | completion prefix) from a seeded table: a teacher model we can enumerate."""

    full_distribution, top_k, output_size, cost = False, 0, TEACHER, None

    def check_tokenizer(self, tokenizer) -> None:
        pass

    def score(self, rollouts, keep_hidden=False):
        out = torch.zeros_like(rollouts.completion_mask)
        for i in range(rollouts.batch_size):
            cols = rollouts.completion_mask[i].nonzero().flatten().tolist()
            ids = rollouts.tokens[i].tolist()
            for n, col in enumerate(cols):
                out[i, col] = teacher_table(tuple(ids[cols[0]:col]))[ids[col]]
        return TeacherScores(out)

    def take_metrics(self):
        return {}

    def close(self):
        pass


def teacher_sequence_logprob(ids: list[int]) -> float:
    return sum(float(teacher_table(tuple(ids[:n]))[ids[n]]) for n in range(len(ids)))


# --- an enumerable student: a table over a few student tokens per prefix ---

def byte_level_bytes(tok, token_id: int) -> bytes:
    """The bytes a byte-level BPE token stands for (GPT-2's byte <-> character map), independently of
    opd.alignment."""
    chars = [c for c in range(ord("!"), ord("~") + 1)] + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in chars:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return bytes(table[c] for c in tok.convert_ids_to_tokens(token_id))


WORDS = ["Ġriver", "Ġsea", "Ġis", "Ġ"]  # "Ġ" (a space) is followed by a character written byte by byte
EXACT_NEXT = {"Ġ": ["Ã", "ð"], "Ã": ["©", "¨"], "ð": ["Ł"], "Ł": ["Ļ"], "Ļ": ["Ĥ", "ĥ"]}  # é è 🙂 🙃
PIECES = ["Ġth", "e", "a", "Ġsea"]  # " th" + "e" is one teacher token (" the"), " th" + "a" three: it depends on what follows


def choices(prefix: tuple, vocab: list[str], max_tokens: int) -> list[str]:
    if prefix and prefix[-1] in EXACT_NEXT:
        return EXACT_NEXT[prefix[-1]]
    if len(prefix) >= max_tokens:
        return ["</s>"]
    return vocab + (["</s>"] if prefix else [])


def completions(vocab, max_tokens):
    def grow(prefix):
        for c in choices(prefix, vocab, max_tokens):
            if c == "</s>":
                yield prefix + (c,)
            else:
                yield from grow(prefix + (c,))
    return list(grow(()))


def student_tables(vocab, max_tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefixes = {y[:n] for y in completions(vocab, max_tokens) for n in range(len(y))}
    return {p: (torch.randn(len(choices(p, vocab, max_tokens)), generator=g) * 1.5).requires_grad_(True)
            for p in sorted(prefixes)}


def student_logprobs(params, y, vocab, max_tokens):
    return torch.stack([F.log_softmax(params[y[:n]], -1)[choices(y[:n], vocab, max_tokens).index(y[n])]
                        for n in range(len(y))])


PROMPT = [{"role": "user", "content": "Say something."}]


def estimator_gradient(params, vocab, max_tokens, discount):
    """sum_y pi(y) grad L(y), L the loss opd's cross-tokenizer teacher and advantages give one sample."""
    s, t = tokenizer(STUDENT), tokenizer(TEACHER)
    cross = CrossTokenizerTeacher(TabularTeacher(), t, s)
    prompt_ids = s.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    prompt = Prompt(ids=list(prompt_ids), text=s.decode(prompt_ids), record={"messages": PROMPT})
    grads = {p: torch.zeros_like(v) for p, v in params.items()}
    for y in completions(vocab, max_tokens):
        ids = s.convert_tokens_to_ids(list(y))
        logprobs = student_logprobs(params, y, vocab, max_tokens)
        rollouts = sampled_batch([list(prompt_ids)], [ids], [logprobs.detach().tolist()], [True], 1, s.pad_token_id,
                                 prompts=[prompt])
        scores = cross.score(rollouts)
        assert cross.take_metrics()["dropped_rows"] == 0
        adv = compute_advantages(rollouts.completion_mask, rollouts.behaviour_logprobs, scores.logprobs,
                                 discount=discount, chunks=scores.chunks)
        cols = rollouts.completion_mask[0].bool()
        loss = policy_gradient_loss(logprobs, rollouts.behaviour_logprobs[0, cols], adv[0, cols],
                                    torch.ones(len(y)), 1.0)
        weight = float(logprobs.detach().sum().exp())
        for p, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            if g is not None:
                grads[p] += weight * g
    return grads


def text_of(y) -> str:
    s = tokenizer(STUDENT)
    return b"".join(byte_level_bytes(s, s.convert_tokens_to_ids(c)) for c in y[:-1]).decode("utf-8")


def canonical_teacher_ids(y) -> list[int]:
    t = tokenizer(TEACHER)
    return t.encode(text_of(y), add_special_tokens=False) + [t.eos_token_id]


def sequence_objective_gradient(params, vocab, max_tokens):
    """grad of E_{y~S}[log p_S(y) - log p_T(t(y))], t(y): the teacher's tokenization of y's text."""
    total = 0.0
    for y in completions(vocab, max_tokens):
        lp = student_logprobs(params, y, vocab, max_tokens).sum()
        total = total + lp.exp() * (lp - teacher_sequence_logprob(canonical_teacher_ids(y)))
    return dict(zip(params, torch.autograd.grad(total, list(params.values()), allow_unused=True)))


def independent_chunks(y):
    """Chunk of each student token and each teacher token, from the tokens' bytes (GPT-2 map)."""
    s, t = tokenizer(STUDENT), tokenizer(TEACHER)
    data = text_of(y).encode()

    def ends(tok, ids):
        out, at = [], 0
        for i in ids:
            at += len(byte_level_bytes(tok, i))
            out.append(at)
        return out

    boundary = lambda b: b == len(data) or (data[b] & 0xC0) != 0x80  # noqa: E731 (a character starts there)
    s_ends = ends(s, s.convert_tokens_to_ids(list(y[:-1])))
    t_ids = canonical_teacher_ids(y)
    t_ends = ends(t, t_ids[:-1])
    cuts = sorted({e for e in s_ends if boundary(e)} & set(t_ends))
    of = lambda e: sum(c < e for c in cuts)  # noqa: E731
    n = len(cuts)
    return [of(e) for e in s_ends] + [n], t_ids, [of(e) for e in t_ends] + [n]


def per_chunk_state_fixed_gradient(params, vocab, max_tokens):
    """sum_y pi(y) sum_c (sum_{t in c} grad log pi(y_t)) k_c: each chunk's reverse-KL estimate pushes
    only its own tokens, the state before it held fixed (today's per-token estimator, per chunk)."""
    grads = {p: torch.zeros_like(v) for p, v in params.items()}
    for y in completions(vocab, max_tokens):
        lp = student_logprobs(params, y, vocab, max_tokens)
        s_chunk, t_ids, t_chunk = independent_chunks(y)
        t_lp = [float(teacher_table(tuple(t_ids[:n]))[t_ids[n]]) for n in range(len(t_ids))]
        surrogate = 0.0
        for c in range(max(s_chunk) + 1):
            k = sum(float(lp[i].detach()) for i in range(len(y)) if s_chunk[i] == c) - sum(
                v for v, tc in zip(t_lp, t_chunk) if tc == c)
            surrogate = surrogate + k * sum(lp[i] for i in range(len(y)) if s_chunk[i] == c)
        weight = float(lp.detach().sum().exp())
        for p, g in zip(params, torch.autograd.grad(surrogate, list(params.values()), allow_unused=True)):
            if g is not None:
                grads[p] += weight * g
    return grads


def assert_same(a, b):
    for p in a:
        torch.testing.assert_close(a[p], b[p] if b[p] is not None else torch.zeros_like(a[p]),
                                   atol=1e-5, rtol=1e-4, msg=f"prefix {p}")


def test_the_enumerable_setting_has_chunks_of_several_tokens_on_both_sides():
    sizes = set()
    for y in completions(WORDS, 2):
        s_chunk, _, t_chunk = independent_chunks(y)
        sizes |= {(s_chunk.count(c), t_chunk.count(c)) for c in set(s_chunk)}
    assert any(s > 1 for s, _ in sizes) and any(t > 1 for _, t in sizes) and (1, 1) in sizes


def test_discount_one_gives_the_gradient_of_the_sequence_objective():
    params = student_tables(WORDS, 2)
    assert_same(estimator_gradient(params, WORDS, 2, 1.0), sequence_objective_gradient(params, WORDS, 2))


def test_discount_zero_gives_the_per_chunk_state_fixed_gradient():
    params = student_tables(WORDS, 2)
    assert_same(estimator_gradient(params, WORDS, 2, 0.0), per_chunk_state_fixed_gradient(params, WORDS, 2))


def test_pieces_whose_chunks_depend_on_later_tokens_make_discount_one_approximate():
    """When the teacher merges across a student boundary depending on what follows (' th' + 'e'
    is one teacher token, ' th' + 'a' three), a chunk's start depends on later tokens and the
    reward-to-go over chunks is no longer exactly the sequence objective's gradient (README)."""
    params = student_tables(PIECES, 2)
    got, want = estimator_gradient(params, PIECES, 2, 1.0), sequence_objective_gradient(params, PIECES, 2)
    gap = max(float((got[p] - (want[p] if want[p] is not None else 0)).abs().max()) for p in got)
    scale = max(float(w.abs().max()) for w in want.values() if w is not None)
    assert 1e-4 < gap < scale


def canonical_gap(vocab, max_tokens):
    """Over the enumerable completions: log p_T(t(y)) against the log of the teacher's total
    probability of the text (every teacher segmentation of its bytes, then its EOS)."""
    t = tokenizer(TEACHER)
    pieces = {tid: byte_level_bytes(t, tid) for tid in range(len(t)) if tid not in t.all_special_ids}
    gaps = []
    for y in completions(vocab, max_tokens):
        data = text_of(y).encode()

        def total(at: int, prefix: tuple) -> float:
            if at == len(data):
                return math.exp(float(teacher_table(prefix)[t.eos_token_id]))
            table = teacher_table(prefix)
            return sum(math.exp(float(table[tid])) * total(at + len(b), prefix + (tid,))
                       for tid, b in pieces.items() if b and data.startswith(b, at))

        gaps.append(math.log(total(0, ())) - teacher_sequence_logprob(canonical_teacher_ids(y)))
    return gaps


def test_canonical_tokenization_underestimates_the_teachers_probability_of_the_text():
    gaps = canonical_gap(WORDS, 1)
    assert min(gaps) >= -1e-6  # the canonical tokenization is one of the segmentations summed
    assert max(gaps) > 0  # and others carry probability too
