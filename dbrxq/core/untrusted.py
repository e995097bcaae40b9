"""What a checkpoint (or a cache) hands us is untrusted input: this module reads and checks it.

Checkpoints come from strangers. Everything dbrxq reads from one goes through here first:

- **Confinement** (:func:`confine`, :func:`inside`): a file a checkpoint names (an index entry, a
  shard, a tokenizer file, config.json itself) must resolve inside the checkpoint's folder: no
  absolute paths, no ``..`` components, no symbolic link whose target leaves the folder (targets
  are resolved and compared). A hub snapshot's files are links into the repo's ``blobs`` folder, so
  there that folder is allowed too (:func:`trust_roots`). A refused file is never opened,
  and the message names the entry, never the content of what it points at.
- **Bounded JSON** (:func:`read_json`, :func:`parse_json`): only a regular file of at most a stated
  size is read; the text must be JSON proper (no NaN / Infinity, no integer of more than
  :data:`MAX_INT_DIGITS` digits, no number beyond a double's range), repeat no key in any object,
  and nest at most :data:`MAX_JSON_DEPTH` levels (texts above 1 MiB: the interpreter's recursion limit).
- **Typed fields** (:func:`get_int`, :func:`get_number`, :func:`get_bool`, ...): ints that are ints
  (not 4.0, not true), finite numbers, booleans that are booleans, with ranges; each failure is one
  line naming the file and the field.

Every error is a :class:`~dbrxq.core.errors.DbrxqError` subclass chosen by the caller (``error=``).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from dbrxq.core.errors import CheckpointError, DbrxqError

MAX_JSON_DEPTH = 32
# Integers in dbrxq's JSON files are counts, sizes, ids and shapes: 2**63 has 19 digits. Longer runs of
# digits are refused before Python converts them (a 5,000-digit integer would otherwise end in the
# interpreter's own conversion-limit ValueError, and 10**400 overflow every float it meets).
MAX_INT_DIGITS = 20
DEPTH_SCAN_BYTES = 1 << 20
# Size bounds, far above what real checkpoints hold (the demo's config.json is 1 KB; cl100k_base as a
# tokenizer.json, as dbrxq.text.vocab writes it, 4.1 MB).
MAX_CONFIG_BYTES = 4 << 20
MAX_INDEX_BYTES = 64 << 20
MAX_TOKENIZER_BYTES = 64 << 20
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


# ----------------------------------------------------------------------------- confinement

def trust_roots(folder: Path) -> list[Path]:
    """The folders files of ``folder`` may resolve into: the folder itself, and for a Hugging Face hub
    snapshot (``.../models--org--name/snapshots/<rev>``) also the repo's ``blobs`` folder, which the
    snapshot's links point at (nothing else of the cache)."""
    folder = Path(folder)
    roots = [folder]
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        roots.append(folder.parent.parent / "blobs")
    return roots


def inside(folder: Path, path: Path, what: str, *, error: type[DbrxqError] = CheckpointError) -> Path:
    """``path`` (a file in ``folder``), refused if it resolves outside :func:`trust_roots`."""
    real = os.path.realpath(path)
    for root in trust_roots(folder):
        r = os.path.realpath(root)
        if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
            return Path(path)
    raise error(f"{what}: {Path(path).name} is a link to a file outside {folder}; refused (not read)")


def confine(folder: Path, name: Any, what: str, *, error: type[DbrxqError] = CheckpointError) -> Path:
    """``folder / name`` for a file name taken from untrusted JSON (an index entry, a manifest)."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise error(f"{what}: {name!r} is not a file name")
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or name.startswith("~"):
        raise error(f"{what}: {name!r} points outside {folder}; only files inside the checkpoint folder "
                    f"are read (refused, not read)")
    return inside(folder, Path(folder) / p, what, error=error)


# ----------------------------------------------------------------------------- bounded JSON

def read_bytes(path: Path, max_bytes: int, *, folder: Path | None = None, what: str | None = None,
               error: type[DbrxqError] = CheckpointError) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``, confined to ``folder`` when given."""
    path = Path(path)
    what = what or str(path)
    if folder is not None:
        inside(folder, path, what, error=error)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what}: no such file") from None
    except OSError as e:
        raise error(f"{what}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what}: not a regular file; refused")
    if st.st_size > max_bytes:
        raise error(f"{what}: {st.st_size} bytes, more than the {max_bytes} such a file may have; refused")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{what}: cannot read ({e.strerror})") from None
    if len(data) > max_bytes:
        raise error(f"{what}: grew beyond {max_bytes} bytes while being read; refused")
    return data


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays/objects in JSON text (strings skipped)."""
    a = np.frombuffer(_STRING.sub(b'""', data), dtype=np.uint8)
    step = ((a == 0x5B) | (a == 0x7B)).astype(np.int64) - ((a == 0x5D) | (a == 0x7D))
    return int(np.cumsum(step).max(initial=0))


def _no_duplicates(what: str, error: type[DbrxqError]):
    def hook(pairs):
        d = dict(pairs)
        if len(d) != len(pairs):
            seen = set()
            k = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise error(f"{what}: key {k!r:.60} appears twice in one object; refused (which one would count?)")
        return d
    return hook


def parse_json(data: bytes, what: str, *, error: type[DbrxqError] = CheckpointError,
               not_json: str | None = None) -> Any:
    """JSON text -> value: no NaN/Infinity, no over-long integer or out-of-range number, and no key
    repeated in any object (a dict per object, small beside the parse even for a tokenizer.json). In
    texts of up to DEPTH_SCAN_BYTES (configs, indexes, safetensors headers, manifests) also nesting at
    most MAX_JSON_DEPTH; larger texts (a tokenizer.json of several MB) skip that scan, which is slower
    than the parse itself there, and nest at most as deep as the interpreter's recursion limit allows
    (RecursionError is refused)."""
    small = len(data) <= DEPTH_SCAN_BYTES
    if small:
        depth = json_depth(data)
        if depth > MAX_JSON_DEPTH:
            raise error(f"{what}: JSON nested {depth} levels deep (at most {MAX_JSON_DEPTH}); refused")

    def constant(name):
        raise error(f"{what}: {name} is not a JSON number; refused")

    def integer(text):
        if len(text.lstrip("-")) > MAX_INT_DIGITS:
            raise error(f"{what}: an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS}); refused")
        return int(text)

    def number(text):
        v = float(text)
        if not math.isfinite(v):
            raise error(f"{what}: the number {text:.40} is beyond the range of a double; refused")
        return v
    try:
        return json.loads(data, object_pairs_hook=_no_duplicates(what, error),
                          parse_constant=constant, parse_int=integer, parse_float=number)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(not_json or f"{what}: not valid JSON ({e})") from None
    except RecursionError:  # texts above DEPTH_SCAN_BYTES
        raise error(f"{what}: JSON nested too deeply (beyond the interpreter's recursion limit); refused") from None


def read_json(path: Path, max_bytes: int, *, folder: Path | None = None, what: str | None = None,
              error: type[DbrxqError] = CheckpointError) -> Any:
    """:func:`read_bytes` then :func:`parse_json`."""
    what = what or str(path)
    return parse_json(read_bytes(path, max_bytes, folder=folder, what=what, error=error), what, error=error)


# ----------------------------------------------------------------------------- typed fields

def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(v: Any, field: str, where: str, *, lo: int | None = None, hi: int | None = None,
              null: bool = False, error: type[DbrxqError] = CheckpointError) -> int | None:
    if v is None and null:
        return None
    rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else (f" >= {lo}" if lo is not None else "")
    if not is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise error(f"{where}: field {field} must be an integer{rng}{' or null' if null else ''}, got {v!r:.60}")
    return v


def check_number(v: Any, field: str, where: str, *, positive: bool = False, lo: float | None = None,
                 hi: float | None = None, null: bool = False, error: type[DbrxqError] = CheckpointError) -> float | None:
    if v is None and null:
        return None
    ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
          and (not positive or v > 0) and (lo is None or v >= lo) and (hi is None or v <= hi))
    if not ok:
        kind = "a finite positive number" if positive else "a finite number"
        rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else ""
        raise error(f"{where}: field {field} must be {kind}{rng}{' or null' if null else ''}, got {v!r:.60}")
    return float(v) if isinstance(v, float) else v


def check_bool(v: Any, field: str, where: str, *, error: type[DbrxqError] = CheckpointError) -> bool:
    if not isinstance(v, bool):
        raise error(f"{where}: field {field} must be true or false, got {v!r:.60}")
    return v


def check_type(v: Any, types: type | tuple[type, ...], field: str, where: str, expected: str, *,
               null: bool = False, error: type[DbrxqError] = CheckpointError) -> Any:
    if (v is None and null) or isinstance(v, types):
        return v
    raise error(f"{where}: field {field} must be {expected}{' or null' if null else ''}, got {v!r:.60}")


# ----------------------------------------------------------------------------- numbers

def check_finite(t, name: str, where: Any, *, what: str = "refusing to quantize it"):
    """``t`` (a torch tensor) unchanged if every value is finite; else one line with the count."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{where}: tensor {name} holds {n} NaN/Inf value(s); {what}")
    return t
