"""FSDP2 without a whole student on every rank: rank 0 reads the weights, the other ranks build the
architecture on the meta device, and `fully_shard` + a broadcast from rank 0 give each rank only
its shard (`torch.distributed.checkpoint.state_dict.set_model_state_dict` with
`full_state_dict=True, broadcast_from_rank0=True`).

Measured by `benchmarks/distributed.py --only mem` (benchmarks/RESULTS_memory.md): a rank other
than 0 no longer holds the whole student while loading. What stays whole on every rank: the
in-process teacher (replicated: serve a large one, `teacher.url`) and the student's weights while
it samples (`distributed.gathered_for_inference`); on rank 0, the weights and AdamW state gathered
to write a checkpoint.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from opd.learner import distributed


def whole_on_this_rank(strategy: str) -> bool:
    """Whether this rank loads the student's weights: always, except under FSDP2 on ranks other
    than 0 (they receive their shards from rank 0)."""
    return not (distributed.active() and strategy == "fsdp2" and not distributed.is_main())


def any_rank_on_meta(model: nn.Module) -> bool:
    return distributed.any_rank(any(p.is_meta for p in model.parameters()))


def rank0_state(model: nn.Module) -> dict | None:
    """Rank 0's whole weights, taken before sharding (the tensors themselves: no copy)."""
    return dict(model.state_dict()) if distributed.is_main() else None


@torch.no_grad()
def shard_from_rank0(model: nn.Module, state: dict | None, device: torch.device) -> None:
    """After `fully_shard`: allocate the meta ranks' shards on `device`, then fill every rank's
    shards from rank 0's `state` (rank 0 sends each tensor, each rank keeps its slice). Buffers
    that no state dict holds (rotary frequencies) are broadcast as they are on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers()):
        model.to_empty(device=device)
    set_model_state_dict(model, state if distributed.is_main() else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
