"""Writing a quantized checkpoint: ``quantize_checkpoint(SRC, OUT, qconfig)`` (RTN), streamed.

The output is the layout of :mod:`quantize.format` (and docs/format.md). Canonical: the hub's tensors in
the hub's order, each quantized weight replaced by ``<name>.qweight``, ``.scales`` (``.qzeros``).
Blocks (the default): each quantized weight one ``<name>.qblocks`` in the CPU kernel's layout, a
layer's experts one ``[E, stride]`` tensor of slot images (quantize.blocks), these first in each shard
and page-aligned. Unquantized tensors are copied byte for byte in their stored dtype, then tokenizer
files, then
``config.json`` (SRC's config plus ``quantization_config``) LAST, atomically. A folder with a
config.json is therefore complete; a failure at any point leaves none (the shards written so far
are removed by :class:`~dbrxq.formats.shards.ShardedCheckpointWriter`).

Memory is bounded by one row chunk of one source tensor (``chunk_bytes`` of float32, 64 MiB by
default) plus one expert's codes and one tensor's scales, whatever the model size: rows are
quantized independently (groups run along a row), so chunking changes no byte. Codes equal those
of :func:`quantize.modules.quantize_model_rtn` on the same float weights.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
import time
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from dbrxq.core.errors import QuantizationError
from dbrxq.core.files import (
    check_disk_space,
    is_write_error,
    remove_stale_temps,
    write_error,
    write_json_atomic,
)
from dbrxq.core.untrusted import check_finite
from dbrxq.formats.checkpoint import (
    INDEX_NAME,
    CheckpointReader,
    check_float_checkpoint,
    hub_tensor_shapes,
    read_config,
)
from dbrxq.formats.hub import copy_tokenizer_files, resolve_model_dir, tokenizer_files
from dbrxq.formats.shards import (
    DEFAULT_MAX_SHARD_BYTES,
    ShardedCheckpointWriter,
    tensor_nbytes,
)
from dbrxq.model.config import DbrxConfig
from dbrxq.text.tokenizer import DbrxTokenizer
from quantize.blocks import BLOCKS, PAGE, pack
from quantize.config import ModuleQuant, QuantConfig
from quantize.format import QWEIGHT, QZEROS, SCALES
from quantize.primitives import QuantizedTensor
from quantize.rtn import EXPERT_KINDS, quantize_rtn
from quantize.specs import (
    expert_slot,
    logical_shape,
    module_kind,
    quantized_plan,
    quantized_tensor_specs,
    resolve_layout,
)

log = logging.getLogger(__name__)

__all__ = ["quantize_checkpoint", "quantized_tensor_specs", "module_kind", "checkpoint_size"]

DEFAULT_CHUNK_BYTES = 64 * 1024**2
_SHARD_FILE_RE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


# --------------------------------------------------------------------------------------------
# Streaming one tensor
# --------------------------------------------------------------------------------------------
def _row_blocks(rows: int, cols: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    step = max(1, chunk_bytes // (4 * max(cols, 1)))  # sized by the float32 working copy
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _canonical_rows(sl, name: str, config: DbrxConfig, e: int | None, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of the canonical (out, in) matrix (of expert e), read from the hub slice."""
    if e is None:
        return sl[r0:r1]
    f = config.ffn_hidden_size
    if name.endswith(".w2"):  # canonical w2[e] = hub[e*F:(e+1)*F, :].T  -> rows are hub columns
        return sl[e * f:(e + 1) * f, r0:r1].t()
    return sl[e * f + r0:e * f + r1]


def _write_quantized(writer: ShardedCheckpointWriter, reader: CheckpointReader, name: str,
                     hub_shape: tuple, mq: ModuleQuant, config: DbrxConfig, chunk_bytes: int, bar) -> None:
    """RTN-quantize hub tensor ``name`` in row chunks (per expert for experts) and write its
    qweight as it goes, then its scales (and zeros), which are small, in one piece each."""
    kind = module_kind(name)
    *lead, n, k = logical_shape(name, hub_shape, kind, config)
    base = name.removesuffix(".weight")
    sl = reader.get_slice(name, expected_shape=hub_shape)
    scales, zeros = [], []
    for e in (range(lead[0]) if lead else [None]):
        codes = []  # one expert's (or the whole matrix's) qweight rows: written whole along dim 0
        for r0, r1 in _row_blocks(n, k, chunk_bytes):
            w = check_finite(_canonical_rows(sl, name, config, e, r0, r1), name, reader.file_of(name))  # [r, K]
            qt = quantize_rtn(w, mq.bits, mq.group_size, mq.symmetric)
            codes.append(qt.qweight)
            scales.append(qt.scales)
            zeros.append(qt.qzeros)
            bar.update(w.numel() * w.element_size())
        q = torch.cat(codes)
        writer.write(f"{base}.{QWEIGHT}", q if e is None else q[None])
    lead_shape = (*lead, n, -1)
    writer.write(f"{base}.{SCALES}", torch.cat(scales).reshape(lead_shape))
    if not mq.symmetric:
        writer.write(f"{base}.{QZEROS}", torch.cat(zeros).reshape(lead_shape))


def _rtn_weight(reader: CheckpointReader, name: str, hub_shape: tuple, mq: ModuleQuant, config: DbrxConfig,
                e: int | None, chunk_bytes: int, bar) -> QuantizedTensor:
    """The RTN-quantized canonical weight of hub tensor ``name`` (expert ``e`` of it), in row chunks."""
    kind = module_kind(name)
    *_, n, k = logical_shape(name, hub_shape, kind, config)
    sl = reader.get_slice(name, expected_shape=hub_shape)
    parts = []
    for r0, r1 in _row_blocks(n, k, chunk_bytes):
        w = check_finite(_canonical_rows(sl, name, config, e, r0, r1), name, reader.file_of(name))  # [r, K]
        parts.append(quantize_rtn(w, mq.bits, mq.group_size, mq.symmetric))
        bar.update(w.numel() * w.element_size())
    z = None if mq.symmetric else torch.cat([q.qzeros for q in parts])
    return QuantizedTensor(torch.cat([q.qweight for q in parts]), torch.cat([q.scales for q in parts]), z,
                           mq.bits, mq.group_size, (n, k))


def _write_blocks(writer: ShardedCheckpointWriter, reader: CheckpointReader, spec, config: DbrxConfig,
                  qconfig: QuantConfig, chunk_bytes: int, bar) -> None:
    """One ``qblocks`` tensor of the blocks layout: a weight's blocks, or a layer's experts, one slot
    image per expert (w1, v1 and w2 of expert e read, quantized and packed together)."""
    name, shape, _ = spec
    base = name.removesuffix(f".{BLOCKS}")
    hub = hub_tensor_shapes(config)
    if base.endswith(".ffn.experts.mlp"):
        slot = expert_slot(config, qconfig.experts)
        for e in range(config.num_experts):
            qts = [_rtn_weight(reader, f"{base}.{k}", hub[f"{base}.{k}"], qconfig.experts, config, e, chunk_bytes,
                               bar) for k in EXPERT_KINDS]
            writer.write(name, slot.pack(*qts)[None])
            reader.close()  # unmap what this expert touched
        return
    weight = f"{base}.weight"
    qt = _rtn_weight(reader, weight, hub[weight], qconfig.for_kind(module_kind(weight)), config, None,
                     chunk_bytes, bar)
    out = torch.zeros(shape[0], dtype=torch.uint8)
    b = pack(qt)
    out[: b.numel()] = b
    writer.write(name, out)


def _copy(writer: ShardedCheckpointWriter, reader: CheckpointReader, name: str, hub_shape: tuple,
          chunk_bytes: int, bar) -> None:
    sl = reader.get_slice(name, expected_shape=hub_shape)
    if len(hub_shape) != 2:
        t = check_finite(reader.get(name), name, reader.file_of(name))
        writer.write(name, t)
        bar.update(t.numel() * t.element_size())
        return
    for r0, r1 in _row_blocks(hub_shape[0], hub_shape[1], chunk_bytes):
        t = check_finite(sl[r0:r1], name, reader.file_of(name))
        writer.write(name, t)
        bar.update(t.numel() * t.element_size())


# --------------------------------------------------------------------------------------------
# The whole checkpoint
# --------------------------------------------------------------------------------------------
def _check_out(src: Path, out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise QuantizationError(f"output {out} exists and is not a folder")
    if out.exists() and out.resolve() == src.resolve():
        raise QuantizationError(f"output {out} is the source folder; choose another OUT")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise QuantizationError(f"output {out} exists and is not empty; pass --overwrite "
                                f"(overwrite=True) to replace the checkpoint in it")


def _remove_old_checkpoint(out: Path) -> None:
    """Delete config.json FIRST, then the index and shards of an earlier run in ``out`` (only
    those names; anything else the user keeps there stays)."""
    (out / "config.json").unlink(missing_ok=True)
    (out / INDEX_NAME).unlink(missing_ok=True)
    for p in out.iterdir():
        if _SHARD_FILE_RE.match(p.name):
            p.unlink()


VOCAB_PATTERNS = ("tokenizer.json", "*.tiktoken", "*.tiktoken.json")  # the files a vocabulary is read from


def check_source_tokenizer(src: Path) -> bool:
    """Before a quantizer writes anything: SRC's tokenizer files (if it has any) are confined, bounded
    and, when they include a vocabulary, load as a tokenizer, so OUT never carries a broken or foreign
    one. False when SRC has no vocabulary (RTN needs none: a weights-only checkpoint is quantized,
    its other tokenizer files such as generation_config.json copied, and OUT said to need one)."""
    files = tokenizer_files(src)
    if not any(fnmatch.fnmatch(p.name, pat) for p in files for pat in VOCAB_PATTERNS):
        return False
    DbrxTokenizer.from_pretrained(src)
    return True


def _copy_tokenizer(src: Path, out: Path, present: bool) -> None:
    if tokenizer_files(src):
        copy_tokenizer_files(src, out)
    if not present:
        log.warning("%s has no tokenizer vocabulary (%s); %s will need one to generate text", src,
                    ", ".join(VOCAB_PATTERNS), out)


def checkpoint_size(folder: str | os.PathLike) -> tuple[int, int]:
    """``(number of tensors, tensor bytes)`` of a safetensors checkpoint folder (headers only)."""
    with CheckpointReader(folder) as r:
        return len(r), sum(tensor_nbytes(r.shape(n), r.dtype(n)) for n in r.keys())


def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, qconfig: QuantConfig, *,
                        overwrite: bool = False, progress: bool = True, revision: str | None = None,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                        chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Path:
    """RTN-quantize the float DBRX checkpoint ``src`` into the folder ``out``.

    Args:
        src: a local folder or a hub repo id (downloaded via dbrxq.formats.hub.resolve_model_dir).
        out: output folder; created if needed. config.json is written last.
        qconfig: the recipe; its ``method`` must be "rtn" (GPTQ goes through calibration).
        overwrite: replace a checkpoint in a non-empty ``out``; its config.json is removed first,
            so a failed run never leaves an old-looking-complete folder.
        progress: tqdm bar over the source bytes.
        max_shard_bytes: shard size limit; chunk_bytes: float32 working memory per row chunk.
    Returns:
        ``out`` as a Path.
    Raises:
        QuantizationError: unsupported recipe for this model, an already quantized source, or an
            existing non-empty ``out`` without ``overwrite``.
        CheckpointError / ConfigError: unreadable or incomplete source.
    """
    if qconfig.method != "rtn":
        raise QuantizationError(f"method={qconfig.method!r}: quantize_checkpoint writes rtn only")
    qconfig.check_writable()
    if qconfig.expert_mix is not None:  # chosen from calibration data: the calibration pipeline writes them
        raise QuantizationError("per-expert recipes (expert_mix) are written by calibration.pipeline."
                                "quantize_with_calibration (`dbrxq quantize --target-bits/--target-size`)")
    t0 = time.perf_counter()
    src_dir = resolve_model_dir(src, revision=revision)
    out = Path(out)
    config = read_config(src_dir)
    if config.quantization_config is not None:
        raise QuantizationError(f"{src_dir}: already quantized (config.json has a quantization_config); "
                                f"quantize a float checkpoint")
    remove_stale_temps(out)  # temp shards of killed runs, before OUT's emptiness is judged
    _check_out(src_dir, out, overwrite)
    qconfig = resolve_layout(config, qconfig)
    with CheckpointReader(src_dir) as reader:
        check_float_checkpoint(reader, config, src_dir)
        has_tokenizer = check_source_tokenizer(src_dir)
        plan = list(quantized_plan(config, qconfig))
        specs = quantized_tensor_specs(config, qconfig, float_dtype={n: reader.dtype(n) for n in reader.keys()})
        total = sum(tensor_nbytes(shape, reader.dtype(name)) for name, shape, _ in plan)
        need = sum(tensor_nbytes(shape, dtype) for _, shape, dtype in specs)
        try:
            _write_rtn(src_dir, out, reader, config, qconfig, plan, specs, total, need, has_tokenizer,
                       max_shard_bytes, chunk_bytes, progress)
        except OSError as e:
            if is_write_error(e):
                raise write_error(e, out, need) from None
            raise
    log.info("wrote %s in %.1fs", out, time.perf_counter() - t0)
    return out


def _write_rtn(src_dir, out, reader, config, qconfig, plan, specs, total, need, has_tokenizer, max_shard_bytes,
               chunk_bytes, progress) -> None:
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        check_disk_space(out, need)
    except QuantizationError:
        if created:
            out.rmdir()  # a failed up-front check leaves nothing behind
        raise
    _remove_old_checkpoint(out)  # from here on the folder is incomplete
    log.info("quantizing %s -> %s: %d tensors, %.3f GB", src_dir, out, len(plan), total / 1e9)
    blocks = qconfig.layout == "blocks"
    with ShardedCheckpointWriter(out, specs, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"},
                                 align=PAGE if blocks else 8) as writer, \
            tqdm(total=total, unit="B", unit_scale=True, desc="quantize", disable=not progress) as bar:
        hub = hub_tensor_shapes(config)
        # canonical: the hub's order, tensor by tensor; blocks: the specs' order (pages first)
        for name, shape, mq in (plan if not blocks else [(n, hub.get(n), None) for n, _, _ in specs]):
            if blocks and name.endswith(f".{BLOCKS}"):
                _write_blocks(writer, reader, next(sp for sp in specs if sp[0] == name), config, qconfig,
                              chunk_bytes, bar)
            elif mq is None:
                _copy(writer, reader, name, shape, chunk_bytes, bar)
            else:
                _write_quantized(writer, reader, name, shape, mq, config, chunk_bytes, bar)
            # Unmap what this tensor touched: kept mapped, every shard read so far stays in our
            # RSS (measured: 12.8 GiB peak on a 2-layer real-width source, vs ~1 layer now).
            reader.close()
    _copy_tokenizer(src_dir, out, has_tokenizer)
    d = config.to_dict()
    d["quantization_config"] = qconfig.to_dict()
    write_json_atomic(d, out / "config.json")
