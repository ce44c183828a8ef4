"""Typed run configuration: YAML file + `key.sub=value` overrides, validated by pydantic.

Every section forbids unknown keys, so a typo is an error that names the key instead of a
setting that is silently ignored.
"""

from __future__ import annotations

import difflib
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


class ModelConfig(Section):
    """Where a model comes from: exactly one of `path` or `tiny`.

    `path` is a local Hugging Face directory, a `.gguf` file, or a directory plus `gguf_file`.
    A hub id is accepted only if it is already in the local Hugging Face cache: opd never downloads.
    """

    path: str | None = None
    gguf_file: str | None = None
    tiny: TinyModelConfig | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora: LoraConfig | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if (self.path is None) == (self.tiny is None):
            raise ValueError("give exactly one of `path` (a local model) or `tiny` (built from a config)")
        return self


class DataConfig(Section):
    prompts: str | None = None  # JSONL / Parquet / any `datasets`-loadable local file; None: built-in demo prompts
    eval_prompts: str | None = None  # None: hold out `eval_holdout` prompts from `prompts`
    eval_holdout: int = Field(32, ge=0)
    max_prompt_tokens: int = Field(512, ge=1)
    overlong: Literal["skip", "truncate"] = "skip"  # truncate keeps the end of the prompt


class SamplingConfig(Section):
    samples_per_prompt: int = Field(4, ge=1)  # group size G
    max_new_tokens: int = Field(128, ge=1)
    # The estimator assumes the student samples from exactly the distribution it is trained on:
    # temperature 1, no top-p/top-k. Other values are allowed, with a warning.
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0: off
    stop: list[str] = Field(default_factory=list)  # stop strings, besides the tokenizer's EOS


class LossConfig(Section):
    # sampled_reverse_kl: the default single-sample estimator, policy gradient with advantage -c*k_t.
    # reverse_kl / forward_kl / jsd: exact full-vocabulary divergences (teacher in process only).
    kind: Literal["sampled_reverse_kl", "reverse_kl", "forward_kl", "jsd"] = "sampled_reverse_kl"
    kl_coef: float = Field(1.0, ge=0)  # c in A_t = -c * k_t
    discount: float = Field(0.0, ge=0, le=1)  # gamma; 0: each token's own KL only
    clip_eps: float | None = Field(None, gt=0)  # PPO-style ratio clip; None: off
    jsd_beta: float = Field(0.5, ge=0, le=1)  # 0: forward KL, 1: reverse KL
    chunk_size: int = Field(256, ge=1)  # positions per chunk when projecting hidden states to logits


class OptimConfig(Section):
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    grad_clip: float | None = Field(1.0, gt=0)


class TrainConfig(Section):
    steps: int = Field(100, ge=1)
    prompts_per_step: int = Field(8, ge=1)
    micro_batch_size: int = Field(8, ge=1)  # sequences per forward/backward
    seed: int = 0
    device: str = "auto"  # auto: cuda when present, else cpu


class EvalConfig(Section):
    every: int = Field(0, ge=0)  # 0: only at the start and the end
    samples_per_prompt: int = Field(1, ge=1)
    seed: int = 1234  # eval samples are drawn from their own seed: they do not perturb training


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


class RunConfig(Section):
    run_dir: str = "runs/default"
    student: ModelConfig
    teacher: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        if self.teacher.lora is not None:
            raise ValueError("teacher.lora: the teacher is fixed; LoRA applies to the student only")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading: YAML + overrides


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
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{shown}")
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
