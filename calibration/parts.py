"""The calibrated checkpoint's parts: one shard per part (embedding, each layer, head) written
atomically and recorded in the manifest; then the index and config.json, last.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from calibration.options import Run
from calibration.progress import copy_file_atomic
from dbrxq.core.files import write_json_atomic
from dbrxq.core.untrusted import check_finite
from dbrxq.formats.checkpoint import INDEX_NAME, hub_tensor_shapes
from dbrxq.formats.hub import tokenizer_files
from dbrxq.formats.shards import TensorSpec, save_file_atomic, tensor_nbytes
from quantize.blocks import PAGE
from quantize.config import QuantConfig
from quantize.layout import to_blocks
from quantize.primitives import quantize_tensor
from quantize.specs import quantized_tensor_specs


def part_of(name: str) -> str:
    if name.startswith("transformer.blocks."):
        return f"layer.{int(name.split('.')[2])}"
    return "embed" if name == "transformer.wte.weight" else "head"


def plan_parts(config, qconfig: QuantConfig, float_dtype) -> tuple[dict, dict]:
    specs: dict[str, list[TensorSpec]] = {}
    for spec in quantized_tensor_specs(config, qconfig, float_dtype=float_dtype):
        specs.setdefault(part_of(spec[0]), []).append(spec)
    parts = ["embed", *(f"layer.{i}" for i in range(config.n_layers)), "head"]
    k = len(parts)
    return specs, {p: f"model-{j + 1:05d}-of-{k:05d}.safetensors" for j, p in enumerate(parts)}


def write_part(run: Run, part: str, produced: dict[str, torch.Tensor], **extra: Any) -> None:
    """Write one part's tensors, in spec order, as its own shard (atomically); record it. ``produced``
    holds canonical tensors; in the blocks layout they are packed for the kernel here (and the shard's
    data starts on a page, its ``qblocks`` first)."""
    blocks = run.qconfig.layout == "blocks"
    if blocks:
        produced = to_blocks(produced, run.config, run.qconfig)
    assert set(produced) == {n for n, _, _ in run.specs[part]}, (part, sorted(produced), run.specs[part])
    tensors = {}
    for name, shape, dtype in run.specs[part]:
        t = produced[name]
        assert tuple(t.shape) == tuple(shape) and t.dtype == dtype, (name, tuple(t.shape), shape, t.dtype, dtype)
        tensors[name] = t.contiguous()
    path = run.out / run.shard[part]
    save_file_atomic(tensors, path, metadata={"format": "pt"}, align=PAGE if blocks else 8)
    run.progress.record(part, path, **extra)


def write_head(run: Run) -> None:
    produced = {}
    for name in ("transformer.norm_f.weight", "lm_head.weight"):
        if name not in hub_tensor_shapes(run.config):
            continue
        w = check_finite(run.source.reader.get(name, expected_shape=hub_tensor_shapes(run.config)[name]), name,
                         run.source.reader.file_of(name))
        mq = run.qconfig.lm_head
        if name == "lm_head.weight" and mq.quantized:  # RTN: no calibration for the head
            produced.update(quantize_tensor(w.float(), mq.bits, mq.group_size, mq.symmetric).tensors(name))
        else:
            produced[name] = w
    write_part(run, "head", produced)


def write_index_and_config(run: Run, calib: dict) -> dict:
    """Tokenizer files, index, config.json LAST. Returns the quantization_config written."""
    for p in tokenizer_files(run.source.folder):
        copy_file_atomic(p, run.out / p.name)
    # Parts are in hub order (embedding, blocks, norm_f/lm_head), and so is each part's spec list.
    weight_map = {name: run.shard[part] for part in run.shard for name, _, _ in run.specs[part]}
    total = sum(tensor_nbytes(s, d) for specs in run.specs.values() for _, s, d in specs)
    write_json_atomic({"metadata": {"total_size": total}, "weight_map": weight_map}, run.out / INDEX_NAME)
    qc = dataclasses.replace(run.qconfig, calibration=calib).to_dict()
    d = run.source.config.to_dict()
    d["quantization_config"] = qc
    write_json_atomic(d, run.out / "config.json")
    return qc
