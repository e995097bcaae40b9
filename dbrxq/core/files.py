"""Writing files safely: temporary names renamed when complete, leftovers of killed runs removed,
disk-space checks and one-line write errors, atomic JSON, and dbrxq's cache folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

from dbrxq.core.errors import CheckpointError, QuantizationError
from dbrxq.core.units import format_size

logger = logging.getLogger(__name__)


def temp_path(path: Path) -> Path:
    """Where a file is written before its atomic rename: ``<name>.tmp.<pid>.<8 hex>`` beside it (not
    ending in .safetensors/.json/.gguf, so no reader mistakes it for the finished file; the pid lets
    :func:`remove_stale_temps` tell a killed writer's file from a live one's)."""
    return path.with_name(f"{path.name}.tmp.{os.getpid()}.{secrets.token_hex(4)}")


# Our temp names (every writer's, via temp_path): <name>.tmp.<pid>.<8 hex digits>. Nothing else is ever
# taken for a leftover, so a user's own files in OUT are never removed.
_TEMP_RE = re.compile(r"\.tmp\.(\d+)\.[0-9a-f]{8}$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, prefix: str = "") -> int:
    """Delete the temp files (our naming, starting with ``prefix``) that killed writers left in
    ``folder``: those whose process is gone. Returns the bytes freed; logs what it removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    freed, n = 0, 0
    for p in folder.iterdir():
        m = _TEMP_RE.search(p.name)
        if m and p.name.startswith(prefix) and p.is_file() and not p.is_symlink() and not _alive(int(m.group(1))):
            size = p.stat().st_size
            with contextlib.suppress(OSError):
                p.unlink()
                freed += size
                n += 1
    if n:
        logger.warning("removed %d temporary file(s) (%s) left in %s by an interrupted run", n, format_size(freed), folder)
    return freed


_WRITE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                 errno.EROFS: "the file system is read-only", errno.ENOTDIR: "a component of the path is a file, "
                 "not a folder", errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                 errno.EEXIST: "a file of that name is in the way", errno.EFBIG: "the file is too large for this file system"}


def is_write_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _WRITE_ERRORS


def write_error(e: OSError, where: str | os.PathLike, need: int | None = None) -> CheckpointError:
    """One line for an OSError met while writing under ``where``: what happened, the path, and with
    ``need`` the space the output needs beside what is free there."""
    why = _WRITE_ERRORS.get(e.errno, e.strerror or str(e))
    msg = f"{e.filename or where}: cannot write ({why})"
    if need is not None:
        probe = Path(where)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe if probe.is_dir() else probe.parent).free
        msg += f"; the output needs about {format_size(need)}, {format_size(free)} free there"
    return CheckpointError(msg + "; no complete-looking output was left")


def check_disk_space(out: str | os.PathLike, need: int) -> None:
    """Refuse to start when the file system of ``out`` has fewer than ``need`` bytes free."""
    free = shutil.disk_usage(out).free
    if free < need:
        raise QuantizationError(f"{out}: not enough free disk space: this run still needs about {format_size(need)}, "
                                f"{format_size(free)} free")


def fsync_dir(folder: Path) -> None:
    """Make a rename durable; best effort where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` via a temp file, fsync and rename."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write `obj` as indented JSON to `path` via a temp file, fsync and rename."""
    return write_bytes_atomic((json.dumps(obj, indent=2) + "\n").encode(), path)


def cache_dir() -> Path:
    return Path(os.environ.get("DBRXQ_CACHE") or Path.home() / ".cache" / "dbrxq")
