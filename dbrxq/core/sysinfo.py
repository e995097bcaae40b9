"""What machine is this, how fast can it read memory, and which device, dtype and thread count to use.

Benchmarks report speed as a ratio to the memory-bandwidth bound measured in the same run
(docs/benchmarks.md): ``read_bandwidth`` streams a large float32 tensor through a sum, with the
thread count torch uses, and keeps the best of several runs (a read-only stream; a copy would
understate it by counting the writes).
"""

from __future__ import annotations

import functools
import os
import platform
import resource
import time

import torch

from dbrxq.core.errors import ConfigError

_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16",
          "amx_int8")


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe_machine() -> str:
    flags = cpu_flags()
    have = " ".join(f for f in _FLAGS if f in flags) or "none of avx2/avx512/amx"
    return (f"CPU: {cpu_model()} | flags: {have} | torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best read-only bandwidth in bytes/s: sum over a float32 tensor of `nbytes`."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    del x
    return nbytes / best


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def max_threads() -> int:
    """The most threads dbrxq starts: 4 per CPU this process may run on (more only wait on each other,
    and a count in the millions exhausts memory before the first matmul)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return 4 * max(1, cpus)


def busy_before(threads: int | None) -> str | None:
    """A warning (to print after a run) when the machine was already busy as it started and ``threads``
    was left at its default, every core: OpenMP threads wait for each other at every matmul, and one
    descheduled thread stalls them all (see :func:`set_threads`). None when a thread count was
    chosen, or the load average left cores free."""
    if threads is not None or torch.get_num_threads() < 2 or not hasattr(os, "getloadavg"):
        return None
    cpus = os.cpu_count() or 1
    load = os.getloadavg()[0]
    if load < 0.75 * cpus:
        return None
    spare = max(1, int(cpus - load))
    return (f"warning: the load average was {load:.1f} on {cpus} CPUs as this run started: other processes compete "
            f"with its {torch.get_num_threads()} threads, which wait for each other; --threads {spare} may be "
            f"much faster")


THREADS_HELP = ("CPU threads for matmuls and dbrxq's kernel [default: the physical cores; at most 4 per CPU]; "
                "on a shared machine use fewer (1 when another process is busy).")


def set_threads(threads: int | None) -> int:
    """Use ``threads`` CPU threads for torch's matmuls and dbrxq's C kernel (None: keep torch's
    default, the number of physical cores). Returns the count in force. On a machine where another
    process is busy, fewer threads than cores avoid OpenMP barriers waiting on a descheduled
    thread (on a 2-core VM with one busy process, 2 threads ran the demo model 50-100x slower
    than 1)."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= max_threads():
            raise ConfigError(f"threads={threads!r:.30}: expected an integer from 1 to {max_threads()} "
                              f"(4 per CPU of this machine)")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'auto'/None -> None (the checkpoint's own float dtype); names -> torch dtypes."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}") from None


def parse_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; expected cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; expected cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but this torch sees no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} asked for, but this torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev
