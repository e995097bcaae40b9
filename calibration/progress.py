"""The state of an output folder during ``dbrxq quantize``: manifest, resume, overwrite, disk space.

While a run is in progress OUT holds, besides the finished shards:

- ``quantize_progress.json`` (the manifest, always written atomically): the run's settings and
  their sha256 (qconfig + calibration options + SRC identity), and for each finished part
  (``embed``, ``layer.N``, ``head``) its shard file, size, sha256 and report entry;
- ``quantize_activations.safetensors``: the float32 calibration activations ``(N, L, D)`` entering
  the first unfinished layer, with the settings hash and that layer's index in its metadata.

Why store the activations instead of recomputing them at resume: recomputing the input of layer k
means re-running the calibration tokens through k quantized layers, which on a CPU costs about as
much as the propagation steps of the run so far (hours at layer 39 of DBRX); writing N*L*D*4 bytes
(1.6 GB at 128 x 512 tokens) per layer is seconds. If that file is missing or belongs to another
point of the run, the pipeline recomputes instead, from the quantized layers read back from disk,
with the same function as the run itself, so the bytes come out the same either way.

OUT is complete only once ``config.json`` (with ``quantization_config``) exists; it is written
last, after which the manifest and the activations are deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dbrxq.core.errors import DbrxqError, QuantizationError
from dbrxq.core.files import check_disk_space, temp_path, write_json_atomic
from dbrxq.core.untrusted import MAX_CONFIG_BYTES, MAX_INDEX_BYTES, confine, is_int, read_json
from dbrxq.formats.checkpoint import INDEX_NAME
from dbrxq.formats.shards import save_file_atomic  # noqa: F401 (re-exported)
from quantize.format import REPORT_NAME

log = logging.getLogger(__name__)

MANIFEST_NAME = "quantize_progress.json"
ACTIVATIONS_NAME = "quantize_activations.safetensors"
MANIFEST_FORMAT = "dbrxq-quantize-progress-v1"
_SHARD_FILE_RE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")

__all__ = ["Progress", "settings_sha256", "prepare_out", "check_disk_space", "save_activations",
           "load_activations", "file_sha256", "MANIFEST_NAME", "ACTIVATIONS_NAME", "REPORT_NAME"]


def settings_sha256(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Dotted keys where two settings dicts differ (for a one-line refusal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{path}.{k}".lstrip("."))]
    return [] if a == b else [f"{path} ({a!r} then, {b!r} now)"]


class Progress:
    """The manifest of one run in ``out``: settings and finished parts, saved atomically."""

    def __init__(self, out: Path, data: dict[str, Any]) -> None:
        self.out, self.data = out, data

    @property
    def path(self) -> Path:
        return self.out / MANIFEST_NAME

    @classmethod
    def new(cls, out: Path, settings: dict[str, Any]) -> Progress:
        return cls(out, {"format": MANIFEST_FORMAT, "settings_sha256": settings_sha256(settings),
                         "settings": settings, "threads": torch.get_num_threads(),
                         "torch": torch.__version__, "parts": {}})

    def done(self, part: str) -> bool:
        return part in self.data["parts"]

    def entry(self, part: str) -> dict[str, Any]:
        return self.data["parts"][part]

    def record(self, part: str, file: Path, **extra: Any) -> None:
        """Mark ``part`` finished with its shard ``file``; saves the manifest."""
        self.data["parts"][part] = {"file": file.name, "bytes": file.stat().st_size,
                                    "sha256": file_sha256(file), **extra}
        self.save()

    def verify(self) -> None:
        """Every finished part's shard exists, inside OUT, with its recorded size and sha256."""
        for part, e in self.data["parts"].items():
            p = confine(self.out, e["file"], f"{self.path}: part {part}", error=QuantizationError)
            if not p.is_file() or p.stat().st_size != e["bytes"] or file_sha256(p) != e["sha256"]:
                raise QuantizationError(f"{p}: {part} is recorded as finished in {MANIFEST_NAME} but the file is "
                                        f"missing or changed; rerun with --overwrite")

    def save(self) -> None:
        """Write the manifest atomically, with a sha256 of its own content (checked on resume)."""
        data = {k: v for k, v in self.data.items() if k != "manifest_sha256"}
        write_json_atomic({**data, "manifest_sha256": _content_sha256(data)}, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        (self.out / ACTIVATIONS_NAME).unlink(missing_ok=True)


def _content_sha256(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def read_manifest(manifest: Path) -> dict[str, Any]:
    """The progress manifest, checked like any untrusted JSON (dbrxq.core.untrusted): a bounded regular file
    inside OUT, strict JSON, the fields resume relies on present with their types, and every part's
    file a shard name of OUT (nothing else is ever opened through it)."""
    redo = "rerun with --overwrite to start over"
    try:
        data = read_json(manifest, MAX_INDEX_BYTES, folder=manifest.parent, error=QuantizationError)
    except QuantizationError as e:
        raise QuantizationError(f"{e}; {redo}") from None
    if not (isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT
            and isinstance(data.get("settings_sha256"), str) and isinstance(data.get("parts"), dict)):
        raise QuantizationError(f"{manifest}: not a dbrxq progress manifest (or a damaged one); {redo}")
    for part, e in data["parts"].items():
        if not (isinstance(e, dict) and isinstance(e.get("file"), str) and _SHARD_FILE_RE.match(e["file"])
                and is_int(e.get("bytes")) and isinstance(e.get("sha256"), str)):
            raise QuantizationError(f"{manifest}: the entry of part {part!r:.40} is malformed (file must be a shard "
                                    f"name of this folder, bytes an integer, sha256 a string); {redo}")
    recorded = data.pop("manifest_sha256", None)
    if recorded != _content_sha256(data):
        raise QuantizationError(f"{manifest}: its content does not match the checksum it was written with "
                                f"(edited or damaged); {redo}")
    act = data.get("activations")
    if act is not None and not (isinstance(act, dict) and is_int(act.get("next_layer"))
                                and isinstance(act.get("sha256"), str)):
        raise QuantizationError(f"{manifest}: its 'activations' entry is malformed; {redo}")
    return data


def _remove_old_run(out: Path) -> None:
    """config.json FIRST (so the folder stops looking complete), then our other files only."""
    (out / "config.json").unlink(missing_ok=True)
    for name in (INDEX_NAME, MANIFEST_NAME, ACTIVATIONS_NAME, REPORT_NAME):
        (out / name).unlink(missing_ok=True)
    for p in out.iterdir():
        if _SHARD_FILE_RE.match(p.name):
            p.unlink()


def _complete_sha(out: Path) -> str | None:
    """The settings hash of a complete dbrxq checkpoint in ``out``, if it is one."""
    try:
        qc = read_json(out / "config.json", MAX_CONFIG_BYTES, folder=out).get("quantization_config") or {}
        sha = (qc.get("calibration") or {}).get("settings_sha256")
    except (DbrxqError, AttributeError):
        return None
    return sha if isinstance(sha, str) else None


def prepare_out(out: Path, src_folder: Path, settings: dict[str, Any], *, resume: bool,
                overwrite: bool, dry_run: bool = False) -> Progress | None:
    """Decide what to do with ``out``; returns the Progress to continue, or None when ``out``
    already holds this very run, complete (``resume`` only). ``dry_run``: only the checks, no
    change to ``out`` (so OUT conflicts are reported before recipe errors, and nothing is created).

    Raises:
        QuantizationError: OUT is a file or SRC itself; holds another checkpoint or run without
            --overwrite; --resume with different settings (naming them) or with nothing to resume.
    """
    if out.exists() and not out.is_dir():
        raise QuantizationError(f"output {out} exists and is not a folder")
    if out.exists() and out.resolve() == src_folder.resolve():
        raise QuantizationError(f"output {out} is the source folder; choose another OUT")
    sha = settings_sha256(settings)
    manifest = out / MANIFEST_NAME
    busy = out.is_dir() and any(out.iterdir())
    if resume and not overwrite:
        if manifest.is_file():
            data = read_manifest(manifest)
            if data["settings_sha256"] != sha:
                diff = _diff(data.get("settings"), settings)
                raise QuantizationError(f"{manifest}: --resume refused, that run used other settings: "
                                        f"{'; '.join(diff[:3]) or 'see the manifest'}; use the same options, or "
                                        f"--overwrite to start over")
            if data.get("threads") != torch.get_num_threads():
                log.warning("resuming with %d threads, the run began with %s: float rounding (and so the "
                            "bytes) may differ from an uninterrupted run", torch.get_num_threads(), data.get("threads"))
            progress = Progress(out, data)
            progress.verify()
            return progress
        if _complete_sha(out) == sha:
            log.info("%s is already complete with these settings; nothing to resume", out)
            return None
        if busy:
            raise QuantizationError(f"output {out} holds no unfinished run with these settings "
                                    f"(no {MANIFEST_NAME}); pass --overwrite to replace its contents")
    elif busy:
        if not overwrite:
            if manifest.is_file():
                raise QuantizationError(f"output {out} holds an unfinished quantize run; pass --resume to "
                                        f"continue it or --overwrite to start over")
            raise QuantizationError(f"output {out} exists and is not empty; pass --overwrite "
                                    f"(overwrite=True) to replace the checkpoint in it")
        if dry_run:
            return Progress.new(out, settings)
        _remove_old_run(out)
    if dry_run:
        return Progress.new(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    progress = Progress.new(out, settings)
    progress.save()
    return progress


def save_activations(progress: Progress, x: torch.Tensor, next_layer: int) -> None:
    """Store the activations entering ``next_layer`` (atomic; replaces the previous ones) and record
    their sha256 in the manifest, which resume checks before using them."""
    path = progress.out / ACTIVATIONS_NAME
    save_file_atomic({"x": x.detach().cpu().contiguous()}, path,
                     metadata={"next_layer": str(next_layer), "settings_sha256": progress.data["settings_sha256"]})
    progress.data["activations"] = {"next_layer": next_layer, "sha256": file_sha256(path)}
    progress.save()


def load_activations(progress: Progress, next_layer: int) -> torch.Tensor | None:
    """The stored activations entering ``next_layer`` of this run, or None (missing, stale, or not
    the bytes the manifest recorded: then they are recomputed from OUT's finished layers)."""
    path = progress.out / ACTIVATIONS_NAME
    rec = progress.data.get("activations") or {}
    if not path.is_file():
        return None
    if rec.get("next_layer") != next_layer or rec.get("sha256") != file_sha256(path):
        log.warning("%s is not the one this run recorded (damaged or stale); recomputing the activations", path)
        return None
    sha = progress.data["settings_sha256"]
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("next_layer") != str(next_layer) or meta.get("settings_sha256") != sha:
                return None
            return f.get_tensor("x")
    except Exception:  # a damaged file is just a cache miss: we can recompute
        log.warning("%s is unreadable; recomputing the activations", path)
        return None


def copy_file_atomic(src: Path, dst: Path) -> None:
    """Copy a small file via a temp name and a rename."""
    tmp = temp_path(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
