"""A served student's weights sent over vLLM's weight-transfer API (sampling.weight_sync=nccl):
GPU to GPU by NCCL broadcast, no disk. The server is started with
`--weight-transfer-config '{"backend": "nccl"}'`; its routes `/init_weight_transfer_engine`,
`/start_weight_update`, `/update_weights`, `/finish_weight_update` are driven here through the
sampler's own HTTP client (every request has the sampler's deadline), and vLLM's trainer-side
engine (`NCCLTrainerWeightTransferEngine`) does the broadcast from this process as rank 0.

vLLM's transfer backends are all GPU ones (nccl, sparse_nccl, nccl_m2n: NCCL; ipc: CUDA IPC):
on a CPU the disk path (sampling.weight_sync=disk) is the one that works, and asking for nccl
there is refused before anything starts.
"""

from __future__ import annotations

from typing import Callable

import torch

from opd.config import ConfigError


def check_nccl_available() -> None:
    """sampling.weight_sync=nccl needs a CUDA device and vLLM in this process: one clear line if not."""
    if not torch.cuda.is_available():
        raise ConfigError("sampling.weight_sync=nccl broadcasts the weights GPU to GPU and this process has no CUDA "
                          "device; use sampling.weight_sync=disk (the safetensors reload, any device)")
    try:
        import vllm.distributed.weight_transfer.nccl_engine  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"sampling.weight_sync=nccl uses vLLM's weight-transfer engine in the learner's process, "
                          f"which cannot import it ({err}); install opd[vllm] here, or use "
                          f"sampling.weight_sync=disk") from None


class _ServerRoutes:
    """vLLM's weight-sync control plane (its VLLMWeightSyncClient protocol) over the sampler's
    HTTP client, so every call has sampling.timeout_s as its deadline and errors name the server."""

    def __init__(self, post: Callable[[str, dict], dict]):
        self.post = post

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.post("/init_weight_transfer_engine", {"init_info": init_info})

    def shutdown_weight_transfer_engine(self) -> None:
        self.post("/shutdown_weight_transfer_engine", {})

    def start_weight_update(self) -> None:
        self.post("/start_weight_update", {})

    def update_weights(self, update_info) -> None:
        self.post("/update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.post("/finish_weight_update", {} if weight_version is None else {"weight_version": weight_version})


def _policy_source(policy_weights: Callable[[], dict]):
    """The learner's policy (plain HF names, a LoRA adapter merged) as vLLM's WeightSource; a tied
    tensor (the output head that is the embedding) is sent once, as the disk path stores it."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    def unique() -> list[tuple[str, torch.Tensor]]:
        seen, out = set(), []
        for name, tensor in policy_weights().items():
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                out.append((name, tensor.contiguous()))
        return out

    class PolicySource(WeightSource):
        def metadata(self):
            return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in unique()]

        def __iter__(self):
            return iter(unique())

    return PolicySource()


class NCCLWeightSync:
    """Sends the policy to the server after every step; the NCCL group (this process as rank 0,
    the server's workers after it) is set up at the first sync."""

    def __init__(self, post: Callable[[str, dict], dict], get: Callable[[str], dict],
                 policy_weights: Callable[[], dict], address: str, port: int):
        check_nccl_available()
        self.post, self.get, self.policy_weights = post, get, policy_weights
        self.address, self.port = address, port
        self.engine = None

    def _start(self) -> None:
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        workers = int(self.get("/get_world_size")["world_size"])
        info = NCCLTrainerInitInfo(master_address=self.address, master_port=self.port, world_size=1 + workers, rank=0)
        self.engine = NCCLTrainerWeightTransferEngine.trainer_init(
            info, client=_ServerRoutes(self.post), source=_policy_source(self.policy_weights))

    def send(self) -> None:
        if self.engine is None:
            self._start()
        self.engine.send_weights()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
