"""Random, seeded DBRX checkpoints in the hub layout, for tests and benchmarks.

:func:`make_random_checkpoint` writes ``config.json`` and every tensor of
:func:`~dbrxq.formats.checkpoint.hub_tensor_shapes` through :class:`~dbrxq.formats.shards.ShardedCheckpointWriter`,
generating rows chunk by chunk, so a real-width checkpoint (GBs) is written with a small,
constant peak RSS. Initialisation follows transformers' ``DbrxPreTrainedModel._init_weights``:
linear weights, embeddings and experts ~ normal(0, initializer_range), LayerNorm weights one.

Values depend only on (seed, tensor name, shape): every block of ``RNG_BLOCK_ELEMS`` elements
(whole rows) draws from its own generator seeded by a hash of (seed, name, block index), so the
chunk size used for writing changes nothing.

:func:`preset_config` gives the ``tiny`` and real ``dbrx`` shapes used by
``scripts/make_checkpoint.py``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dbrxq.core.errors import ConfigError
from dbrxq.core.files import write_json_atomic
from dbrxq.formats.checkpoint import hub_tensor_shapes
from dbrxq.formats.hub import copy_tokenizer_files
from dbrxq.formats.shards import (
    DEFAULT_MAX_SHARD_BYTES,
    ShardedCheckpointWriter,
    tensor_nbytes,
)
from dbrxq.model.config import DbrxConfig

logger = logging.getLogger(__name__)

# One generator per block of about this many elements (rounded to whole rows): small enough
# that chunks can be any multiple of a block, large enough that reseeding costs nothing.
RNG_BLOCK_ELEMS = 1 << 16
DEFAULT_CHUNK_BYTES = 64 * 1024**2

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for unit tests, yet every code path of the real model (GQA, clip_qkv, 16
    # experts with top-4, several layers) is exercised.
    "tiny": {
        "d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 256, "vocab_size": 512,
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 500000.0},
        "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 16, "moe_top_k": 4,
                       "moe_loss_weight": 0.05, "moe_normalize_expert_weights": 1.0},
    },
    # databricks/dbrx-base / dbrx-instruct config.json.
    "dbrx": {
        "d_model": 6144, "n_heads": 48, "n_layers": 40, "max_seq_len": 32768, "vocab_size": 100352,
        "attn_config": {"kv_n_heads": 8, "clip_qkv": 8.0, "rope_theta": 500000.0},
        "ffn_config": {"ffn_hidden_size": 10752, "moe_num_experts": 16, "moe_top_k": 4,
                       "moe_jitter_eps": 0.01, "moe_loss_weight": 0.05, "moe_normalize_expert_weights": 1.0},
        "initializer_range": 0.02, "tie_word_embeddings": False,
    },
}
# Override name -> where it lives in config.json.
_OVERRIDES = {"n_layers": (), "vocab_size": (), "d_model": (), "n_heads": (), "max_seq_len": (),
              "kv_n_heads": ("attn_config",), "ffn_hidden_size": ("ffn_config",),
              "moe_num_experts": ("ffn_config",), "moe_top_k": ("ffn_config",)}


def preset_config(name: str, **overrides: Any) -> DbrxConfig:
    """A named preset with some fields replaced.

    Args:
        name: ``"tiny"`` or ``"dbrx"``.
        **overrides: any of n_layers, vocab_size, d_model, n_heads, max_seq_len, kv_n_heads,
            ffn_hidden_size, moe_num_experts, moe_top_k; None values are ignored.

    Raises:
        ConfigError: unknown preset or override, or a resulting config that does not validate.
    """
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[name].items()}
    for key, value in overrides.items():
        if key not in _OVERRIDES:
            raise ConfigError(f"unknown preset override {key!r}; choose from {', '.join(_OVERRIDES)}")
        if value is not None:
            (d[_OVERRIDES[key][0]] if _OVERRIDES[key] else d)[key] = value
    return DbrxConfig.from_dict(d)


def block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def random_chunks(name: str, shape: tuple[int, ...], config: DbrxConfig, *, seed: int, dtype: torch.dtype,
            chunk_bytes: int):
    """Yield the rows of one tensor as (chunk of `dtype`), at most ~`chunk_bytes` of float32 each."""
    if len(shape) == 1:  # LayerNorm weights: ones, as nn.LayerNorm initialises them
        yield torch.ones(shape, dtype=dtype)
        return
    rows, cols = shape
    block_rows = max(1, RNG_BLOCK_ELEMS // cols)
    # Whole blocks per chunk; sized by the float32 buffer, the largest allocation here.
    chunk_rows = max(1, chunk_bytes // (4 * cols * block_rows)) * block_rows
    std = config.initializer_range
    pad = config.pad_token_id if name == "transformer.wte.weight" else None
    gen = torch.Generator()
    buf = torch.empty(min(chunk_rows, rows), cols, dtype=torch.float32)
    for r0 in range(0, rows, chunk_rows):
        r1 = min(rows, r0 + chunk_rows)
        out = buf[: r1 - r0]
        for b0 in range(r0, r1, block_rows):
            gen.manual_seed(block_seed(seed, name, b0 // block_rows))
            out[b0 - r0: min(r1, b0 + block_rows) - r0].normal_(0.0, std, generator=gen)
        if pad is not None and r0 <= pad < r1:  # nn.Embedding(padding_idx) zeroes that row
            out[pad - r0].zero_()
        yield out.to(dtype)


def make_random_checkpoint(out_dir: str | os.PathLike, config: DbrxConfig, *, seed: int = 0,
                           dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                           chunk_bytes: int = DEFAULT_CHUNK_BYTES, tokenizer_dir: str | os.PathLike | None = None,
                           progress: bool = True) -> Path:
    """Write a random DBRX checkpoint (hub layout, sharded safetensors) to `out_dir`.

    ``config.json`` is written last, so a folder with one holds a complete checkpoint.

    Args:
        out_dir: output folder (created if needed; files of the same names are replaced).
        config: the model's shape.
        seed: values are a function of (seed, tensor name, shape) only.
        dtype: stored dtype of every tensor.
        max_shard_bytes: shard size limit.
        chunk_bytes: float32 working memory per chunk; does not change the values.
        tokenizer_dir: copy tokenizer files (``TOKENIZER_PATTERNS``) from this folder.
        progress: show a tqdm bar (bytes).

    Returns:
        `out_dir` as a Path.

    Raises:
        CheckpointError: `tokenizer_dir` holds no tokenizer files.
    """
    out = Path(out_dir)
    shapes = hub_tensor_shapes(config)
    specs = [(name, shape, dtype) for name, shape in shapes.items()]
    total = sum(tensor_nbytes(s, dtype) for s in shapes.values())
    logger.info("writing a random %d-layer checkpoint (%.2f GB %s) to %s", config.n_layers, total / 1e9,
                dtype, out)
    with ShardedCheckpointWriter(out, specs, max_shard_bytes=max_shard_bytes,
                                 metadata={"format": "pt"}) as writer, \
            tqdm(total=total, unit="B", unit_scale=True, desc="make_checkpoint", disable=not progress) as bar:
        for name, shape in shapes.items():
            for chunk in random_chunks(name, shape, config, seed=seed, dtype=dtype, chunk_bytes=chunk_bytes):
                writer.write(name, chunk)
                bar.update(chunk.numel() * chunk.element_size())
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    d = config.to_dict()
    d["torch_dtype"] = str(dtype).removeprefix("torch.")
    write_json_atomic(d, out / "config.json")
    return out
