"""Writing safetensors checkpoints tensor by tensor, with small memory and atomic files.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once; a real-width DBRX
layer does not fit that way on our boxes. The safetensors format is simple enough to stream:

    [8 bytes: N, little-endian u64] [N bytes: JSON header, space-padded to a multiple of 8]
    [raw little-endian tensor bytes, back to back, at the header's data_offsets]

with header ``{name: {"dtype": "BF16", "shape": [...], "data_offsets": [start, end]}, ...}`` plus an
optional ``"__metadata__": {str: str}``. Since shapes and dtypes are known up front, the header is
written first and the tensors follow in row chunks.

- :class:`SafetensorsStreamWriter`: one file, streamed, written to ``PATH.tmp.*`` then renamed.
- :func:`save_file_atomic`: the same for a small in-memory dict.
- :class:`ShardedCheckpointWriter`: plans ``model-0000i-of-0000K.safetensors`` shards from the
  specs, streams tensors into them and writes ``model.safetensors.index.json``.

No file under its final name is ever incomplete: a crash or an exception leaves at most a
``*.tmp.*`` file, which readers ignore and the context managers remove.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from dbrxq.core.errors import CheckpointError
from dbrxq.core.files import fsync_dir, temp_path, write_json_atomic
from dbrxq.formats.checkpoint import INDEX_NAME, SINGLE_NAME

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.uint16: "U16",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32",
    torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}

TensorSpec = tuple[str, Sequence[int], torch.dtype]  # (name, shape, dtype)

# We write the host's bytes as they are; safetensors is little-endian.
assert sys.byteorder == "little", "dbrxq writes safetensors on little-endian hosts only"


class SafetensorsStreamWriter:
    """Stream tensors, in declared order and in row chunks, into one safetensors file.

    Use as a context manager: leaving the block normally calls :meth:`close`, leaving it by an
    exception calls :meth:`abort` (temp file removed, nothing at `path`).

    Args:
        path: final file name.
        specs: ``(name, shape, dtype)`` of every tensor, in the order they will be written.
        metadata: optional ``__metadata__`` (str -> str).
        align: the data starts at a file offset that is a multiple of this (the header is padded with
            spaces, as the format allows): 8 as safetensors writes it, or 4096 so that tensors whose
            sizes are whole pages, written first, sit on page boundaries (mapped in place, read with
            O_DIRECT).

    Raises:
        ValueError: duplicate names, unsupported dtypes, non-string metadata, an alignment that is not
            a multiple of 8.
    """

    def __init__(self, path: str | os.PathLike, specs: Sequence[TensorSpec], *,
                 metadata: dict[str, str] | None = None, align: int = 8) -> None:
        self.path = Path(path)
        self._specs = [(name, tuple(int(s) for s in shape), dtype) for name, shape, dtype in specs]
        names = [s[0] for s in self._specs]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.path}: duplicate tensor names in specs")
        header: dict[str, Any] = {}
        if metadata:
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
                raise ValueError(f"{self.path}: safetensors metadata must map str to str")
            header["__metadata__"] = dict(metadata)
        offset = 0
        self._nbytes: list[int] = []
        for name, shape, dtype in self._specs:
            if dtype not in TORCH_TO_SAFETENSORS:
                raise ValueError(f"{self.path}: tensor {name} has dtype {dtype}, which safetensors cannot store")
            n = tensor_nbytes(shape, dtype)
            header[name] = {"dtype": TORCH_TO_SAFETENSORS[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            self._nbytes.append(n)
            offset += n
        self.data_bytes = offset
        self._empty = {s[0] for s, n in zip(self._specs, self._nbytes) if n == 0}
        if align < 8 or align % 8:
            raise ValueError(f"{self.path}: align={align} is not a positive multiple of 8")
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % align)  # the data starts on a multiple of ``align``
        self._tmp = temp_path(self.path)
        self._file = open(self._tmp, "wb")
        self._file.write(len(raw).to_bytes(8, "little") + raw)
        self._current = 0  # index into specs of the tensor being written
        self._written = 0  # bytes written of that tensor
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._current < len(self._specs) and self._written == self._nbytes[self._current]:
            self._current += 1
            self._written = 0

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append the next rows of tensor `name` (the whole tensor, or a slice along dim 0).

        Raises:
            ValueError: `name` is not the tensor due next, or the chunk's dtype, trailing shape
                or size does not fit what remains of it.
        """
        if self._file is None:
            raise ValueError(f"{self.path}: write after close")
        if chunk.numel() == 0 and name in self._empty:
            return  # empty tensors are complete from the start; writing one is a no-op
        if self._current >= len(self._specs):
            raise ValueError(f"{self.path}: tensor {name} written, but every declared tensor is complete")
        want, shape, dtype = self._specs[self._current]
        if name != want:
            raise ValueError(f"{self.path}: tensor {name} written while {want} is due (write in spec order)")
        if chunk.dtype != dtype:
            raise ValueError(f"{self.path}: tensor {name} chunk has dtype {chunk.dtype}, declared {dtype}")
        if shape and tuple(chunk.shape[1:]) != shape[1:] or not shape and chunk.dim() != 0:
            raise ValueError(f"{self.path}: tensor {name} chunk has shape {list(chunk.shape)}, "
                             f"declared {list(shape)} (chunks are slices along dim 0)")
        data = chunk.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        if self._written + data.nbytes > self._nbytes[self._current]:
            raise ValueError(f"{self.path}: tensor {name} gets {self._written + data.nbytes} bytes, "
                             f"declared {self._nbytes[self._current]}")
        self._file.write(data)
        self._written += data.nbytes
        self._skip_empty()

    @property
    def done(self) -> bool:
        """Whether every declared byte has been written."""
        return self._current >= len(self._specs)

    def close(self) -> Path:
        """Check completeness, fsync and rename the temp file to `path`.

        Returns:
            The final path.

        Raises:
            CheckpointError: some declared tensor was not (completely) written; the temp file
                is removed.
        """
        if self._file is None:
            return self.path
        if not self.done:
            name = self._specs[self._current][0]
            got, want = self._written, self._nbytes[self._current]
            self.abort()
            raise CheckpointError(f"{self.path}: incomplete write, tensor {name} got {got} of {want} bytes")
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Drop the partial file; nothing is left at `path` (nor at the temp name), even when closing
        fails again (a full disk fails the flush inside close())."""
        try:
            if self._file is not None:
                f, self._file = self._file, None
                f.close()
        except OSError:
            pass
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_file_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike, *,
                     metadata: dict[str, str] | None = None, align: int = 8) -> Path:
    """Write a small dict of tensors to one safetensors file, atomically.

    Returns:
        The final path.
    """
    specs = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    with SafetensorsStreamWriter(path, specs, metadata=metadata, align=align) as w:
        for name, t in tensors.items():
            w.write(name, t)
    return Path(path)


def plan_shards(specs: Sequence[TensorSpec], *, max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Group specs, in order, into shards of at most `max_shard_bytes` (an oversized tensor alone)."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        n = tensor_nbytes(spec[1], spec[2])
        if not shards or (shards[-1] and size + n > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += n
    return shards or [[]]


class ShardedCheckpointWriter:
    """Stream a whole checkpoint into ``FOLDER/model-0000i-of-0000K.safetensors`` (+ index).

    Tensors are written with :meth:`write` in spec order, in any number of row chunks; at most
    one shard file is open at a time. :meth:`finalize` closes the last shard and writes
    ``model.safetensors.index.json`` (only when there is more than one shard; a single shard is
    named ``model.safetensors``). An exception inside a ``with`` block removes every shard this
    writer made, so no partial checkpoint is left looking complete.

    Args:
        folder: output folder (created if needed).
        specs: ``(name, shape, dtype)`` in write order.
        max_shard_bytes: shard size limit (data bytes).
        metadata: ``__metadata__`` of every shard (e.g. ``{"format": "pt"}``).
        align: where each shard's data starts (:class:`SafetensorsStreamWriter`).
    """

    def __init__(self, folder: str | os.PathLike, specs: Sequence[TensorSpec], *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, metadata: dict[str, str] | None = None,
                 align: int = 8) -> None:
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.metadata = metadata
        self.align = align
        self.shards = plan_shards(specs, max_shard_bytes=max_shard_bytes)
        k = len(self.shards)
        self.shard_names = [SINGLE_NAME] if k == 1 else \
            [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
        self.weight_map = {spec[0]: fname for fname, shard in zip(self.shard_names, self.shards) for spec in shard}
        self.total_size = sum(tensor_nbytes(s[1], s[2]) for shard in self.shards for s in shard)
        self._shard = -1
        self._writer: SafetensorsStreamWriter | None = None
        self._finished: list[Path] = []

    def _open_next(self) -> None:
        self._shard += 1
        self._writer = SafetensorsStreamWriter(self.folder / self.shard_names[self._shard],
                                               self.shards[self._shard], metadata=self.metadata,
                                               align=self.align)

    def _advance(self) -> None:
        """Close finished shards (empty tensors may finish one without a write)."""
        while self._writer is not None and self._writer.done:
            self._finished.append(self._writer.close())
            self._writer = None
            if self._shard + 1 < len(self.shards):
                self._open_next()

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append the next rows of tensor `name` (see :meth:`SafetensorsStreamWriter.write`)."""
        if self._shard < 0:
            self._open_next()
            self._advance()
        if self._writer is None:
            raise ValueError(f"{self.folder}: tensor {name} written, but every declared tensor is complete")
        self._writer.write(name, chunk)
        self._advance()

    def finalize(self) -> Path:
        """Finish the last shard and write the index.

        Returns:
            The folder.

        Raises:
            CheckpointError: some declared tensor was not completely written.
        """
        if self._shard < 0:
            self._open_next()
            self._advance()
        if self._writer is not None:
            try:
                self._writer.close()  # raises CheckpointError when incomplete
            except BaseException:
                self.abort()
                raise
            self._writer = None
        index = self.folder / INDEX_NAME
        if len(self.shards) > 1:
            write_json_atomic({"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}, index)
        elif index.exists():
            # A stale index from an earlier sharded write would shadow our model.safetensors.
            logger.warning("removing stale %s", index)
            index.unlink()
        return self.folder

    def abort(self) -> None:
        """Remove the open temp file and every shard this writer finished."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        for p in self._finished:
            p.unlink(missing_ok=True)
        self._finished.clear()

    def __enter__(self) -> ShardedCheckpointWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


def tensor_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()
