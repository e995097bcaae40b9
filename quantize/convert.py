"""``dbrxq convert SRC OUT``: a quantized checkpoint rewritten in the other layout, number for number.

A canonical checkpoint (written by an older dbrxq, or with ``--layout canonical``) is repacked for the
CPU kernel at every load, and offloading it first writes a prepared copy of its experts; converted to
the blocks layout it loads as a memory map and offloads from itself. The conversion is exact both ways
(quantize.layout), streams one part at a time (the embedding, each layer, the head: one shard each, so
memory stays near one layer in both layouts), and writes config.json last, so an interrupted run never
leaves a folder that looks complete.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from tqdm.auto import tqdm

from dbrxq.core.errors import DbrxqError, QuantizationError
from dbrxq.core.files import check_disk_space, remove_stale_temps, write_bytes_atomic, write_json_atomic
from dbrxq.formats.checkpoint import INDEX_NAME, CheckpointReader, check_checkpoint
from dbrxq.formats.hub import copy_tokenizer_files, resolve_model_dir, tokenizer_files
from dbrxq.core.untrusted import MAX_INDEX_BYTES, read_bytes
from dbrxq.formats.shards import save_file_atomic, tensor_nbytes
from dbrxq.model.config import DbrxConfig
from quantize.blocks import PAGE
from quantize.config import quantization_of
from quantize.format import LAYOUTS, REPORT_NAME
from quantize.layout import to_blocks, to_canonical
from quantize.specs import expected_tensors, quantized_tensor_specs

log = logging.getLogger(__name__)


def _part(name: str) -> str:
    if name.startswith("transformer.blocks."):
        return f"layer.{int(name.split('.')[2])}"
    return "embed" if name == "transformer.wte.weight" else "head"


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, *, layout: str = "blocks",
                       overwrite: bool = False, progress: bool = True, revision: str | None = None) -> Path:
    """Rewrite the dbrxq-quantized checkpoint ``src`` into ``out`` in ``layout`` ("blocks" or "canonical").

    Raises:
        QuantizationError: a float source, a source already in ``layout``, an unknown layout, a shape the
            blocks cannot hold, or an existing non-empty ``out`` without ``overwrite``.
        CheckpointError: an unreadable or incomplete source; not enough disk space.
    """
    if layout not in LAYOUTS:
        raise QuantizationError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    folder = Path(resolve_model_dir(src, revision=revision))
    config = DbrxConfig.from_json(folder / "config.json")
    qconfig = quantization_of(config, folder / "config.json")
    if qconfig is None:
        raise QuantizationError(f"{folder}: a float checkpoint; quantize it with `dbrxq quantize` (which writes the "
                                f"blocks layout)")
    if qconfig.layout == layout:
        raise QuantizationError(f"{folder} is already in the {layout} layout")
    target = dataclasses.replace(qconfig, layout=layout)
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise QuantizationError(f"output {out} exists and is not an empty folder; pass --overwrite to replace it")
    if out.exists() and out.resolve() == folder.resolve():
        raise QuantizationError(f"output {out} is the source folder; choose another OUT")
    with CheckpointReader(folder) as reader:
        check_checkpoint(reader, config, folder, expected_tensors(config, qconfig))
        # the float tensors keep their names and dtypes in either layout
        specs = quantized_tensor_specs(config, target, float_dtype={n: reader.dtype(n) for n in reader.keys()})
        parts: dict[str, list] = {}
        for spec in specs:
            parts.setdefault(_part(spec[0]), []).append(spec)
        order = ["embed", *(f"layer.{i}" for i in range(config.n_layers)), "head"]
        order = [p for p in order if p in parts]
        need = sum(tensor_nbytes(s, d) for _, s, d in specs)
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
        check_disk_space(out, need)
        (out / "config.json").unlink(missing_ok=True)  # from here on OUT is incomplete
        sources: dict[str, list[str]] = {}
        for name in reader.keys():
            sources.setdefault(_part(name), []).append(name)
        shard = {p: f"model-{j + 1:05d}-of-{len(order):05d}.safetensors" for j, p in enumerate(order)}
        convert = to_blocks if layout == "blocks" else to_canonical
        with tqdm(total=need, unit="B", unit_scale=True, desc=f"convert to {layout}", disable=not progress) as bar:
            for p in order:
                tensors = convert({n: reader.get(n) for n in sources.get(p, [])}, config, target)
                written = {n: tensors[n].contiguous() for n, _, _ in parts[p]}
                assert set(written) == set(tensors), (p, sorted(tensors), parts[p])
                save_file_atomic(written, out / shard[p], metadata={"format": "pt"},
                                 align=PAGE if layout == "blocks" else 8)
                reader.close()  # unmap what this part touched
                bar.update(sum(t.numel() * t.element_size() for t in written.values()))
    weight_map = {n: shard[p] for p in order for n, _, _ in parts[p]}
    write_json_atomic({"metadata": {"total_size": need}, "weight_map": weight_map}, out / INDEX_NAME)
    if tokenizer_files(folder):
        copy_tokenizer_files(folder, out)
    if (folder / REPORT_NAME).is_file():  # the routing counts offloading places experts by
        try:  # confined and bounded like any file a checkpoint holds: a link out of it is not followed
            report = read_bytes(folder / REPORT_NAME, MAX_INDEX_BYTES, folder=folder)
        except DbrxqError as e:
            log.warning("%s; not copied", e)
        else:
            write_bytes_atomic(report, out / REPORT_NAME)
    d = config.to_dict()
    d["quantization_config"] = target.to_dict()
    write_json_atomic(d, out / "config.json")
    log.info("converted %s -> %s (%s layout)", folder, out, layout)
    return out
