"""Assembling a run's roles from its config: the learner (the student's weights and optimizer),
the sampler, the teacher (in process or served) and the data.

Tokenizers are compared before any weights are loaded, so a mismatched pair is refused in seconds
rather than after minutes of loading (or de-quantising) both models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from opd.config import ConfigError, ModelConfig, RunConfig
from opd.context_check import check_context
from opd.data.sources import RunData, load_data
from opd.learner import distributed, rank0_weights
from opd.learner.learner import Learner
from opd.models import load_model, load_tokenizer, pick_device
from opd.objectives import objective_of
from opd.roles import Sampler, Teacher, check_output_sizes
from opd.sampler import build_sampler, with_env
from opd.same_model import warn_if_same_model
from opd.tasks import check_record_graders, is_graded
from opd.teacher.hf import HFTeacher


@dataclass
class Components:
    learner: Learner
    sampler: Sampler
    teacher: Teacher | None
    tokenizer: object
    data: RunData
    # The teacher as a sampler (an in-process teacher only): for its own accuracy, the run's ceiling.
    teacher_sampler: Sampler | None = None

    def close(self) -> None:
        try:
            self.sampler.close()
        finally:
            if self.teacher is not None:
                self.teacher.close()


def checked_teacher(spec: ModelConfig, student_tokenizer, micro_batch_size: int):
    """The first half of loading a teacher, before any weights: a served teacher connected and its
    tokenizer compared with the student's (the RemoteTeacher itself), or a local one's tokenizer
    compared (that tokenizer, for `loaded_teacher`)."""
    if spec.url is not None:
        from opd.teacher.remote import RemoteTeacher

        teacher = RemoteTeacher(spec, micro_batch_size=micro_batch_size)
        try:
            teacher.check_tokenizer(student_tokenizer)
        except BaseException:
            teacher.close()
            raise
        return teacher
    from opd.tokenizer_check import check_tokenizers_match

    teacher_tokenizer = load_tokenizer(spec)
    check_tokenizers_match(student_tokenizer, teacher_tokenizer)
    return teacher_tokenizer


def loaded_teacher(spec: ModelConfig, checked, device: torch.device, vocab_size: int, chunk_size: int,
                   micro_batch_size: int) -> Teacher:
    """The second half: a local teacher's weights loaded (and its head verified)."""
    if spec.url is not None:
        return checked
    model, tokenizer = load_model(spec, device, checked)
    teacher = HFTeacher(model, tokenizer, chunk_size, micro_batch_size)
    teacher.verify(vocab_size)
    return teacher


def load_cross_teacher(spec: ModelConfig, device: torch.device, student_tokenizer, chunk_size: int,
                       micro_batch_size: int) -> Teacher:
    """A teacher of another tokenizer: it scores its own token ids (a served one is checked to
    tokenize as its local tokenizer, `teacher.tokenizer`, does), wrapped by the chunk alignment."""
    from opd.teacher.cross import CrossTokenizerTeacher

    if spec.url is not None:
        from transformers import AutoTokenizer

        from opd.teacher.remote import RemoteTeacher

        teacher_tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer, local_files_only=True)
        inner = RemoteTeacher(spec, micro_batch_size=micro_batch_size)
        try:
            inner.check_tokenizer(teacher_tokenizer, probe_server=True)
        except BaseException:
            inner.close()
            raise
    else:
        teacher_tokenizer = load_tokenizer(spec)
        model, teacher_tokenizer = load_model(spec, device, teacher_tokenizer)
        inner = HFTeacher(model, teacher_tokenizer, chunk_size, micro_batch_size)
        inner.verify(len(teacher_tokenizer))
    return CrossTokenizerTeacher(inner, teacher_tokenizer, student_tokenizer, spec.max_chunk_tokens)


def load_teacher(spec: ModelConfig, device: torch.device, student_tokenizer, chunk_size: int,
                 micro_batch_size: int) -> Teacher:
    """A served teacher (spec.url) or a Hugging Face model in process, checked to tokenize exactly
    as the student does before its weights are loaded (tokenizer_mode=cross: any tokenizer, behind
    the byte-chunk alignment of opd.teacher.cross)."""
    if spec.tokenizer_mode == "cross":
        return load_cross_teacher(spec, device, student_tokenizer, chunk_size, micro_batch_size)
    checked = checked_teacher(spec, student_tokenizer, micro_batch_size)
    return loaded_teacher(spec, checked, device, len(student_tokenizer), chunk_size, micro_batch_size)


def load_teachers(cfg: RunConfig, device: torch.device, student_tokenizer) -> Teacher | None:
    """The run's teacher: none, the one `teacher`, or (`teachers`, data.sources) a RoutingTeacher over
    the named ones. Every tokenizer is checked (each error naming its teacher) before any weights load."""
    specs = cfg.teacher_specs
    if not specs:
        return None
    micro, chunk = cfg.train.micro_batch_size, cfg.loss.chunk_size
    if not cfg.routed:
        return load_teacher(cfg.teacher, device, student_tokenizer, chunk, micro)
    from opd.teacher.router import RoutingTeacher
    from opd.tokenizer_check import TokenizerMismatchError

    checked, loaded = {}, {}
    try:
        for name, spec in specs.items():
            if spec.tokenizer_mode == "cross":  # any tokenizer aligns; nothing to refuse
                continue
            try:
                checked[name] = checked_teacher(spec, student_tokenizer, micro)
            except TokenizerMismatchError as err:
                raise type(err)(f"teachers.{name}: {err}") from None
        for name, spec in specs.items():
            if spec.tokenizer_mode == "cross":
                loaded[name] = load_cross_teacher(spec, device, student_tokenizer, chunk, micro)
            else:
                loaded[name] = loaded_teacher(spec, checked[name], device, len(student_tokenizer), chunk, micro)
    except BaseException:
        for teacher in {**checked, **loaded}.values():
            if hasattr(teacher, "score"):  # a served teacher holds connections
                teacher.close()
        raise
    return RoutingTeacher(loaded)


def check_every_output_size(learner: Learner, teacher: Teacher | None, exact: bool) -> None:
    """Exact losses need every routed teacher's head to be the student's size (each one named)."""
    members = getattr(teacher, "teachers", None)  # a RoutingTeacher's named teachers
    if members is None:
        check_output_sizes(learner, teacher, needs_full_distribution=exact)
        return
    for name, member in members.items():
        try:
            check_output_sizes(learner, member, needs_full_distribution=exact)
        except ConfigError as err:
            raise type(err)(f"teachers.{name}: {err}") from None


def check_distributed_sampling(cfg, learner) -> None:
    """What a sampler cannot do under torchrun, refused before the first step."""
    if distributed.active() and cfg.sampling.url is not None and cfg.sampling.weight_sync == "nccl":
        raise ConfigError("sampling.weight_sync=nccl under torchrun is not supported yet (each rank would open its "
                          "own transfer group to the one server): use sampling.weight_sync=disk")
    if not distributed.is_sharded(learner):
        return
    if cfg.sampling.url is not None:  # a served student: rank 0 exports the gathered weights
        if cfg.student.lora is not None:
            raise ConfigError("train.strategy=fsdp2 with a LoRA student and a served sampler (sampling.url) is not "
                              "supported: the adapter is merged from whole layers; use train.strategy=ddp (a LoRA "
                              "student's trainable state is small)")
        if cfg.train.max_staleness:
            raise ConfigError("train.strategy=fsdp2 with a served sampler runs train.max_staleness=0 only: use "
                              "train.strategy=ddp to sample ahead")
        return
    if cfg.sampling.backend == "vllm" or cfg.train.max_staleness or cfg.sampling.dtype is not None:
        raise ConfigError("train.strategy=fsdp2 shards the student over the processes; a colocated "
                          "sampling.backend=vllm, train.max_staleness > 0 and sampling.dtype need its whole weights on "
                          "every rank: use train.strategy=ddp, or serve the student (sampling.url)")


def build(cfg: RunConfig, console: Console | None = None) -> Components:
    """Check the tokenizers, load the models, read or generate the data."""
    if cfg.sampling.backend == "vllm" and cfg.sampling.url is None:
        from opd.sampler.vllm import import_vllm

        import_vllm()  # refused in seconds, not after the models are loaded
    if cfg.eval.lm_eval is not None:
        from opd.harness import require_harness

        require_harness()  # likewise
    device = pick_device(cfg.train.device)
    student_tokenizer = load_tokenizer(cfg.student)
    data = load_data(cfg, student_tokenizer)  # a bad record (or its teacher's name) is refused before any loading
    check_record_graders(p.record for prompts in (data.train_prompts, *data.eval_sets.values()) for p in prompts)
    if cfg.method == "rl":
        ungraded = [p for p in data.train_prompts if not is_graded(p.record, cfg.data.grader)]
        if ungraded:
            raise ConfigError(f"method=rl needs a reward for every prompt, and {len(ungraded)} of "
                              f"{len(data.train_prompts)} have no grader (e.g. {ungraded[0].text[:60]!r}): set "
                              f"task.name, data.grader, or a `grader` field in each record")
    teacher = load_teachers(cfg, device, student_tokenizer)
    try:
        # FSDP2 under torchrun: rank 0 alone reads the student's weights; the others build it on the
        # meta device and receive their shards in distributed.wrap (rank0_weights)
        whole = rank0_weights.whole_on_this_rank(cfg.train.strategy)
        student, tokenizer = load_model(cfg.student, device, student_tokenizer, weights=whole)
        learner = Learner(student, cfg.optim, cfg.loss, cfg.train.steps, cfg.train.micro_batch_size,
                          objective_of(cfg.loss, cfg.on_policy), cfg.train.compute_dtype, device=device)
        if whole:  # rank 0's checks hold for the weights it sends
            learner.verify(len(tokenizer))
            warn_if_same_model(cfg, student, getattr(teacher, "model", None), len(tokenizer))  # an in-process teacher's
        check_every_output_size(learner, teacher, learner.exact)  # exact losses: refused here
        check_context(cfg, data, student, teacher)
    except BaseException:
        if teacher is not None:
            teacher.close()
        raise
    if console is not None and data.skipped:
        console.print(f"[yellow]skipped {data.skipped} prompts or examples that do not fit data.max_prompt_tokens="
                      f"{cfg.data.max_prompt_tokens} / data.max_seq_tokens={cfg.data.max_seq_tokens}[/yellow]")
    # Under torchrun the learner's forward becomes data-parallel (DDP or FSDP2; no-op on one process).
    distributed.wrap(learner, cfg.train.strategy)
    try:
        check_distributed_sampling(cfg, learner)
        sampler = build_sampler(cfg, learner, tokenizer, student, Path(cfg.run_dir))
    except BaseException:
        if teacher is not None:
            teacher.close()
        raise
    if distributed.active() and cfg.sampling.url is not None:  # one server for every rank: rank 0 syncs it
        sampler = distributed.RankZeroSync(sampler, learner)
    elif distributed.is_sharded(learner):  # FSDP2: the sampler gathers the sharded weights it reads
        sampler = distributed.GatheringSampler(sampler, learner)
    teacher_sampler = teacher.as_sampler(cfg.sampling) if teacher is not None else None
    if teacher_sampler is not None:  # the teacher's ceiling runs the same episodes (env:)
        teacher_sampler = with_env(cfg, teacher_sampler)
    return Components(learner, sampler, teacher, tokenizer, data, teacher_sampler)
