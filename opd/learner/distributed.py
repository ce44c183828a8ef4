"""The learner on several processes, launched by `torchrun` (DESIGN.md §3): data-parallel
training with DDP or FSDP2 (`torch.distributed.fsdp.fully_shard`), gloo on CPU, NCCL on GPU.

    .venv/bin/torchrun --nproc-per-node 2 .venv/bin/opd distill --config run.yaml train.strategy=fsdp2

Everything the loop needs from the other processes is here, so that `opd.loop` stays the loop:

* `init()` joins the process group that torchrun describes in its environment (RANK, WORLD_SIZE,
  MASTER_ADDR, ...). Without torchrun, or with one process, nothing is initialised and every
  function below is the identity: a single-process run is exactly what it was before.
* Each step's global batch is chosen from the step number as on one process; rank r takes its
  contiguous `share` of the prompts (or sequences), so the data order does not depend on the
  number of processes.
* The loss of every rank is divided by the completion tokens of the *global* batch (`sum`), and
  gradients are *summed* over ranks (not averaged as DDP and FSDP do by default): N ranks then
  compute exactly the gradient of one rank holding the whole batch.
* `combine_metrics` turns each rank's step metrics into the global batch's (counts summed,
  per-token means weighted by tokens); rank 0 alone writes the run directory.
* FSDP2 loads on rank 0 only: the other ranks build the student on the meta device and `wrap`
  sends them their shards (`opd.learner.rank0_weights`).
* `save_checkpoint` is called by every rank: FSDP2 weights and optimizer state are gathered to
  rank 0, which writes the same Hugging Face checkpoint as one process would, plus every rank's
  RNG state, so `--resume` on the same number of processes continues bit-identically.

The in-process teacher is replicated: every rank loads the whole teacher and scores its own share
(a teacher too large for one device is served instead: `teacher.url`).
"""

from __future__ import annotations

import datetime
import gc
import os
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from opd.config import ConfigError

STRATEGIES = ("ddp", "fsdp2")


# ----------------------------------------------------------------------------------------------
# The process group


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether this process is one of several (the process group is up)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 writes the run directory, logs and draws the progress bar."""
    return rank() == 0


def init(device: torch.device, timeout_s: float = 600.0) -> torch.device:
    """Join torchrun's process group (once) and return this rank's device: `cuda:LOCAL_RANK` on a
    GPU node, the CPU otherwise. Without torchrun (or with one process) nothing happens.

    `timeout_s` bounds every collective: a rank that stops answering (hung, not dead: torchrun ends
    the job itself when a rank dies) fails the others after that long instead of forever."""
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return device


def shutdown(learner=None) -> None:
    """Leave the process group. The learner's DDP / FSDP2 wrapper is released first, while the
    interpreter is whole: left to the interpreter's exit, DDP's reducer (holding our Python
    gradient hook) was destroyed during finalisation, and that aborted the process now and then
    ("terminate called without an active exception", 3 runs in 20 on a loaded 2-core machine)."""
    if learner is not None and learner.wrapped is not None:
        learner.wrapped = None
        gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    """NCCL reduces CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Small collectives (identities on one process)


def share(items: list, what: str = "train.prompts_per_step") -> list:
    """This rank's contiguous slice of the step's global batch; every rank gets as many items, so
    every rank runs the same number of micro-batches."""
    n, size = len(items), world_size()
    if n % size:
        raise ConfigError(f"{what}: the batch of {n} does not split evenly over {size} processes; make it a "
                          f"multiple of {size}")
    per_rank = n // size
    return items[rank() * per_rank:(rank() + 1) * per_rank]


def sum_tensor(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks."""
    if not active():
        return values
    out = values.detach().to(_collective_device(), torch.float64 if values.is_floating_point() else torch.long)
    dist.all_reduce(out)
    return out.to(values.device, values.dtype)


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (e.g. Ctrl-C pressed on one rank)."""
    if not active():
        return flag
    return bool(sum_tensor(torch.tensor([int(flag)]))[0])


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# Step metrics that count something: summed over ranks. Per-token means are weighted by each rank's
# `tokens`; phase times (`*_s`) add up over ranks (device-seconds, like FLOPs); the rest (row means,
# and the learner's metrics, already global and equal on every rank) are averaged over ranks, which
# hold equal numbers of rows.
SUMMED = ("tokens", "groups_all_equal", "teacher_requests", "teacher_retries", "teacher_tokens_scored",
          "dropped_rows", "chunks_over_cap")
TOKEN_MEANS = ("entropy", "teacher_kl", "chunks_per_token", "teacher_tokens_per_token")


def on_main_rank(work):
    """`work()` on rank 0 alone; every rank returns its result or raises its error. The broadcast is
    also the barrier: no rank goes on before rank 0 is done, and none waits for a rank that failed."""
    outcome = None
    if is_main():
        try:
            outcome = ("done", work())
        except Exception as err:
            outcome = ("failed", err)
    kind, value = broadcast_object(outcome)
    if kind == "failed":
        raise value
    return value


def combine_metrics(metrics: dict) -> dict:
    """The step metrics of the global batch, the same on every rank, from each rank's own."""
    if not active():
        return metrics
    every = gather_objects(metrics)
    tokens = [m.get("tokens", 0) for m in every]
    combined = {}
    # Every rank's keys: a teacher of several may have rows on one rank only (teacher_kl/<name>).
    for key in dict.fromkeys(k for m in every for k in m):
        values = [m[key] for m in every if key in m]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            combined[key] = values[0]
        elif key in TOKEN_MEANS or key.startswith("tokens/"):  # tokens/<name>: a share of the rank's tokens
            combined[key] = sum(m.get(key, 0.0) * t for m, t in zip(every, tokens)) / max(sum(tokens), 1)
        elif key.startswith("teacher_kl/"):  # a mean over the named teacher's tokens on each rank
            weights = [t * m.get("tokens/" + key.removeprefix("teacher_kl/"), 0.0) for m, t in zip(every, tokens)]
            combined[key] = sum(m[key] * w for m, w in zip(every, weights) if key in m) / max(sum(weights), 1e-12)
        elif (base := key.split("/")[0]) in SUMMED or base.startswith("flops_") or base.endswith("_s"):
            combined[key] = sum(values)  # counts and times; <counter>/<name>: one teacher's of several
        elif all(v == values[0] for v in values):
            combined[key] = values[0]  # the same on every rank (the learner's metrics): kept exactly
        else:
            combined[key] = sum(values) / len(values)
    return combined


def slowest(seconds: float) -> float:
    """The longest of the ranks' times: the wall time of a step that they ran together."""
    return max(gather_objects(seconds))


# ----------------------------------------------------------------------------------------------
# Wrapping the learner's model: DDP or FSDP2


class Trunk(nn.Module):
    """The model's decoder (token ids -> final hidden states) as the module DDP and FSDP run.

    The learner never calls the model's own forward (it would compute B x T x V logits): it runs the
    decoder, then the output head a chunk of positions at a time. DDP and FSDP act on the forward
    of the module they wrap, so they wrap this one, which holds the whole model (every parameter,
    head included) and whose forward is the decoder's. The head runs outside that forward, in the
    same autograd graph: its gradient is reduced with the rest."""

    def __init__(self, model: nn.Module, decoder: nn.Module):
        super().__init__()
        self.model = model
        self._decoder = [decoder]  # a plain list: not registered twice as a submodule

    def forward(self, **kwargs):
        return self._decoder[0](**kwargs)


def _sum_gradients(process_group, bucket):
    """DDP communication hook: sum gradients over ranks (the default averages them). The loss is
    already divided by the global token count, so the sum is the one-process gradient."""
    group = process_group if process_group is not None else dist.group.WORLD
    return dist.all_reduce(bucket.buffer(), group=group, async_op=True).get_future().then(lambda f: f.value()[0])


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    if layers is None:
        raise ConfigError(f"train.strategy=fsdp2: cannot find the decoder layers of {type(base).__name__} "
                          f"(expected get_decoder().layers); use train.strategy=ddp")
    return list(layers)


def wrap(learner, strategy: str) -> None:
    """Make the learner's forward data-parallel over the process group (no-op on one process).

    ddp: every rank holds the whole model; gradients are summed in buckets during the backward.
    fsdp2: each decoder layer is its own `fully_shard` unit and the rest (embeddings, norm, head)
    the root unit: parameters, gradients and optimizer states are sharded over ranks, and a
    layer's weights are gathered only while it runs. The optimizer is rebuilt over the sharded
    parameters."""
    if not active():
        return
    if strategy not in STRATEGIES:
        raise ConfigError(f"train.strategy={strategy!r}: expected one of {STRATEGIES}")
    head = learner.head
    trunk = Trunk(learner.model, head.decoder)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = learner.device
        wrapped = DistributedDataParallel(trunk, device_ids=[device] if device.type == "cuda" else None,
                                          forward_sync_buffers=False)  # no collective in the forward
        wrapped.register_comm_hook(None, _sum_gradients)
    else:
        from torch.distributed.fsdp import fully_shard

        from opd.learner import rank0_weights

        from_rank0 = rank0_weights.any_rank_on_meta(learner.model)  # ranks > 0 built no weights
        state = rank0_weights.rank0_state(learner.model) if from_rank0 else None
        for layer in _decoder_layers(learner.model):
            fully_shard(layer)
        wrapped = fully_shard(trunk)
        if from_rank0:
            rank0_weights.shard_from_rank0(learner.model, state, _collective_device())
            del state  # rank 0's whole weights: only its shards stay
        # Sum, not average: see the module docstring. The root keeps its weights (head included)
        # after the forward, because the head runs after it.
        for module in wrapped.modules():
            if hasattr(module, "set_gradient_divide_factor"):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # a plain sum: gloo has no pre-scaled sum
        # The first forward must go through the root (FSDP decides which unit is the root then).
        with torch.no_grad():
            ids = torch.zeros(1, 2, dtype=torch.long, device=learner.device)
            wrapped(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        wrapped.reshard()  # the root keeps its weights gathered after a forward; give them back
        learner.rebuild_optimizer()
    head.decoder = wrapped
    learner.wrapped = wrapped
    learner.strategy = strategy


def reduce_gradients_in_this_backward(learner, last: bool) -> None:
    """Gradient accumulation over micro-batches: gradients are reduced over ranks in the backward
    of the last micro-batch only. Set before each micro-batch's forward (DDP reads it there)."""
    if learner.wrapped is None:
        return
    if learner.strategy == "ddp":
        learner.wrapped.require_backward_grad_sync = last  # what DDP's no_sync() sets
    else:
        learner.wrapped.set_requires_gradient_sync(last)


def is_sharded(learner) -> bool:
    return getattr(learner, "strategy", None) == "fsdp2"


@contextmanager
def gathered_for_inference(learner):
    """FSDP2: the whole model's weights on every rank while sampling or evaluating, with no
    collective in the forward, so ranks may run different numbers of forwards (a decode loop
    that ends early). DDP and one process: nothing to do."""
    if not is_sharded(learner):
        yield
        return
    wrapped = learner.wrapped
    units = [m for m in wrapped.modules() if hasattr(m, "unshard")]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(unit is not wrapped, recurse=False)


def scalar(value) -> float:
    """A float from a tensor that may be a DTensor (FSDP2's gradient norm)."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


class GatheringSampler:
    """A sampler that shares a sharded (FSDP2) model: its weights are gathered around every call
    (`opd.roles.Sampler`)."""

    def __init__(self, sampler, learner):
        self.sampler, self.learner = sampler, learner
        self.tokenizer = sampler.tokenizer

    def sample(self, *args, **kwargs):
        with gathered_for_inference(self.learner):
            return self.sampler.sample(*args, **kwargs)

    def sync_weights(self) -> None:
        self.sampler.sync_weights()

    def close(self) -> None:
        self.sampler.close()


class RankZeroSync:
    """A served student (sampling.url) under torchrun: one engine answers every rank, so rank 0
    alone writes the weights and has the server reload them, and no rank samples again until it
    has (the others would draw from the old weights). Every rank raises rank 0's error. FSDP2: the
    whole weights are gathered to rank 0, on the CPU, for the export (`opd.roles.Sampler`)."""

    def __init__(self, sampler, learner):
        self.sampler, self.learner = sampler, learner
        self.tokenizer = sampler.tokenizer

    def sample(self, *args, **kwargs):
        return self.sampler.sample(*args, **kwargs)

    def sync_weights(self) -> None:
        self.learner.full_state = full_model_state(self.learner)  # FSDP2: a collective; None otherwise
        try:
            on_main_rank(self.sampler.sync_weights)  # returns on every rank once the reload is done
        finally:
            self.learner.full_state = None

    def close(self) -> None:
        self.sampler.close()


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _only_shards(learner) -> None:
    """FSDP2's root unit keeps its weights gathered after a forward without a backward (an
    evaluation); reshard it, so that the model's parameters are again the shards the optimizer holds."""
    learner.wrapped.reshard()


def full_model_state(learner) -> dict | None:
    """FSDP2: the whole model's state dict on rank 0 (on the CPU; None on other ranks); every rank
    must call it. Otherwise None: the model itself is whole."""
    if not is_sharded(learner):
        return None
    _only_shards(learner)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(learner.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if is_main() else None


def full_optimizer_state(learner) -> dict:
    """The optimizer's state as one process holds it (FSDP2: gathered, on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    _only_shards(learner)
    return get_optimizer_state_dict(learner.model, learner.optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(learner, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    _only_shards(learner)
    set_optimizer_state_dict(learner.model, learner.optimizer, state,
                             options=StateDictOptions(full_state_dict=True))


@torch.no_grad()
def load_full_model_state(learner, state: dict) -> None:
    """Copy whole tensors (every rank holds them: each read the checkpoint) into the model; a
    sharded parameter keeps its own shard, cut locally without any communication."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    _only_shards(learner)
    for name, param in learner.model.named_parameters():
        if name not in state:
            continue
        value = state[name].to(param.device, param.dtype)
        if isinstance(param, DTensor):
            value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param.to_local().copy_(value)
        else:
            param.copy_(value)


def load_sharded_weights(learner, directory) -> None:
    """FSDP2: load a checkpoint's Hugging Face directory (full weights or a LoRA adapter) into the
    sharded model; every rank reads the files and keeps its shard."""
    from pathlib import Path

    from opd.learner.checkpoint import _load_safetensors

    directory = Path(directory)
    names = {name for name, _ in learner.model.named_parameters()} | set(learner.model.state_dict().keys())
    if hasattr(learner.model, "peft_config"):
        # the adapter file names its tensors without the adapter's name ("lora_A.weight", not "lora_A.default.weight")
        saved = _load_safetensors(directory / "adapter_model.safetensors")
        adapter = learner.model.active_adapter
        state = {name: saved[name.replace(f".{adapter}.", ".")] for name in names
                 if name.replace(f".{adapter}.", ".") in saved}
        if len(state) != len(saved):
            raise RuntimeError(f"checkpoint {directory}: {len(saved) - len(state)} adapter tensors match no "
                               f"parameter of the model")
    else:
        files = sorted(directory.glob("*.safetensors"))
        state = {}
        for f in files:
            state.update(_load_safetensors(f))
        unknown = sorted(set(state) - names)
        if unknown:
            raise RuntimeError(f"checkpoint {directory} does not match the model: unexpected {unknown[:5]}")
    load_full_model_state(learner, state)


def save_checkpoint(run_dir, step: int, learner, tokenizer, trainer_state: dict, keep_last: int):
    """Every rank calls this; rank 0 writes the checkpoint (`opd.learner.checkpoint.save_checkpoint`:
    atomic, refuses non-finite weights) with every rank's RNG state and the world size, and every
    rank returns its path or raises its error."""
    from opd.learner import checkpoint

    if not active():
        return checkpoint.save_checkpoint(run_dir, step, learner, tokenizer, trainer_state, keep_last)
    trainer_state = {**trainer_state, "world_size": world_size(), "rng_ranks": gather_objects(trainer_state["rng"])}
    learner.full_state = full_model_state(learner)  # FSDP2: gathered (a collective), read by learner.save
    try:
        return on_main_rank(lambda: checkpoint.save_checkpoint(run_dir, step, learner, tokenizer, trainer_state,
                                                               keep_last))
    finally:
        learner.full_state = None


def rng_of(trainer_state: dict) -> dict:
    """This rank's RNG state in a checkpoint; a checkpoint of another number of processes is refused
    (each rank's sampling RNG continues its own stream: they do not map onto another world size)."""
    saved = trainer_state.get("world_size", 1)
    if saved != world_size():
        raise ConfigError(f"--resume: this checkpoint was written by {saved} process{'es' if saved > 1 else ''} and "
                          f"this run has {world_size()}; resume with the same number (torchrun --nproc-per-node "
                          f"{saved} on one node), or start a new run_dir from its weights (student.path=<checkpoint>/model)")
    return trainer_state["rng_ranks"][rank()] if saved > 1 else trainer_state["rng"]


def barrier() -> None:
    if active():
        dist.barrier()
