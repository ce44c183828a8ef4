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
    # byte-level tokens: every end is exact, the tokens' own bytes
    assert ends == list(itertools.accumulate(float(len(byte_level_bytes(tok, i))) for i in ids))
    # by decoding alone, an end inside a character is only known to be inside it
    decoded, ends = byte_ends(tok, ids, raw=lambda tokenizer, token_id: None)
    assert decoded == text
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
    assert byte_ends(tok, ids)[1] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # exact bytes: byte-level tokens
    _, ends = byte_ends(tok, ids, raw=lambda tokenizer, token_id: None)
    assert ends == [0.5, 2.0, 2.5, 2.5, 2.5, 6.0]
    student, teacher, chunks = align(ends, [2.0, 6.0])
    assert (student, teacher, chunks) == ([0, 0, 1, 1, 1, 1], [0, 1], 2)
    assert align([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1.0, 2.0, 4.0, 6.0])[2] == 4  # inside a character too


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
    assert max(sz[1] for sz in a.sizes()) > 1 and 1 < a.chunks <= len(ids)
    swapped = align_row(t, s, t.encode(text, add_special_tokens=False), False, [s.eos_token_id])
    assert max(sz[0] for sz in swapped.sizes()) > 1  # the smaller vocabulary's tokens grouped under one


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

PRINTABLE = [*range(33, 127), *range(161, 173), *range(174, 256)]  # bytes that stand for themselves
BYTE_OF = {**{chr(b): b for b in PRINTABLE},
           **{chr(256 + n): b for n, b in enumerate(b for b in range(256) if b not in PRINTABLE)}}


def byte_level_bytes(tok, token_id: int) -> bytes:
    """The bytes a byte-level BPE token stands for (GPT-2's byte <-> character map), independently of
    opd.alignment."""
    return bytes(BYTE_OF[c] for c in tok.convert_ids_to_tokens(token_id))


# "Ġ" (a space) is followed by a character written byte by byte; " t" by "he", which the teacher
# writes as one token (" the"): chunks of several tokens on either side, each decided by the tokens before it.
WORDS = ["Ġriver", "Ġsea", "Ġis", "Ġ", "Ġt"]
EXACT_NEXT = {"Ġ": ["Ã", "ð"], "Ã": ["©", "¨"], "ð": ["Ł"], "Ł": ["Ļ"], "Ļ": ["Ĥ", "ĥ"], "Ġt": ["he"]}  # é è 🙂 🙃
# " th" + "e" is one teacher token (" the"), " th" + "a" three: a chunk's start depends on what follows
PIECES = ["Ġth", "e", "a", "Ġsea"]


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

    s_ends = ends(s, s.convert_tokens_to_ids(list(y[:-1])))
    t_ids = canonical_teacher_ids(y)
    t_ends = ends(t, t_ids[:-1])
    assert b"".join(byte_level_bytes(t, i) for i in t_ids[:-1]) == data
    cuts = sorted(set(s_ends) & set(t_ends))  # byte-level tokens: exact bytes, inside characters too
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


# --- with one tokenizer, cross mode is today's estimator exactly; the loop and its metrics ---

def test_equal_tokenizers_give_bit_identical_scores_and_advantages():
    from opd.config import TinyModelConfig
    from opd.teacher.hf import HFTeacher
    from opd.tiny import build_tiny_model

    tok = tokenizer(STUDENT)
    teacher = HFTeacher(build_tiny_model(TinyModelConfig(hidden_size=32, seed=3), tok), tok)
    cross = CrossTokenizerTeacher(teacher, tok, tok)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for q in ("Hi there.", "Write about the sea.")]
    texts = ["The river is quiet. café 你好 🙂", "A small robot sings.", "naïve", "It waits by the sea"]
    completions = [tok.encode(x, add_special_tokens=False) + ([tok.eos_token_id] if i < 3 else [])
                   for i, x in enumerate(texts)]
    g = torch.Generator().manual_seed(0)
    behaviour = [(-torch.rand(len(c), generator=g) * 3).tolist() for c in completions]
    batch = sampled_batch([list(p) for p in prompts], completions, behaviour, [True, True, True, False], 2,
                          tok.pad_token_id)
    same, chunked = teacher.score(batch), cross.score(batch)
    assert torch.equal(same.logprobs, chunked.logprobs)
    metrics = cross.take_metrics()
    assert metrics["chunks_per_token"] == 1.0 and metrics["aligned_1to1"] == 1.0 and metrics["dropped_rows"] == 0
    for discount in (0.0, 0.9, 1.0):
        for rewards in (None, torch.tensor([1.0, 0.0, 0.5, 0.2])):
            a = compute_advantages(batch.completion_mask, batch.behaviour_logprobs, same.logprobs, 0.7, discount,
                                   rewards, batch.group_ids)
            b = compute_advantages(batch.completion_mask, batch.behaviour_logprobs, chunked.logprobs, 0.7, discount,
                                   rewards, batch.group_ids, chunks=chunked.chunks)
            assert torch.equal(a, b), (discount, rewards)


QUICK = ["data.eval_holdout=2", "eval.teacher_accuracy=false"]


def run_weights(run_dir):
    from safetensors.torch import load_file

    from opd.learner.checkpoint import latest_checkpoint

    return load_file(str(latest_checkpoint(run_dir) / "model" / "model.safetensors"))


def test_cross_mode_with_one_tokenizer_trains_bit_identically(tiny_config, tmp_path):
    from opd.loop import train
    from opd.run_dir import read_metrics

    args = ["train.steps=2", "loss.discount=0.5", "teacher.tiny.pretrain_steps=0", *QUICK]
    train(tiny_config(*args, run_dir=tmp_path / "same"))
    train(tiny_config(*args, "teacher.tokenizer_mode=cross", run_dir=tmp_path / "cross"))
    a, b = run_weights(tmp_path / "same"), run_weights(tmp_path / "cross")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    same, cross = read_metrics(tmp_path / "same" / "metrics.jsonl"), read_metrics(tmp_path / "cross" / "metrics.jsonl")
    assert [r["teacher_kl"] for r in same[1:]] == [r["teacher_kl"] for r in cross[1:]]
    assert all(r["aligned_1to1"] == 1.0 and r["chunks_per_token"] == 1.0 for r in cross[1:])


def test_a_teacher_of_another_vocabulary_trains_in_cross_mode_and_is_refused_without(tiny_config, tmp_path):
    from opd.loop import train
    from opd.run_dir import read_metrics
    from opd.tokenizer_check import TokenizerMismatchError

    other = ["teacher.tiny.vocab_size=400", "teacher.tiny.pretrain_steps=0", "train.steps=2", *QUICK]
    with pytest.raises(TokenizerMismatchError, match="teacher.tokenizer_mode=cross"):
        train(tiny_config(*other, run_dir=tmp_path / "refused"))
    train(tiny_config(*other, "teacher.tokenizer_mode=cross", run_dir=tmp_path / "cross"))
    rows = read_metrics(tmp_path / "cross" / "metrics.jsonl")[1:]
    for r in rows:
        assert 0 < r["chunks_per_token"] <= 1 and 0 < r["aligned_1to1"] <= 1
        assert 0 <= r["dropped_rows"] <= 16 and r["teacher_tokens_per_token"] > 0  # of this step's 16 rows
        assert math.isfinite(r["chunk_teacher_kl"]) and math.isfinite(r["teacher_kl"])
    assert any(r["aligned_1to1"] < 1 for r in rows)  # the vocabularies differ: some chunks are longer
    from opd.report import build_report, read_jsonl

    records = read_jsonl(next((tmp_path / "cross" / "rollouts").glob("step_*.jsonl")))
    assert all(len(r["chunks"]) == len(r["tokens"]) for r in records)
    page = build_report(tmp_path / "cross").read_text()
    assert page.count("data-chunk=") > 0


@pytest.mark.parametrize("override", ["loss.kind=reverse_kl", "loss.kind=forward_kl", "loss.kind=jsd",
                                      "teacher.top_k=5"])
def test_full_distribution_losses_are_refused_across_tokenizers(tiny_config, override):
    with pytest.raises(ConfigError, match="no common support|top-k log-probs come from a served teacher"):
        tiny_config("teacher.tokenizer_mode=cross", override)


def test_a_served_cross_teacher_needs_its_local_tokenizer(tiny_config):
    with pytest.raises(ConfigError, match="teacher.tokenizer"):
        tiny_config("teacher.tokenizer_mode=cross", "teacher.tiny=null", "teacher.url=http://127.0.0.1:9")


def test_dropped_rows_and_chunks_over_the_cap_get_no_signal_and_are_counted():
    s, t = tokenizer(STUDENT), tokenizer(TEACHER)
    lone = s.encode("é", add_special_tokens=False)[1:]  # a continuation byte alone: not UTF-8
    completions = [s.encode(" river is", add_special_tokens=False) + [s.eos_token_id],
                   lone + s.encode(" sea", add_special_tokens=False) + [s.eos_token_id],
                   s.encode(" quiet", add_special_tokens=False) + [s.eos_token_id]]
    prompt = s.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    batch = sampled_batch([list(prompt)] * 3, completions, [[-1.0] * len(c) for c in completions], [True] * 3, 1,
                          s.pad_token_id)
    cross = CrossTokenizerTeacher(TabularTeacher(), t, s, max_chunk_tokens=3)  # ' quiet' is 6 teacher tokens
    scores = cross.score(batch)
    metrics = cross.take_metrics()
    assert metrics["dropped_rows"] == 1 and metrics["chunks_over_cap"] == 2  # ' river' (4) and ' quiet' (6)
    adv = compute_advantages(batch.completion_mask, batch.behaviour_logprobs, scores.logprobs, chunks=scores.chunks)
    assert (adv[1] == 0).all()  # the dropped row
    river, is_, eos = (batch.completion_mask[0].nonzero().flatten()).tolist()
    assert adv[0, river] == 0 and adv[0, is_] != 0 and adv[0, eos] != 0
    quiet, eos = (batch.completion_mask[2].nonzero().flatten()).tolist()
    assert adv[2, quiet] == 0 and adv[2, eos] != 0
    # no signal: the token's KL estimate is 0 in the per-token view too
    assert scores.logprobs[0, river] == batch.behaviour_logprobs[0, river]


def test_a_cross_teachers_ceiling_samples_its_own_rendering_of_each_prompt(tiny_config, tmp_path):
    """The teacher as a sampler in cross mode renders each prompt from its record with its own template
    and samples in its own tokens (with one tokenizer: exactly the same-mode teacher's samples); a
    run logs its ceiling, eval/teacher_accuracy, at step 0."""
    from opd.config import SamplingConfig
    from opd.loop import train
    from opd.run_dir import read_metrics
    from opd.teacher.hf import HFTeacher
    from opd.tiny import TinyModelConfig, build_tiny_model

    student_tok, teacher_tok = tokenizer(STUDENT), tokenizer(TEACHER)
    texts = ["what is 2 + 3?", "say something nice"]
    records = [{"messages": [{"role": "user", "content": t}]} for t in texts]

    def prompts_for(tok):
        ids = [tok.apply_chat_template(r["messages"], add_generation_prompt=True, return_dict=True)["input_ids"]
               for r in records]
        return [Prompt(list(i), t, r) for i, t, r in zip(ids, texts, records)]

    sampling = SamplingConfig(max_new_tokens=6, samples_per_prompt=2)
    for tok, rendered in ((student_tok, student_tok), (teacher_tok, teacher_tok)):
        model = build_tiny_model(TinyModelConfig(hidden_size=32, seed=3, vocab_size=len(tok)), tok)
        own = HFTeacher(model, tok).as_sampler(sampling)
        cross = CrossTokenizerTeacher(HFTeacher(model, tok), tok, student_tok).as_sampler(sampling)
        assert cross.tokenizer is tok
        student_prompts = prompts_for(student_tok)
        torch.manual_seed(0)
        a = cross.sample([p.ids for p in student_prompts], prompts=student_prompts)
        torch.manual_seed(0)
        b = own.sample([p.ids for p in prompts_for(rendered)], prompts=prompts_for(rendered))
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.completion_mask, b.completion_mask)

    args = ["train.steps=1", "teacher.tiny.pretrain_steps=0", "task.name=arithmetic", "task.train_size=16",
            "task.eval_size=8", "teacher.tokenizer_mode=cross", "teacher.tiny.vocab_size=400"]
    train(tiny_config(*args, run_dir=tmp_path / "other"))
    assert 0.0 <= read_metrics(tmp_path / "other" / "metrics.jsonl")[0]["eval/teacher_accuracy"] <= 1.0
