"""`opd export`: a plain Hugging Face model out of any run, checkpoint or model.

    opd export runs/x out/merged --merge     # full weights, a LoRA adapter merged in: from_pretrained, vLLM
    opd export runs/x/checkpoints/step_000100 out/adapter
                                             # the LoRA adapter; its adapter_config.json names a base
                                             # directory that from_pretrained opens

A base that exists only in opd's memory (a tiny random model) is written beside the adapter, as
OUT/base, so the export never depends on opd to be read.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch

from opd.config import ConfigError, load_config


def export(source: str, out: Path, merge: bool = False, config: Path | None = None,
           overrides: list[str] | tuple = (), overwrite: bool = False) -> dict:
    """Write `source` (a run directory, a checkpoint or a model) to `out` as a Hugging Face
    directory; returns {"path", "kind": "merged" | "full" | "adapter", "base"}."""
    from opd.eval_command import resolve_model

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ConfigError(f"{out} already exists and is not empty: choose a new folder for the export")
    tree, weights = resolve_model(str(source), config)
    cfg = load_config(None, [*overrides, "log.progress=false"], base=tree)
    return export_config(cfg, weights, out, merge)


def export_config(cfg, weights: Path | None, out: Path, merge: bool = False) -> dict:
    """`export` of cfg.student with a checkpoint's `weights` (None: the model as configured)."""
    out = Path(out)
    model, tokenizer = _load_student(cfg, weights)

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result = _write(model, tokenizer, cfg.student, tmp, out, merge)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**result, "path": str(out.resolve())}


def _load_student(cfg, weights: Path | None):
    """The student on the CPU in its configured dtype, the checkpoint's weights loaded over it."""
    from opd.learner.checkpoint import load_weights
    from opd.models import load_model

    model, tokenizer = load_model(cfg.student, torch.device("cpu"))
    if weights is not None:
        load_weights(model, weights)
    return model, tokenizer


def _write(model, tokenizer, spec, tmp: Path, out: Path, merge: bool) -> dict:
    is_lora = hasattr(model, "peft_config")
    if not is_lora or merge:
        plain = model.merge_and_unload() if is_lora else model
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return {"kind": "merged" if is_lora else "full", "base": None}
    base = loadable_base(spec)
    if base is None:  # no directory holds the base: write it beside the adapter
        base = out.resolve() / "base"
        model.get_base_model().save_pretrained(tmp / "base", state_dict=_base_weights(model))
        tokenizer.save_pretrained(tmp / "base")
    for peft_config in model.peft_config.values():
        peft_config.base_model_name_or_path = str(base)
    with warnings.catch_warnings():
        # peft looks for the base's config.json at its final path, which exists only after the rename
        warnings.filterwarnings("ignore", message="Could not find a config file in")
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    return {"kind": "adapter", "base": str(base)}


def _base_weights(model) -> dict[str, torch.Tensor]:
    """The base model's own weights under plain names (no LoRA factors, no `base_layer`)."""
    state = model.get_base_model().state_dict()
    return {name.replace(".base_layer.", "."): tensor for name, tensor in state.items() if "lora_" not in name}


def loadable_base(spec) -> Path | None:
    """A directory `from_pretrained` opens holding `spec`'s base weights (a GGUF file's
    de-quantised copy under OPD_CACHE), or None for a model built in memory (tiny)."""
    from opd.models import _resolve_directory

    if spec.path is None:
        return None
    return Path(_resolve_directory(spec)).resolve()
