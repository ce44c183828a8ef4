"""Checkpoints a user can read without opd, written so that a crash never breaks "latest".

    run_dir/checkpoints/step_000050/model/          Hugging Face directory (full weights or LoRA adapter + tokenizer)
    run_dir/checkpoints/step_000050/trainer_state.json (+ .safetensors) optimizer, scheduler, RNG states,
                                                     step, running totals (opd.learner.state_file)
    run_dir/checkpoints/latest                       name of the newest complete checkpoint

A checkpoint is written to a temporary directory and renamed into place; `latest` is rewritten by
an atomic file replace after that. Old checkpoints beyond `keep_last` are removed afterwards, never
the one `latest` names nor the newest. Weights that are not finite (a diverged run) are refused
before anything is written (NonFiniteWeightsError); a write that fails (no space left) removes
its partial copy and leaves `latest` as it was (CheckpointWriteError). Reading a checkpoint runs
no code: the trainer state of an older opd (a pickle, trainer_state.pt) is read only when the
caller trusts it (`--trust-checkpoint`), else UntrustedCheckpointError.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from opd.learner import state_file
from opd.learner.state_file import UntrustedCheckpointError  # noqa: F401  (raised by load_trainer_state)


class NonFiniteWeightsError(ValueError):
    """The model's weights hold NaN or inf: no checkpoint is written from them."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (e.g. no space left: `.errno` is ENOSPC); the partial copy is
    removed and `latest` still names the previous checkpoint."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated or corrupt); the message names it."""


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def nonfinite_tensors(model) -> list[str]:
    """Names of the floating-point parameters and buffers of `model` that hold NaN or inf."""
    bad, seen = [], set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen or not tensor.is_floating_point():
            continue
        seen.add(id(tensor))
        flat = tensor.detach().reshape(-1)
        # in slices: a bool copy of a whole large embedding matrix is not needed to check it
        if not all(bool(torch.isfinite(part).all()) for part in flat.split(1 << 24)):
            bad.append(name)
    return bad


def _latest_name(root: Path) -> str | None:
    try:
        return (root / "latest").read_text().strip() or None
    except OSError:
        return None


def _disk_full(path: Path, margin: int = 1 << 20) -> bool:
    """Whether the file system holding `path` has (almost) no space left."""
    try:
        return shutil.disk_usage(path).free < margin
    except OSError:
        return False


def _no_space(err: BaseException) -> bool:
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    # torch.save and safetensors report a failed write in their own words
    text = str(err)
    return any(s in text for s in ("No space left", "StorageFull", "Disk quota exceeded", "file write failed"))


def save_checkpoint(run_dir: Path, step: int, learner, tokenizer, trainer_state: dict, keep_last: int) -> Path:
    """Write the checkpoint of `step` and point `latest` at it.

    Raises NonFiniteWeightsError (nothing written) if a weight is NaN or inf, and
    CheckpointWriteError if writing fails, e.g. no space left (the partial copy is removed; `latest`
    still names the previous checkpoint)."""
    root = Path(run_dir) / "checkpoints"
    name = f"step_{step:06d}"
    previous = _latest_name(root)
    kept = (f"checkpoints/latest still names {previous}" if previous else
            "there is no earlier checkpoint (checkpoints/latest does not exist)")
    bad = learner.nonfinite_tensors()
    if bad:
        raise NonFiniteWeightsError(
            f"step {step}: the model's weights are not finite (NaN or inf in {len(bad)} tensors: "
            f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): no checkpoint written; {kept}")
    final, tmp = root / name, root / f".tmp_{name}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        with warnings.catch_warnings():
            # peft checks whether the embeddings were resized against its base's config.json, which a
            # base named by its GGUF file has none of; opd never resizes them
            warnings.filterwarnings("ignore", message="Could not find a config file in")
            learner.save(tmp / "model", tokenizer)
        state_file.write(tmp, trainer_state)
        if final.exists():  # a checkpoint of this step from an earlier, interrupted attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / ".latest.tmp"
        try:
            latest_tmp.write_text(name + "\n")
            os.replace(latest_tmp, root / "latest")
        except BaseException:
            latest_tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(root)
    except Exception as err:  # safetensors reports a failed write in its own words
        full = _no_space(err) or _disk_full(root)  # before the partial copy is removed and frees space
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "no space left on the device" if full else f"{type(err).__name__}: {err}"
        raise CheckpointWriteError(
            f"could not write the checkpoint of step {step} to {final}: {reason}. The partial copy was removed; "
            f"{kept}", errno.ENOSPC if full else getattr(err, "errno", None)) from err
    except BaseException:  # Ctrl-C twice: never leave a half-written copy behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep_last, keep=name)
    return final


def _prune(root: Path, keep_last: int, keep: str) -> None:
    """Remove all but the `keep_last` newest checkpoints; never `keep`, the one `latest` names, or
    the newest."""
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    protected = {keep, _latest_name(root), *(p.name for p in steps[-1:])}
    for old in steps[:-keep_last] if keep_last > 0 else steps:
        if old.name not in protected:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not has_trainer_state(path):
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing or incomplete")
    return path


def has_trainer_state(checkpoint: Path) -> bool:
    """Whether `checkpoint` is a checkpoint directory of a run (of this opd or an older one)."""
    return any((Path(checkpoint) / name).is_file() for name in (state_file.JSON_NAME, state_file.LEGACY_NAME))


def load_trainer_state(checkpoint: Path, trust_pickle: bool = False) -> dict:
    """The trainer state of `checkpoint`. Loading it runs no code; an older opd's pickle
    (trainer_state.pt) is read only with `trust_pickle` (the user's --trust-checkpoint), else
    UntrustedCheckpointError says why and how."""
    checkpoint = Path(checkpoint)
    path = checkpoint / state_file.JSON_NAME
    if not path.is_file() and (checkpoint / state_file.LEGACY_NAME).is_file():
        return _load_pickled_state(checkpoint / state_file.LEGACY_NAME, trust_pickle)
    try:
        return state_file.read(checkpoint, _load_safetensors)
    except FileNotFoundError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as err:  # torn JSON, or not a state
        raise CorruptCheckpointError(f"{path} cannot be read (truncated or corrupt?): {err}") from None


def _load_pickled_state(path: Path, trusted: bool) -> dict:
    if not trusted:
        raise UntrustedCheckpointError(state_file.untrusted_message(path))
    try:
        return torch.load(path, weights_only=False)
    except Exception as err:  # a truncated zip, or a file that is not one (pickle's errors)
        raise CorruptCheckpointError(f"{path} cannot be read (truncated or corrupt?): {err}") from None


def _load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path} is missing: the checkpoint {path.parent} is incomplete") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CorruptCheckpointError(f"{path} cannot be read (truncated or corrupt?): {err}") from None


def load_weights(model, model_dir: Path) -> None:
    """Load a checkpoint's weights into `model` in place (same architecture, same LoRA config)."""
    model_dir = Path(model_dir)
    if _is_peft(model):
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights
        from safetensors import SafetensorError

        try:
            weights = load_peft_weights(str(model_dir))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            adapter = model_dir / "adapter_model.safetensors"
            raise CorruptCheckpointError(f"{adapter if adapter.is_file() else model_dir} cannot be read "
                                         f"(truncated, corrupt or missing?): {err}") from None
        set_peft_model_state_dict(model, weights)
        return
    index = model_dir / "model.safetensors.index.json"
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]
    except (ValueError, KeyError, AttributeError) as err:
        raise CorruptCheckpointError(f"{index} cannot be read (truncated or corrupt?): {err!r}") from None
    state = {}
    for f in files:
        state.update(_load_safetensors(model_dir / f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (e.g. an output head sharing the embedding) are saved once; anything else is an error.
    shared = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(p), []).append(name)
    loaded = set(state)
    really_missing = [m for m in missing
                      if not any(other in loaded for ids in shared.values() if m in ids for other in ids)]
    if really_missing or unexpected:
        raise RuntimeError(f"checkpoint {model_dir} does not match the model: missing {really_missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
