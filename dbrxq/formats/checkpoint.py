"""Reading DBRX checkpoints: a local folder or a hub repo id, sharded or not, lazily.

- :func:`resolve_model_dir` turns a folder or a hub repo id into a local folder (hub repos go
  through ``huggingface_hub.snapshot_download``, restricted to the files we need, and work
  offline from the cache).
- :class:`CheckpointReader` validates a folder of safetensors up front from the headers alone
  (index, missing/truncated/non-safetensors shards, tensors missing from their shard) and then
  reads one tensor, or a slice of one, at a time from memory-mapped shards.
- :func:`hub_tensor_shapes` lists every tensor of the hub layout (transformers'
  ``modeling_dbrx.py``) with its shape, in the hub's order.

Every failure a user can cause raises :class:`~dbrxq.core.errors.CheckpointError` with one line naming
the file (and tensor) at fault.
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

from dbrxq.core.errors import CheckpointError
from dbrxq.core.untrusted import (
    MAX_INDEX_BYTES,
    confine,
    inside,
    is_int,
    parse_json,
    read_json,
)
from dbrxq.model.config import DbrxConfig

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# safetensors dtype string -> (torch dtype, bits per element). Bits let us check data_offsets.
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 8), "U8": (torch.uint8, 8), "I8": (torch.int8, 8),
    "I16": (torch.int16, 16), "U16": (torch.uint16, 16), "F16": (torch.float16, 16),
    "BF16": (torch.bfloat16, 16), "I32": (torch.int32, 32), "U32": (torch.uint32, 32),
    "F32": (torch.float32, 32), "F64": (torch.float64, 64), "I64": (torch.int64, 64),
    "U64": (torch.uint64, 64), "F8_E4M3": (torch.float8_e4m3fn, 8), "F8_E5M2": (torch.float8_e5m2, 8),
}
# safetensors refuses headers above 100 MB; a larger length field means the file is not one.
_MAX_HEADER_BYTES = 100_000_000
_SHARD_NAME_RE = re.compile(r"-(\d{5})-of-(\d{5})\.safetensors$")


def read_config(folder: str | os.PathLike) -> DbrxConfig:
    """Read ``FOLDER/config.json``.

    Raises:
        CheckpointError: config.json missing.
        ConfigError: it is there but unusable.
    """
    path = Path(folder) / "config.json"
    if not (path.exists() or path.is_symlink()):
        raise CheckpointError(f"{folder}: no config.json in this folder")
    return DbrxConfig.from_json(path)  # a link, a FIFO or a device there is refused by dbrxq.core.untrusted


# -- header validation ------------------------------------------------------------------
def read_safetensors_header(path: Path, *, folder: Path | None = None) -> dict[str, dict[str, Any]]:
    """Parse and check one safetensors file's header, reading no tensor data.

    The header is untrusted JSON (dbrxq.core.untrusted): nesting, repeated names and every field's
    type are checked; dtypes must be ones dbrxq reads; offsets must tile the data exactly.
    With ``folder``, the file must resolve inside it.

    Returns:
        ``{tensor name: {"dtype", "shape", "data_offsets"}}`` (``__metadata__`` removed).

    Raises:
        CheckpointError: not a safetensors file, an inconsistent header, or a truncated file.
    """
    if folder is not None:
        inside(folder, path, str(path))
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is not a safetensors file ({size} bytes, too short for a header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER_BYTES or n > size - 8:
                raise CheckpointError(f"{path} is not a safetensors file (header length field {n} does not fit "
                                      f"in its {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    header = parse_json(raw, f"{path} (safetensors header)",
                        not_json=f"{path} is not a safetensors file (its header is not JSON)")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    spans = []
    for name, info in header.items():
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
              and all(is_int(d) and d >= 0 for d in info["shape"]) and isinstance(info.get("data_offsets"), list)
              and len(info["data_offsets"]) == 2 and all(is_int(o) for o in info["data_offsets"]))
        if not ok:
            raise CheckpointError(f"{path}: tensor {name} has a malformed header entry (want dtype: string, "
                                  f"shape: list of non-negative integers, data_offsets: two integers)")
        dtype, shape, (start, stop) = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype!r:.20}, which dbrxq cannot read")
        numel = math.prod(shape)
        if not 0 <= start <= stop or stop - start != numel * SAFETENSORS_DTYPES[dtype][1] // 8:
            raise CheckpointError(f"{path}: tensor {name} has data_offsets {[start, stop]} that do not fit "
                                  f"its shape {list(shape)} and dtype {dtype}")
        spans.append((start, stop, name))
    spans.sort()
    for (_, prev_stop, prev), (start, _, name) in zip(spans, spans[1:]):
        if start < prev_stop:
            raise CheckpointError(f"{path}: tensors {prev} and {name} overlap in the file; refused")
    end = spans[-1][1] if spans else 0
    expected = 8 + n + end
    if size < expected:
        raise CheckpointError(f"{path} is truncated: expected {expected} bytes, found {size}")
    if size > expected:
        raise CheckpointError(f"{path} is corrupt: expected {expected} bytes, found {size} (trailing data)")
    return header


def _find_weight_files(folder: Path) -> tuple[dict[str, str], Path | None]:
    """Return ({tensor: file name} from the index, or {} for a single file, index path or None).

    Every file name in the index must name a file inside ``folder`` (dbrxq.core.untrusted.confine)."""
    index = folder / INDEX_NAME
    if index.exists() or index.is_symlink():
        data = read_json(index, MAX_INDEX_BYTES, folder=folder)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has no 'weight_map' object mapping tensor names to files")
        for name, fname in weight_map.items():
            confine(folder, fname, f"{index}: weight_map entry for {name}")
        return weight_map, index
    if (folder / SINGLE_NAME).is_file():
        inside(folder, folder / SINGLE_NAME, str(folder / SINGLE_NAME))
        return {}, None
    files = sorted(p.name for p in folder.glob("*.safetensors") if p.is_file())
    if not files:
        raise CheckpointError(f"{folder}: no safetensors checkpoint found (expected {INDEX_NAME} "
                              f"or {SINGLE_NAME})")
    m = _SHARD_NAME_RE.search(files[0])
    if len(files) > 1 or (m and int(m.group(2)) > 1):
        raise CheckpointError(f"{folder}: shard files ({files[0]}, ...) but no {INDEX_NAME}; the checkpoint "
                              f"is incomplete")
    inside(folder, folder / files[0], str(folder / files[0]))
    return {}, None


# -- the reader ---------------------------------------------------------------------------
class CheckpointReader:
    """Lazy, validated access to the tensors of a safetensors checkpoint folder.

    Construction reads the index and every shard's header (never tensor data) and fails with a
    one-line :class:`CheckpointError` on any inconsistency. Shards are opened with
    ``safe_open`` on first use (memory-mapped, at most one handle per shard) and closed by
    :meth:`close` or on leaving a ``with`` block.

    Args:
        folder: the checkpoint folder (see :func:`resolve_model_dir` for hub repos).

    Raises:
        CheckpointError: see :func:`read_safetensors_header` and :func:`_find_weight_files`.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder} is not a folder")
        weight_map, index = _find_weight_files(self.folder)
        self.index_path = index
        self._handles: dict[str, Any] = {}
        self._headers: dict[str, dict[str, dict[str, Any]]] = {}
        if index is None:
            single = self.folder / SINGLE_NAME
            if not single.is_file():
                single = next(p for p in self.folder.glob("*.safetensors") if p.is_file())
            self._headers[single.name] = read_safetensors_header(single, folder=self.folder)
            self._file_of = {name: single.name for name in self._headers[single.name]}
            return
        for fname in dict.fromkeys(weight_map.values()):
            path = self.folder / fname
            if not path.is_file():
                raise CheckpointError(f"{index} names {fname}, which does not exist in {self.folder}")
            self._headers[fname] = read_safetensors_header(path, folder=self.folder)
        for name, fname in weight_map.items():
            if name not in self._headers[fname]:
                raise CheckpointError(f"{self.folder / fname}: tensor {name} is not in this shard although "
                                      f"{INDEX_NAME} maps it there")
        for fname, header in self._headers.items():  # each tensor in exactly one shard
            for name in header:
                if weight_map.get(name, fname) != fname:
                    raise CheckpointError(f"{self.folder}: tensor {name} is in two shards ({fname} and "
                                          f"{weight_map[name]}); refused (which one would count?)")
        self._file_of = dict(weight_map)

    # -- metadata (headers only) --
    def keys(self) -> list[str]:
        """Tensor names, in index (or header) order."""
        return list(self._file_of)

    def __contains__(self, name: object) -> bool:
        return name in self._file_of

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def _info(self, name: str) -> dict[str, Any]:
        if name not in self._file_of:
            raise CheckpointError(f"{self.folder}: tensor {name} not found in the checkpoint")
        return self._headers[self._file_of[name]][name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self._info(name)["dtype"]
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.file_of(name)}: tensor {name} has dtype {code}, which dbrxq cannot read")
        return SAFETENSORS_DTYPES[code][0]

    def file_of(self, name: str) -> Path:
        """The shard holding `name`."""
        self._info(name)
        return self.folder / self._file_of[name]

    def data_offset(self, name: str) -> int:
        """Where tensor `name`'s bytes start in :meth:`file_of`: 8 + the header's length + its offset."""
        path = self.file_of(name)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n + int(self._info(name)["data_offsets"][0])

    # -- data --
    def _handle(self, name: str) -> Any:
        fname = self._file_of[name]
        if fname not in self._handles:
            try:
                self._handles[fname] = safe_open(str(self.folder / fname), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own SafetensorError; report it as ours
                raise CheckpointError(f"{self.folder / fname}: cannot open ({e})") from None
        return self._handles[fname]

    def get(self, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
            expected_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read one tensor.

        Args:
            name: tensor name.
            device: where to put it.
            dtype: convert to this dtype (default: keep the stored one).
            expected_shape: fail unless the stored shape is this (checked before reading).

        Returns:
            The tensor (a fresh copy; the shard stays memory-mapped, not resident).

        Raises:
            CheckpointError: tensor missing, or of another shape than `expected_shape`.
        """
        self._check_shape(name, expected_shape)
        t = self._handle(name).get_tensor(name)
        if dtype is not None or torch.device(device) != t.device:
            t = t.to(device=device, dtype=dtype)
        return t

    def get_slice(self, name: str, *, expected_shape: tuple[int, ...] | None = None) -> Any:
        """A safetensors slice: index it (``s[a:b]``) to read only those rows, e.g. one expert's.

        Raises:
            CheckpointError: tensor missing, or of another shape than `expected_shape`.
        """
        self._check_shape(name, expected_shape)
        return self._handle(name).get_slice(name)

    def _check_shape(self, name: str, expected: tuple[int, ...] | None) -> None:
        shape = self.shape(name)
        if expected is not None and shape != tuple(expected):
            raise CheckpointError(f"{self.file_of(name)}: tensor {name} has shape {list(shape)}, "
                                  f"expected {list(expected)}")

    def close(self) -> None:
        """Drop every shard handle (and with it the memory maps)."""
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.folder)!r}, {len(self)} tensors in {len(self._headers)} file(s))"


# -- the hub layout -------------------------------------------------------------------------
def hub_tensor_shapes(config: DbrxConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a DBRX checkpoint in the hub layout, with its shape, in the hub's order.

    Follows transformers' ``modeling_dbrx.py``: LayerNorms have no bias, the three fused expert
    tensors carry no ``.weight`` suffix, and ``lm_head.weight`` is absent when embeddings are tied.
    """
    d, v = config.d_model, config.vocab_size
    ef = config.num_experts * config.ffn_hidden_size
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (v, d)}
    for i in range(config.n_layers):
        b = f"transformer.blocks.{i}"
        shapes[f"{b}.norm_attn_norm.norm_1.weight"] = (d,)
        shapes[f"{b}.norm_attn_norm.attn.Wqkv.weight"] = (config.qkv_out_features, d)
        shapes[f"{b}.norm_attn_norm.attn.out_proj.weight"] = (d, d)
        shapes[f"{b}.norm_attn_norm.norm_2.weight"] = (d,)
        shapes[f"{b}.ffn.router.layer.weight"] = (config.num_experts, d)
        for w in ("w1", "v1", "w2"):
            shapes[f"{b}.ffn.experts.mlp.{w}"] = (ef, d)
    shapes["transformer.norm_f.weight"] = (d,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


__all__ = ["CheckpointReader", "read_config", "read_safetensors_header", "hub_tensor_shapes", "check_checkpoint",
           "check_float_checkpoint", "checkpoint_float_dtype", "float_specs", "INDEX_NAME", "SINGLE_NAME", "SAFETENSORS_DTYPES"]


def _layers_hint(reader: Any, config: DbrxConfig) -> str:
    blocks = {m.group(1) for m in map(re.compile(r"transformer\.blocks\.(\d+)\.").match, reader.keys()) if m}
    present = len(blocks)
    return (f" (config.json says n_layers {config.n_layers}; the checkpoint holds {present} blocks)"
            if present < config.n_layers else "")


def float_specs(config: DbrxConfig) -> list[tuple[str, tuple[int, ...], None]]:
    """What :func:`check_checkpoint` expects of a float checkpoint: every hub tensor, any float dtype."""
    return [(n, s, None) for n, s in hub_tensor_shapes(config).items()]


def check_checkpoint(reader: Any, config: DbrxConfig, where: str | os.PathLike,
                     specs: list[tuple[str, tuple[int, ...], torch.dtype | None]]) -> None:
    """Before anything is built or allocated: every tensor of ``specs`` (name, shape, dtype; None for
    "a float dtype") is in ``reader`` exactly once, with its shape and a dtype that fits. The caller
    says what the config implies (:func:`float_specs`, or quantize.specs.expected_tensors for a
    dbrxq-quantized checkpoint). Headers were checked against the files' sizes, so a config that
    implies more bytes than the files hold fails here, at once.

    Raises:
        CheckpointError: naming the first tensor missing, misshapen or of the wrong dtype.
    """
    missing = [n for n, _, _ in specs if n not in reader]
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} tensor(s) that config.json implies are not in the "
                              f"checkpoint, e.g. {missing[0]}{_layers_hint(reader, config)}")
    for name, shape, dtype in specs:
        if reader.shape(name) != tuple(shape):
            raise CheckpointError(f"{reader.file_of(name)}: tensor {name} has shape {list(reader.shape(name))}, "
                                  f"expected {list(shape)}")
        have = reader.dtype(name)
        if (dtype is None and not have.is_floating_point) or (dtype is not None and have != dtype):
            raise CheckpointError(f"{reader.file_of(name)}: tensor {name} has dtype {have}, expected "
                                  f"{dtype or 'a float dtype'}")


def check_float_checkpoint(reader: Any, config: DbrxConfig, where: str | os.PathLike, *,
                           headers: bool = True) -> None:
    """Before a quantizer writes a byte: every hub tensor of ``config`` is in ``reader``; with
    ``headers`` (the shard headers are local) also with its shape and a float dtype.

    Raises:
        CheckpointError: naming the tensor (and its file) that is missing, misshapen or not float.
    """
    for name, shape in hub_tensor_shapes(config).items():
        if name not in reader:
            raise CheckpointError(f"{where}: tensor {name} not found in the checkpoint{_layers_hint(reader, config)}")
        if not headers:
            continue
        if reader.shape(name) != tuple(shape):
            raise CheckpointError(f"{reader.file_of(name)}: tensor {name} has shape {list(reader.shape(name))}, "
                                  f"expected {list(shape)}")
        if not reader.dtype(name).is_floating_point:
            raise CheckpointError(f"{reader.file_of(name)}: tensor {name} has dtype {reader.dtype(name)}; "
                                  f"expected a float checkpoint")


# Quantized buffers have exactly the dtype the format fixes (quantize/format.py): never converted.
EXACT_DTYPE_SUFFIXES = (".qweight", ".scales", ".qzeros", ".qblocks")


def checkpoint_float_dtype(reader: CheckpointReader) -> torch.dtype:
    """The dtype the checkpoint stores its float weights in: the embedding's (always float)."""
    if "transformer.wte.weight" in reader:
        return reader.dtype("transformer.wte.weight")
    for name in reader.keys():
        dt = reader.dtype(name)
        if dt.is_floating_point and not name.endswith(EXACT_DTYPE_SUFFIXES):
            return dt
    return torch.float32
