"""What offloading keeps in its cache folder, for ``dbrxq cache``: per prepared-expert file, the
checkpoint it was built from (its sidecar's ``source``), the bytes of all its files (the file, the
sidecar, the observed routing, leftovers of killed runs), when it was last used (the newest of its
files' times: a run rewrites its routing statistics), and whether it is stale: its checkpoint is gone,
or its files changed since (size or time), so nothing will read it again.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from dbrxq.core.errors import DbrxqError
from dbrxq.core.units import format_size
from dbrxq.core.untrusted import MAX_INDEX_BYTES, read_json


@dataclasses.dataclass
class CacheEntry:
    key: str
    files: list[Path]  # every file of this key: .bin, .json, .routing.json, temps
    source: str | None  # the checkpoint folder it was built from (None: no readable sidecar)
    nbytes: int
    last_used: float
    stale: str | None  # why nothing will read it again, or None

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.last_used))
        state = f"  STALE: {self.stale}" if self.stale else ""
        return f"{format_size(self.nbytes):>12}  last used {when}  {self.source or '(unknown checkpoint)'}{state}"


def _stale(source: str | None, files) -> str | None:
    """Why nothing will read this file again, from its sidecar's (untrusted) record of its checkpoint."""
    if source is None:
        return "no readable sidecar"
    if not isinstance(files, list):
        return "no record of the checkpoint's files"
    try:
        folder = Path(source)
        if not folder.is_dir():
            return "its checkpoint is gone"
        now = {(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.glob("*.safetensors")}
    except (OSError, ValueError):  # a path the file system refuses (a NUL byte, too long): gone for us
        return "its checkpoint is gone"
    recorded = {tuple(f) for f in files if isinstance(f, list) and all(isinstance(x, (str, int)) for x in f)}
    return None if recorded == now else "its checkpoint changed since"


def cache_entries(root: Path) -> list[CacheEntry]:
    """The prepared-expert files under ``root`` (a ``prepared`` folder), newest use first."""
    if not root.is_dir():
        return []
    groups: dict[str, list[Path]] = {}
    for p in root.iterdir():
        if p.is_file() and not p.is_symlink():
            groups.setdefault(p.name.split(".", 1)[0], []).append(p)
    entries = []
    for key, files in groups.items():
        side = root / f"{key}.json"
        source = recorded = None
        try:
            data = read_json(side, MAX_INDEX_BYTES, folder=root) if side.is_file() else None
        except DbrxqError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("source"), str):
            source, recorded = data["source"], data.get("files")
        stats = [p.stat() for p in files]
        bin_present = (root / f"{key}.bin").is_file()
        entries.append(CacheEntry(key, sorted(files), source, sum(s.st_size for s in stats),
                                  max(max(s.st_mtime, s.st_atime) for s in stats),
                                  _stale(source, recorded) if bin_present else "no prepared-expert file"))
    return sorted(entries, key=lambda e: -e.last_used)


def same_checkpoint(entry: CacheEntry, folder: str | os.PathLike) -> bool:
    return entry.source is not None and os.path.realpath(entry.source) == os.path.realpath(folder)
