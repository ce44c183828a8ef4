"""What this machine's CPU can do, read before choosing a precision or a thread count.

Machines of one kind differ: some CPUs have bf16 units (x86 avx512_bf16 or AMX, Arm's bf16), some
only AVX2. Without them a bf16 matrix product is emulated (measured on an AVX2-only AMD EPYC: a
1024² bf16 matmul at 0.9 GFLOP/s against 126 in fp32) and oneDNN's bf16 weight packing raises
("bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq"). So:

* `native_bf16()`: bf16 arithmetic is fast here (the flags above, or a CUDA device with bf16);
* `bf16_packing()`: oneDNN's bf16 path (packed weights, `torch.ops.mkldnn`) runs at all;
* `bf16_slowdown()`: a small measured bf16/fp32 matmul time ratio, for the warning's figure;
* `check_bf16(cfg, device)`: warns once per setting when a run asks for bf16 on a CPU without it;
* `usable_cores()` / `choose_threads()`: the cores this process may run on (affinity, not the
  machine's count), so torch's OpenMP threads do not spin against each other on a shared box.
"""

from __future__ import annotations

import functools
import os
import platform
import time
import warnings
from pathlib import Path

import torch

BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 (AVX-512 BF16, AMX), Arm (FEAT_BF16)
REPORTED_FLAGS = ["avx2", "avx512f", "avx512bw", "avx512_bf16", "avx_ne_convert", "amx_tile", "amx_bf16", "bf16"]


class SlowBf16Warning(UserWarning):
    """A bf16 setting on a CPU that has no bf16 units: it works, many times slower than fp32."""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.cache
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "CPU part"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matrix products run on bf16 units here (not emulated)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return True  # mps and others: their own business
    return bool(cpu_flags() & BF16_FLAGS)


def bf16_packing() -> bool:
    """Whether oneDNN's bf16 path (weight packing, `torch.ops.mkldnn._linear_pointwise`) runs on this CPU:
    PyTorch's own check (avx512bw/vl/dq, or Arm bf16), or avx_ne_convert, which oneDNN also accepts."""
    mkldnn = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_reorder_linear_weight")
            and hasattr(mkldnn, "_linear_pointwise")):
        return False
    return bool(mkldnn._is_mkldnn_bf16_supported()) or "avx_ne_convert" in cpu_flags()


@functools.cache
def bf16_slowdown(size: int = 256) -> float:
    """How many times longer a size² bf16 matmul takes than the fp32 one on this CPU (best of a few;
    256² costs ~40 ms in emulated bf16, so the measurement stays cheap where it is slow)."""
    def best(dtype, repeats):
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        torch.matmul(a, b)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - t)
        return min(times)

    return best(torch.bfloat16, 3) / max(best(torch.float32, 5), 1e-9)


def machine_record() -> dict:
    """What a run's summary and a benchmark record about the CPU: its name, the flags that decide bf16,
    the cores this process may use and torch's threads."""
    flags = cpu_flags()
    return {"cpu": cpu_name(), "flags": [f for f in REPORTED_FLAGS if f in flags], "native_bf16": native_bf16(),
            "bf16_packing": bf16_packing(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "usable_cores": usable_cores(), "threads": torch.get_num_threads()}


_warned: set[str] = set()


def bf16_settings(cfg) -> list[str]:
    """The settings of a run config that ask for bf16 compute."""
    asked = []
    if cfg.teacher is not None and cfg.teacher.url is None and cfg.teacher.dtype == "bfloat16":
        asked.append("teacher.dtype=bfloat16")
    if cfg.student.dtype == "bfloat16":
        asked.append("student.dtype=bfloat16")
    if cfg.train.compute_dtype == "bfloat16":
        asked.append("train.compute_dtype=bfloat16")
    if cfg.sampling.backend == "hf" and cfg.sampling.dtype == "bfloat16":
        asked.append("sampling.dtype=bfloat16")
    return asked


def check_bf16(cfg, device: torch.device) -> list[str]:
    """Warn (SlowBf16Warning, once per setting in a process) when the run asks for bf16 on a CPU without
    bf16 units, with the measured slowdown; returns the settings warned about. The run still works:
    the lean decoder then joins its products without oneDNN's packing (`bf16_packing()`)."""
    if device.type != "cpu" or native_bf16(device):
        return []
    asked = [s for s in bf16_settings(cfg) if s not in _warned]
    if asked:
        _warned.update(asked)
        warnings.warn(
            f"{', '.join(asked)}: this CPU ({cpu_name()}) has no bf16 units (no avx512_bf16 / amx_bf16 in "
            f"/proc/cpuinfo), so bf16 products are emulated: a 256² bf16 matmul took {bf16_slowdown():.0f}x the "
            f"fp32 time here. Set them to float32 on this machine.", SlowBf16Warning, stacklevel=2)
    return asked


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's share), not the
    machine's count that torch's default threads follow."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def choose_threads(requested: int | None, processes_on_node: int = 1) -> int:
    """torch's compute threads for a run: `requested` (train.threads) when set; else OMP_NUM_THREADS when
    the user set it; else the usable cores shared among this node's processes (torchrun's local world)."""
    if requested:
        return requested
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    return max(1, usable_cores() // max(1, processes_on_node))


def set_threads(requested: int | None) -> int:
    """Apply `choose_threads` to torch (intra-op threads) and return the number."""
    threads = choose_threads(requested, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads
