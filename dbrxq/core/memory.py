"""How much memory this process has, and holds.

``--cpu-memory`` is a bound on the process's peak resident memory, so a plan needs what the process
already holds (the interpreter, torch and dbrxq: :func:`process_rss`) and, for ``--cpu-memory auto``,
what it may use at all (:func:`memory_limit`): the smallest limit of the memory cgroups it runs in
(cgroup v2's ``memory.max`` or v1's ``memory.limit_in_bytes``, up the hierarchy: a limit is inherited)
and what the kernel says is available (MemAvailable) plus what the process already holds. A cgroup
counts the page cache its processes cause; the kernel reclaims clean pages of it before it kills
anything, and the offloading runtime drops what it reads from it under a cgroup limit
(dbrxq.loading.offloading), so the limit bounds RSS plus a little cache.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import torch

from dbrxq.core.errors import BudgetError
from dbrxq.core.units import format_size

# What --cpu-memory auto leaves unused: the larger of 256 MiB and 1/16 of the memory found (the
# kernel's own needs inside a cgroup, other processes' growth, and page cache under a tight limit).
AUTO_MARGIN_MIN = 256 << 20
AUTO_MARGIN_FRACTION = 1 / 16
_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a huge number (9223372036854771712)


def process_rss(proc: str | os.PathLike = "/proc") -> int:
    """This process's resident memory now (VmRSS), in bytes; without /proc (not Linux) its peak so
    far, which is at least that."""
    try:
        return _status_kib(Path(proc) / "self" / "status", "VmRSS:") * 1024
    except (OSError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def process_peak_rss(proc: str | os.PathLike = "/proc") -> int:
    """This process's peak resident memory so far (VmHWM), in bytes."""
    return _status_kib(Path(proc) / "self" / "status", "VmHWM:") * 1024


def _status_kib(path: Path, key: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise OSError(f"{path}: no {key} line")


def _read_int(path: Path) -> int | None:
    """A limit file's value; None for "max" (v2), v1's "no limit", or a file that is not there."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max" or not text.isdigit():
        return None
    value = int(text)
    return None if value >= _UNLIMITED else value


def cgroup_limit(*, cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
                 proc: str | os.PathLike = "/proc") -> tuple[int, str] | None:
    """The smallest memory limit among this process's cgroups and their ancestors, with the file that
    set it; None when no cgroup limits memory (or none can be read)."""
    root = Path(cgroup_root)
    try:
        lines = (Path(proc) / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: the unified hierarchy
            base, name = root, "memory.max"
            if not (base / "cgroup.controllers").exists() and (base / "unified").is_dir():
                base = base / "unified"  # a hybrid mount
        elif "memory" in controllers.split(","):  # v1
            base, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        rel = Path(path.lstrip("/"))
        for cg in [rel, *rel.parents]:
            value = _read_int(base / cg / name)
            if value is not None and (best is None or value < best[0]):
                best = (value, str(base / cg / name))
    return best


def mem_available(proc: str | os.PathLike = "/proc") -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None when it cannot be read)."""
    try:
        return _status_kib(Path(proc) / "meminfo", "MemAvailable:") * 1024
    except (OSError, ValueError):
        return None


def memory_limit(*, cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
                 proc: str | os.PathLike = "/proc") -> tuple[int, str]:
    """(bytes this process may hold, where that came from): the smallest of its cgroup limit and
    MemAvailable plus what the process holds now.

    Raises:
        OSError: neither can be read (not Linux).
    """
    found = []
    cg = cgroup_limit(cgroup_root=cgroup_root, proc=proc)
    if cg is not None:
        found.append((cg[0], f"memory cgroup limit ({cg[1]})"))
    avail = mem_available(proc)
    if avail is not None:
        held = process_rss(proc)
        found.append((avail + held, f"MemAvailable {format_size(avail)} + this process's {format_size(held)}"))
    if not found:
        raise OSError("neither a memory cgroup limit nor /proc/meminfo could be read")
    return min(found)


def auto_budget(*, cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
                proc: str | os.PathLike = "/proc") -> tuple[int, str]:
    """``--cpu-memory auto``: :func:`memory_limit` minus the margin (AUTO_MARGIN_*), and a line saying
    how it was chosen."""
    limit, where = memory_limit(cgroup_root=cgroup_root, proc=proc)
    margin = max(AUTO_MARGIN_MIN, int(limit * AUTO_MARGIN_FRACTION))
    budget = max(0, limit - margin)
    return budget, (f"--cpu-memory auto: {format_size(budget)} = {where} ({format_size(limit)}) minus a margin "
                    f"of {format_size(margin)}")


CHECK_ABOVE = 64 << 20  # allocations smaller than this are not worth a look at /proc


def check_allocation(nbytes: int, device, what: str, hint: str, *, error=None) -> None:
    """Refuse (one line, ``error``: a DbrxqError class) to allocate ``nbytes`` for ``what`` when more
    than this process can still get: on CPU its memory limit (:func:`memory_limit`) less what it holds,
    on a GPU the free device memory. Checked before the allocation, which would otherwise end in an
    allocator traceback, or, for zero-filled host memory, in the OOM killer. ``hint``: what to change."""
    error = error or BudgetError
    if nbytes < CHECK_ABOVE:
        return
    device = torch.device(device)
    if device.type == "cuda":
        free, where = torch.cuda.mem_get_info(device)[0], f"free on {device}"
    elif device.type == "cpu":
        try:
            limit, source = memory_limit()
        except OSError:  # nothing to tell from (not Linux): let the allocator decide
            return
        free, where = max(0, limit - process_rss()), source
    else:
        return
    if nbytes > free:
        raise error(f"{what} needs {format_size(nbytes)}, more than the {format_size(free)} this process can still "
                    f"get ({where}); {hint}")
