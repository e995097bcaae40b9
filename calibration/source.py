"""The float checkpoint being quantized (SRC), opened lazily: a local folder or a hub repo id.

- A local folder is read with :class:`dbrxq.formats.checkpoint.CheckpointReader`, which validates every
  shard's header before a byte of output is written.
- A hub repo id first fetches only ``config.json``, the index and the tokenizer files; the
  pipeline then calls :meth:`Source.fetch_layer` as it reaches each layer, which downloads (with
  ``hf_hub_download``, resumable, cached) only the shards holding that layer's tensors. A
  120-layer-hour job therefore starts at once and its disk fills as it goes.

:func:`open_source` also checks, from the headers/index alone, that SRC is an unquantized DBRX
checkpoint with every tensor of the hub layout, and computes SRC's identity (hashes of
config.json and of the index or weights header) for the resume manifest.
"""

from __future__ import annotations

import hashlib
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dbrxq.core.errors import CheckpointError, QuantizationError
from dbrxq.core.untrusted import MAX_CONFIG_BYTES, MAX_INDEX_BYTES, confine, read_json
from dbrxq.formats.checkpoint import (
    INDEX_NAME,
    SAFETENSORS_DTYPES,
    SINGLE_NAME,
    CheckpointReader,
    check_float_checkpoint,
    hub_tensor_shapes,
    read_config,
    read_safetensors_header,
)
from dbrxq.formats.hub import TOKENIZER_PATTERNS, resolve_model_dir
from dbrxq.model.config import DbrxConfig

log = logging.getLogger(__name__)

__all__ = ["Source", "open_source", "layer_tensor_names"]


def layer_tensor_names(config: DbrxConfig, i: int) -> list[str]:
    """Hub names of layer i's tensors, in hub order."""
    prefix = f"transformer.blocks.{i}."
    return [n for n in hub_tensor_shapes(config) if n.startswith(prefix)]


class _HubShards:
    """Reads tensors from hub shards downloaded on first use (same interface as CheckpointReader's
    get / shape / dtype / file_of / keys)."""

    def __init__(self, folder: Path, repo_id: str, revision: str | None) -> None:
        self.folder, self.repo_id, self.revision = folder, repo_id, revision
        index = folder / INDEX_NAME
        if index.is_file():
            data = read_json(index, MAX_INDEX_BYTES, folder=folder)
            wm = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise CheckpointError(f"{index} has no 'weight_map' object mapping tensor names to files")
            for name, fname in wm.items():  # names a hub download would fetch: inside the snapshot
                confine(folder, fname, f"{index}: weight_map entry for {name}")
            self._file_of = dict(wm)
        else:
            self._file_of = None  # single file: names known once it is downloaded
        self._paths: dict[str, Path] = {}
        self._headers: dict[str, dict[str, Any]] = {}
        self._handles: dict[str, Any] = {}

    def _fname(self, name: str) -> str:
        if self._file_of is None:
            return SINGLE_NAME
        if name not in self._file_of:
            raise CheckpointError(f"hub repo {self.repo_id}: tensor {name} not in {INDEX_NAME}")
        return self._file_of[name]

    def fetch(self, fname: str) -> Path:
        """Download (or find cached) one shard and validate its header."""
        if fname not in self._paths:
            from huggingface_hub import errors as hf_errors
            from huggingface_hub import hf_hub_download
            log.info("fetching %s from %s", fname, self.repo_id)
            try:
                path = Path(hf_hub_download(self.repo_id, fname, revision=self.revision))
            except hf_errors.EntryNotFoundError:
                raise CheckpointError(f"hub repo {self.repo_id}: shard {fname} (named by the index) "
                                      f"does not exist") from None
            except hf_errors.LocalEntryNotFoundError:
                raise CheckpointError(f"hub repo {self.repo_id}: shard {fname} is not in the local cache and "
                                      f"the hub cannot be reached (offline?)") from None
            except (hf_errors.HfHubHTTPError, OSError) as e:
                raise CheckpointError(f"hub repo {self.repo_id}: downloading {fname} failed "
                                      f"({type(e).__name__})") from None
            self._headers[fname] = read_safetensors_header(path)
            self._paths[fname] = path
        return self._paths[fname]

    def _info(self, name: str) -> dict[str, Any]:
        fname = self._fname(name)
        self.fetch(fname)
        if name not in self._headers[fname]:
            raise CheckpointError(f"{self._paths[fname]}: tensor {name} is not in this shard")
        return self._headers[fname][name]

    def keys(self) -> list[str]:
        if self._file_of is None:
            self.fetch(SINGLE_NAME)
            return list(self._headers[SINGLE_NAME])
        return list(self._file_of)

    def __contains__(self, name: object) -> bool:
        return name in (self._file_of if self._file_of is not None else self.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self._info(name)["dtype"]][0]

    def file_of(self, name: str) -> Path:
        self._info(name)
        return self._paths[self._fname(name)]

    def get(self, name: str, *, dtype: torch.dtype | None = None,
            expected_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        shape = self.shape(name)
        if expected_shape is not None and shape != tuple(expected_shape):
            raise CheckpointError(f"{self.file_of(name)}: tensor {name} has shape {list(shape)}, "
                                  f"expected {list(expected_shape)}")
        fname = self._fname(name)
        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self._paths[fname]), framework="pt", device="cpu")
        t = self._handles[fname].get_tensor(name)
        return t if dtype is None else t.to(dtype)

    def close(self) -> None:
        self._handles.clear()


@dataclass
class Source:
    """An opened SRC: its local folder, config, tensor reader and identity."""

    name: str
    folder: Path
    config: DbrxConfig
    reader: Any  # CheckpointReader or _HubShards
    identity: dict[str, str] = field(default_factory=dict)
    hub: bool = False

    def fetch_layer(self, i: int) -> None:
        """Make sure the shards holding layer i's tensors are local (hub: download them now)."""
        if self.hub:
            for name in layer_tensor_names(self.config, i):
                self.reader.fetch(self.reader._fname(name))

    def float_dtypes(self) -> dict[str, torch.dtype]:
        """Stored dtype of every hub tensor; on the hub, before any download, config.json's
        torch_dtype (bf16 if absent) for all of them."""
        names = hub_tensor_shapes(self.config)
        if not self.hub:
            return {n: self.reader.dtype(n) for n in names}
        stored = read_json(self.folder / "config.json", MAX_CONFIG_BYTES, folder=self.folder).get("torch_dtype")
        dt = {"float32": torch.float32, "float16": torch.float16}.get(stored, torch.bfloat16)
        return dict.fromkeys(names, dt)

    def close(self) -> None:
        self.reader.close()


def _sha256_file(path: Path, limit: int | None = None) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read() if limit is None else f.read(limit)).hexdigest()


def _identity(folder: Path, hub_commit: str | None) -> dict[str, str]:
    """Hashes of config.json and of the index (or of the single file's header): what SRC is."""
    ident = {"config_sha256": _sha256_file(folder / "config.json")}
    if (folder / INDEX_NAME).is_file():
        ident["index_sha256"] = _sha256_file(folder / INDEX_NAME)
    elif (folder / SINGLE_NAME).is_file():
        with open(folder / SINGLE_NAME, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        ident["header_sha256"] = _sha256_file(folder / SINGLE_NAME, 8 + n)
    elif hub_commit:
        ident["hub_commit"] = hub_commit
    return ident


def open_source(src: str, *, revision: str | None = None) -> Source:
    """Open SRC (folder or hub repo id) for the streaming pipeline.

    Raises:
        CheckpointError / ConfigError: no config.json, not a DBRX config, missing tensors or shards.
        QuantizationError: SRC is already quantized.
    """
    local = Path(src).expanduser().is_dir()
    if local:
        folder = Path(src).expanduser()
    else:
        # Metadata first; shards come layer by layer (Source.fetch_layer).
        folder = resolve_model_dir(src, revision=revision,
                                   allow_patterns=["config.json", INDEX_NAME, *TOKENIZER_PATTERNS, "*.tiktoken.json"])
    config = read_config(folder)
    if config.quantization_config is not None:
        raise QuantizationError(f"{folder}: already quantized (config.json has a quantization_config); "
                                f"quantize a float checkpoint")
    reader = CheckpointReader(folder) if local else _HubShards(folder, str(src), revision)
    check_float_checkpoint(reader, config, str(folder), headers=local)
    ident = _identity(folder, None if local else folder.name)
    return Source(str(src), folder, config, reader, ident, hub=not local)
