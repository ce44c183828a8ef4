"""A checkpoint's trainer state in files whose loading runs no code.

    trainer_state.json          everything but tensors: step, totals, config, RNG states, the
                                optimizer's hyper-parameters, a batch sampled ahead's prompts
    trainer_state.safetensors   the tensors it names: optimizer moments, RNG state bytes, the
                                batch sampled ahead

A run folder may come from someone else, so nothing read from it may run code: a pickle (what
`torch.load(weights_only=False)` reads) can, JSON and safetensors cannot. The JSON keeps what
plain JSON would lose with small tagged objects: a tensor is {"__tensor__": name}, a tuple
{"__tuple__": [...]}, a dict with keys that are not strings {"__items__": [[key, value], ...]},
a numpy array {"__ndarray__": values, "dtype": ..., "shape": ...}, and the two dataclasses a
state holds (Rollouts, Prompt) {"__dataclass__": name, "fields": {...}} from a fixed list, never
a name looked up by import.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

JSON_NAME, TENSORS_NAME = "trainer_state.json", "trainer_state.safetensors"
LEGACY_NAME = "trainer_state.pt"  # a pickle: what opd wrote before
TAGS = ("__tensor__", "__tuple__", "__items__", "__ndarray__", "__dataclass__")


class UntrustedCheckpointError(RuntimeError):
    """A checkpoint stored as a pickle, which opd reads only when the user says they trust it."""


def _dataclasses() -> dict:
    from opd.data import Prompt
    from opd.rollouts import Rollouts

    return {"Rollouts": Rollouts, "Prompt": Prompt}


class _Encoder:
    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.names: dict[int, str] = {}  # id(tensor) -> its name: a tensor held twice is stored once
        self.storages: set[int] = set()

    def tensor(self, value: torch.Tensor) -> dict:
        if id(value) not in self.names:
            t = value.detach().to("cpu")
            # safetensors stores whole, unshared buffers: copy a view or a tensor sharing one
            ptr = t.untyped_storage().data_ptr()
            if t.numel() and (not t.is_contiguous() or ptr in self.storages
                              or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
                t = t.clone()
            self.storages.add(t.untyped_storage().data_ptr())
            name = f"t{len(self.tensors)}"
            self.tensors[name], self.names[id(value)] = t, name
        return {"__tensor__": self.names[id(value)]}

    def encode(self, value, where: str = "state"):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, torch.Tensor):
            return self.tensor(value)
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise TypeError(f"{where}: a numpy array of Python objects cannot be stored")
            return {"__ndarray__": value.reshape(-1).tolist(), "dtype": value.dtype.str, "shape": list(value.shape)}
        if isinstance(value, np.generic):  # a numpy scalar: its Python value
            return value.item()
        if isinstance(value, tuple):
            return {"__tuple__": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) and k not in TAGS for k in value):
                return {k: self.encode(v, f"{where}.{k}") for k, v in value.items()}
            return {"__items__": [[self.encode(k, where), self.encode(v, f"{where}[{k!r}]")] for k, v in value.items()]}
        name = type(value).__name__
        if dataclasses.is_dataclass(value) and _dataclasses().get(name) is type(value):
            return {"__dataclass__": name, "fields": {f.name: self.encode(getattr(value, f.name), f"{where}.{f.name}")
                                                      for f in dataclasses.fields(value)}}
        raise TypeError(f"{where}: a {type(value).__qualname__} cannot be stored in a checkpoint")


def write(directory: Path, state: dict) -> None:
    """Write `state` as trainer_state.json + trainer_state.safetensors in `directory`."""
    encoder = _Encoder()
    document = encoder.encode(state)
    save_file(encoder.tensors, str(Path(directory) / TENSORS_NAME))
    (Path(directory) / JSON_NAME).write_text(json.dumps(document))


def _decode(value, tensors: dict, classes: dict):
    if isinstance(value, list):
        return [_decode(v, tensors, classes) for v in value]
    if not isinstance(value, dict):
        return value
    tag = next((t for t in TAGS if t in value), None)
    if tag is None:
        return {k: _decode(v, tensors, classes) for k, v in value.items()}
    if tag == "__tensor__":
        if value["__tensor__"] not in tensors:
            raise ValueError(f"it names a tensor {value['__tensor__']!r} that {TENSORS_NAME} does not hold")
        return tensors[value["__tensor__"]]
    if tag == "__tuple__":
        return tuple(_decode(value["__tuple__"], tensors, classes))
    if tag == "__items__":
        return {_decode(k, tensors, classes): _decode(v, tensors, classes) for k, v in value["__items__"]}
    if tag == "__ndarray__":
        dtype = np.dtype(value["dtype"])
        if dtype == object:
            raise ValueError("it holds a numpy array of Python objects")
        return np.array(value["__ndarray__"], dtype=dtype).reshape(value["shape"])
    cls = classes.get(value["__dataclass__"])
    if cls is None:
        raise ValueError(f"it names an unknown kind of object {value['__dataclass__']!r}")
    return cls(**{k: _decode(v, tensors, classes) for k, v in value["fields"].items()})


def read(directory: Path, load_tensors) -> dict:
    """The state written by `write`; `load_tensors(path)` reads the safetensors file (and names
    it in its errors). Raises ValueError with the reason when the JSON does not describe a state."""
    document = json.loads((Path(directory) / JSON_NAME).read_text(encoding="utf-8"))
    state = _decode(document, load_tensors(Path(directory) / TENSORS_NAME), _dataclasses())
    missing = [k for k in ("step", "config", "totals", "learner", "rng") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"it is not a trainer state (no {', '.join(missing)})")
    if not isinstance(state["step"], int) or not isinstance(state["config"], dict):
        raise ValueError("its step or config has the wrong type")
    return state


def untrusted_message(path: Path) -> str:
    return (f"{path} is a checkpoint of an older opd, stored as a pickle, and loading a pickle can run any code "
            f"it holds: opd reads it only if you trust where this run folder came from. If you do, run the same "
            f"command with --trust-checkpoint (its next checkpoint is written in the safe format); otherwise start "
            f"a new run_dir from its weights (student.path={path.parent / 'model'})")
