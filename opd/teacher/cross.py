"""A teacher of another tokenizer (`teacher.tokenizer_mode: cross`), behind the `Teacher` contract.

For each sampled row (opd.alignment): the completion's text is cut into the student tokens' byte
spans; the teacher sees the conversation under its own chat template and the same text under its
own tokenizer, then its end-of-turn token(s); one prefill of the wrapped teacher (in process or
served: it validates the ids it scored as it always does) gives a log-prob per teacher token. The
tokens are grouped into chunks closed where both tokenizations cut the text at the same byte, and
`TeacherScores.chunks` carries the teacher's log-prob per chunk to the advantage (opd.advantages).

Rows that cannot be aligned (the teacher's ids do not decode back to the text, a special token in
the middle of the text) are dropped, and chunks longer than `max_chunk_tokens` on either side get
no signal: both counted in the metrics, never guessed.
"""

from __future__ import annotations

import torch

from opd.config import ConfigError
from opd.alignment import AlignmentError, RowAlignment, align_row, end_of_turn_ids, teacher_prompt_ids
from opd.roles import Chunks, Teacher, TeacherScores
from opd.rollouts import Rollouts, sampled_batch
from opd.tokenizer_check import tokenizer_differences


class CrossTokenizerTeacher:
    """`inner` scores sequences of the teacher's own token ids; `teacher_tokenizer` is its tokenizer."""

    full_distribution = False
    top_k = 0

    def __init__(self, inner: Teacher, teacher_tokenizer, student_tokenizer, max_chunk_tokens: int = 16):
        self.inner = inner
        self.teacher_tokenizer = teacher_tokenizer
        self.student_tokenizer = student_tokenizer
        self.max_chunk_tokens = max_chunk_tokens
        self.end_ids = end_of_turn_ids(teacher_tokenizer)
        # One tokenizer after all: the teacher scores the student's own ids (prompt and completion, as
        # in tokenizer_mode=same), every chunk is one token, and the numbers are today's exactly.
        self.identical = not tokenizer_differences(student_tokenizer, teacher_tokenizer) and \
            getattr(student_tokenizer, "chat_template", None) == getattr(teacher_tokenizer, "chat_template", None)
        self.output_size = inner.output_size
        self.cost = inner.cost
        self._metrics: dict = {}

    def check_tokenizer(self, tokenizer) -> None:
        """Any student tokenizer can be aligned with the teacher's; nothing to refuse."""

    # --- one batch ---

    def _align(self, rollouts: Rollouts) -> list[RowAlignment | str]:
        """Each row's alignment, or the reason it was dropped."""
        student_end = set(self.student_tokenizer.all_special_ids)
        out = []
        for i in range(rollouts.batch_size):
            ids = rollouts.tokens[i][rollouts.completion_mask[i].bool()].tolist()
            ends_turn = bool(ids) and not bool(rollouts.truncated[i]) and ids[-1] in student_end
            if self.identical:
                out.append(RowAlignment(list(range(len(ids))), ids, list(range(len(ids))), len(ids)))
                continue
            try:
                out.append(align_row(self.student_tokenizer, self.teacher_tokenizer, ids, ends_turn, self.end_ids))
            except AlignmentError as err:
                out.append(str(err))
        return out

    def _teacher_batch(self, rollouts: Rollouts, rows: list[int], aligned: list[RowAlignment]) -> Rollouts:
        prompts = []
        for i in rows:
            group = int(rollouts.group_ids[i])
            prompt = rollouts.prompts[group] if group < len(rollouts.prompts) else None
            keep = rollouts.attention_mask[i].bool() & ~rollouts.completion_mask[i].bool()
            keep[rollouts.prompt_width:] = False  # the prompt, not the padding after the completion
            if self.identical:
                prompts.append(rollouts.tokens[i][keep].tolist())
                continue
            text = prompt.text if prompt is not None else \
                self.student_tokenizer.decode(rollouts.tokens[i][keep].tolist())
            prompts.append(teacher_prompt_ids(self.teacher_tokenizer, getattr(prompt, "record", None), text))
        completions = [a.teacher_ids for a in aligned]
        pad = self.teacher_tokenizer.pad_token_id if self.teacher_tokenizer.pad_token_id is not None else 0
        return sampled_batch(prompts, completions, [[0.0] * len(c) for c in completions],
                             [True] * len(rows), 1, pad, device=rollouts.tokens.device)

    @torch.no_grad()
    def score(self, rollouts: Rollouts, keep_hidden: bool = False) -> TeacherScores:
        if rollouts.multi_turn:
            raise ConfigError("a teacher of another tokenizer cannot score multi-turn episodes (env:) yet; "
                              "use a teacher of the student's tokenizer")
        alignments = self._align(rollouts)
        rows = [i for i, a in enumerate(alignments) if isinstance(a, RowAlignment)]
        aligned = [alignments[i] for i in rows]
        width = max((a.chunks for a in aligned), default=1) or 1
        device = rollouts.tokens.device
        index = torch.full_like(rollouts.tokens, -1)
        chunk_lp = torch.zeros(rollouts.batch_size, width, device=device)
        signal = torch.zeros(rollouts.batch_size, width, device=device)
        counts = {"chunks": 0, "one_to_one": 0, "over_cap": 0, "tokens": 0, "teacher_tokens": 0}
        if rows:
            batch = self._teacher_batch(rollouts, rows, aligned)
            teacher_lp = self.inner.score(batch).logprobs
            for row, a, t_row in zip(rows, aligned, range(len(rows))):
                lps = teacher_lp[t_row][batch.completion_mask[t_row].bool()]
                columns = rollouts.completion_mask[row].nonzero().flatten()
                self._fill_row(a, lps, columns, index[row], chunk_lp[row], signal[row], counts)
        logprobs = self._per_token(rollouts, index, chunk_lp)
        self._record(rollouts, alignments, index, chunk_lp, signal, counts)
        return TeacherScores(logprobs, chunks=Chunks(index, chunk_lp, signal))

    def _fill_row(self, a: RowAlignment, teacher_lps: torch.Tensor, columns: torch.Tensor, index_T: torch.Tensor,
                  chunk_lp_C: torch.Tensor, signal_C: torch.Tensor, counts: dict) -> None:
        teacher_chunk = torch.tensor(a.teacher_chunk, dtype=torch.long, device=chunk_lp_C.device)
        chunk_lp_C.scatter_add_(0, teacher_chunk, teacher_lps.to(chunk_lp_C.dtype))
        sizes = a.sizes()
        ok = [0 < s <= self.max_chunk_tokens and 0 < t <= self.max_chunk_tokens for s, t in sizes]
        signal_C[:a.chunks] = torch.tensor(ok, dtype=signal_C.dtype)
        chunk_lp_C.mul_(signal_C)
        student_chunk = torch.tensor(a.student_chunk, dtype=torch.long, device=index_T.device)
        index_T[columns] = torch.where(signal_C[student_chunk].bool(), student_chunk, -1)
        counts["chunks"] += a.chunks
        counts["one_to_one"] += sum(s == 1 and t == 1 for s, t in sizes)
        counts["over_cap"] += sum(max(s, t) > self.max_chunk_tokens for s, t in sizes)
        counts["tokens"] += len(a.student_chunk)
        counts["teacher_tokens"] += len(a.teacher_chunk)

    @staticmethod
    def _per_token(rollouts: Rollouts, index: torch.Tensor, chunk_lp: torch.Tensor) -> torch.Tensor:
        """The chunk's teacher log-prob shared evenly over its student tokens; a token without
        signal gets the student's own log-prob (a KL estimate of 0)."""
        has = index >= 0
        safe = index.clamp(min=0)
        size = torch.zeros_like(chunk_lp).scatter_add_(1, safe, has.to(chunk_lp.dtype))
        shared = chunk_lp.gather(1, safe) / size.gather(1, safe).clamp(min=1)
        mask = rollouts.completion_mask
        return torch.where(has, shared, rollouts.student_logprobs * mask) * mask

    def _record(self, rollouts: Rollouts, alignments: list, index: torch.Tensor, chunk_lp: torch.Tensor,
                signal: torch.Tensor, counts: dict) -> None:
        from opd.advantages import chunk_kl

        signalled = float(signal.sum())
        kl = chunk_kl(rollouts.student_logprobs, Chunks(index, chunk_lp, signal))
        # Of the last batch scored: in a step that is the training batch (evaluations score theirs
        # between steps, and would otherwise be counted in the next step's figures).
        self._metrics = {**counts, "dropped_rows": sum(not isinstance(a, RowAlignment) for a in alignments),
                         "signalled": signalled, "kl_sum": float(kl.sum())}

    def take_metrics(self) -> dict:
        """Alignment figures of the last batch scored (if any since the last call): chunks per
        student token, share of 1:1 chunks, rows dropped, chunks over the cap, and the mean teacher
        KL per signalled chunk."""
        m, self._metrics = self._metrics, {}
        out = dict(self.inner.take_metrics())
        if not m:
            return out
        out.update({
            "chunks_per_token": m["chunks"] / max(m["tokens"], 1),
            "aligned_1to1": m["one_to_one"] / max(m["chunks"], 1),
            "dropped_rows": m["dropped_rows"],
            "chunks_over_cap": m["over_cap"],
            "teacher_tokens_per_token": m["teacher_tokens"] / max(m["tokens"], 1),
            "chunk_teacher_kl": m["kl_sum"] / max(m["signalled"], 1.0),
        })
        return out

    def verify(self, vocab_size: int) -> None:
        """The inner teacher was verified against its own vocabulary when loaded; the student's
        vocabulary has nothing to match here."""

    def as_sampler(self, sampling) -> "TeacherTemplateSampler | None":
        """The teacher sampling in its own tokenizer, each prompt rendered with its own chat template
        (for its ceiling on the eval sets: graded on the text, decoded by its tokenizer); None for a
        served teacher."""
        inner = self.inner.as_sampler(sampling)
        return None if inner is None else TeacherTemplateSampler(inner, self.teacher_tokenizer)

    def close(self) -> None:
        self.inner.close()


class TeacherTemplateSampler:
    """A `Sampler` over a teacher of another tokenizer: the prompts given are the student's ids, so
    each is rendered again from its record (or text) as the teacher sees it, and the completions are
    in the teacher's tokens (`tokenizer` is the teacher's: graders decode with it)."""

    def __init__(self, inner, teacher_tokenizer):
        self.inner = inner
        self.tokenizer = teacher_tokenizer

    def sample(self, prompt_ids, samples_per_prompt=None, max_new_tokens=None, prompts=None, greedy=False,
               seed=None) -> Rollouts:
        if prompts is None:
            raise ValueError("a teacher of another tokenizer samples from the prompts' records or text, not "
                             "from the student's ids")
        ids = [teacher_prompt_ids(self.tokenizer, getattr(p, "record", None), p.text) for p in prompts]
        return self.inner.sample(ids, samples_per_prompt, max_new_tokens, prompts, greedy, seed)

    def sync_weights(self) -> None:
        """The teacher is fixed."""

    def close(self) -> None:
        self.inner.close()
