"""The placement plan of a checkpoint on disk (``dbrxq run --plan``, and the loader's first step with a
budget): headers and one expert only, so a budget that is too small fails in a second.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from dbrxq.core.errors import BudgetError, ConfigError
from dbrxq.core.memory import auto_budget, process_rss
from dbrxq.core.sysinfo import parse_device, parse_dtype
from dbrxq.core.units import format_size, parse_size
from dbrxq.formats.checkpoint import (
    CheckpointReader,
    check_checkpoint,
    checkpoint_float_dtype,
)
from dbrxq.formats.hub import resolve_model_dir
from dbrxq.model.config import DbrxConfig
from dbrxq.model.kv_cache import check_flavour, kv_cache_bytes
from dbrxq.plan.placement import RUNTIME_ALLOWANCE, make_plan
from dbrxq.plan.sizes import checkpoint_sizes
from dbrxq.plan.slots import layout_classes
from quantize.config import quantization_of
from quantize.specs import expected_tensors

log = logging.getLogger(__name__)


def plan_offload(reader: CheckpointReader, config: DbrxConfig, *, device: torch.device, dtype: torch.dtype,
                 backend: str | None, gpu_memory, cpu_memory, context: int | None, batch_size: int,
                 kv_cache: str):
    """(PlacementPlan, SlotLayout) for a quantized checkpoint, from headers and one expert's bytes."""

    if config.quantization_config is None:
        raise ConfigError(f"{reader.folder}: offloading needs a dbrxq-quantized checkpoint (this one is float): "
                          f"quantize it first, e.g. `dbrxq quantize {reader.folder} OUT`")
    gpu = None if gpu_memory is None else parse_size(gpu_memory, "--gpu-memory")
    if isinstance(cpu_memory, str) and cpu_memory.strip().lower() == "auto":
        try:
            cpu, why = auto_budget()
        except OSError as e:
            raise BudgetError(f"--cpu-memory auto: cannot tell how much memory there is ({e}); "
                              "give a size, e.g. --cpu-memory 20GiB") from None
        log.warning("%s", why)
    else:
        cpu = None if cpu_memory is None else parse_size(cpu_memory, "--cpu-memory")
    context = context or min(config.max_seq_len, 4096)
    if not 1 <= context <= config.max_seq_len:
        raise ConfigError(f"--context {context}: must be between 1 and the model's max_seq_len {config.max_seq_len}")
    non_expert, expert_bytes, layout = checkpoint_sizes(reader, config, backend, device, dtype)
    plan = make_plan(config, device=device, gpu_memory=gpu, cpu_memory=cpu, non_expert_bytes=non_expert,
                     classes=layout_classes(layout),
                     expert_bytes=expert_bytes, slot_bytes=layout.nbytes, context=context,
                     batch_size=batch_size, kv_flavour=check_flavour(kv_cache), dtype=dtype,
                     process_bytes=process_rss() + RUNTIME_ALLOWANCE if cpu is not None else 0)
    return plan, layout


def describe_plan(path_or_repo_id: str | Path, *, device="cpu", dtype=None, revision: str | None = None,
                  backend: str | None = None, gpu_memory=None, cpu_memory=None, context: int | None = None,
                  batch_size: int = 1, kv_cache: str = "bf16") -> str:
    """The placement plan as text, reading headers and one expert only (``dbrxq run --plan``)."""
    folder = resolve_model_dir(path_or_repo_id, revision=revision)
    config = DbrxConfig.from_json(Path(folder) / "config.json")
    qconfig = quantization_of(config, Path(folder) / "config.json")
    with CheckpointReader(folder) as reader:
        check_checkpoint(reader, config, folder, expected_tensors(config, qconfig))
        target = parse_dtype(dtype) or checkpoint_float_dtype(reader)
        if qconfig is None:
            return _describe_float(reader, config, folder, device=parse_device(device), dtype=target,
                                   gpu_memory=gpu_memory, cpu_memory=cpu_memory, context=context,
                                   batch_size=batch_size, kv_cache=kv_cache)
        plan, _ = plan_offload(reader, config, device=parse_device(device), dtype=target, backend=backend,
                               gpu_memory=gpu_memory, cpu_memory=cpu_memory, context=context,
                               batch_size=batch_size, kv_cache=kv_cache)
    return plan.describe()


def _describe_float(reader: CheckpointReader, config: DbrxConfig, folder, *, device: torch.device,
                    dtype: torch.dtype, gpu_memory, cpu_memory, context: int | None, batch_size: int,
                    kv_cache: str) -> str:
    """``--plan`` for a float checkpoint: everything resident on the device (a float checkpoint
    cannot offload experts; a budget for one is refused, saying how to quantize it)."""

    if gpu_memory is not None or cpu_memory is not None:
        raise ConfigError(f"{folder}: a memory budget offloads experts, which needs a dbrxq-quantized checkpoint "
                          f"(this one is float): quantize it first, e.g. `dbrxq quantize {folder} OUT`, then "
                          "`dbrxq run OUT --cpu-memory ...`")
    context = context or min(config.max_seq_len, 4096)
    if not 1 <= context <= config.max_seq_len:
        raise ConfigError(f"--context {context}: must be between 1 and the model's max_seq_len {config.max_seq_len}")
    item = torch.empty(0, dtype=dtype).element_size()
    weights = sum(math.prod(reader.shape(n)) for n in reader.keys()) * item
    kv = kv_cache_bytes(config, batch_size, context, check_flavour(kv_cache), dtype)
    return "\n".join([
        f"float checkpoint {folder}: every weight resident on {device.type}, no offloading",
        f"  weights: {format_size(weights)} ({str(dtype).removeprefix('torch.')})",
        f"  KV cache for {context} tokens x batch {batch_size}: {format_size(kv)} ({kv_cache})",
        f"  total: {format_size(weights + kv)} (+ activations and the runtime)",
        "  budgets (--gpu-memory / --cpu-memory) need a quantized checkpoint: dbrxq quantize MODEL OUT",
    ])
