"""Build a DbrxForCausalLM from a checkpoint folder or hub repo id, float or quantized.

The model is built on the meta device (no memory), quantized modules are swapped in by one
function when config.json carries a ``quantization_config``, then every parameter and buffer is
read from the checkpoint one tensor at a time, straight onto the target device and dtype, and
assigned. At no point are two copies of the weights in RAM. The match is strict: a tensor the
model expects but the checkpoint lacks, one with the wrong shape, or one the model does not
know, is a CheckpointError naming it.

With a memory budget (``cpu_memory`` / ``gpu_memory``), the placement plan (dbrxq.placement) is
made from the checkpoint's headers and ONE expert's bytes before anything else is read, so a budget
that is too small fails in a second; expert tensors are then left as the memory-mapped checkpoint
views (never touched, never resident), and dbrxq.offload wraps each layer's experts.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointReader, check_checkpoint, resolve_model_dir
from .config import DbrxConfig
from .errors import CheckpointError, ConfigError
from .model import DbrxForCausalLM
from .pages import PageReleaser, trim_heap

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'auto'/None -> None (the checkpoint's own float dtype); names -> torch dtypes."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}") from None


def parse_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; expected cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; expected cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but this torch sees no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r} asked for, but this torch sees {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


# Quantized buffers have exactly the dtype the format fixes (quantize/format.py): never converted.
_EXACT_DTYPE_SUFFIXES = (".qweight", ".scales", ".qzeros")


def _checkpoint_float_dtype(reader: CheckpointReader) -> torch.dtype:
    """The dtype the checkpoint stores its float weights in: the embedding's (always float)."""
    if "transformer.wte.weight" in reader:
        return reader.dtype("transformer.wte.weight")
    for name in reader.keys():
        dt = reader.dtype(name)
        if dt.is_floating_point and not name.endswith(_EXACT_DTYPE_SUFFIXES):
            return dt
    return torch.float32


def _check_qparams(name: str, t: torch.Tensor, qconfig, where) -> None:
    from quantize.format import mixed_option
    from quantize.primitives import check_qparams
    from quantize.writer import module_kind
    base = name.rsplit(".", 1)[0]
    j = mixed_option(base)
    if qconfig.expert_mix is not None and j is not None:
        bits = qconfig.expert_mix.options[j].bits  # a per-recipe stack (quantize.format.MIXED_PART)
    else:
        bits = qconfig.for_kind(module_kind(base) or module_kind(f"{base}.weight")).bits
    scales, zeros = (t, None) if name.endswith(".scales") else (None, t)
    check_qparams(scales, zeros, bits, f"{where}: tensor {name}")


def load_model(path_or_repo_id: str | Path, *, device: str | torch.device | None = "cpu",
               dtype: str | torch.dtype | None = None, revision: str | None = None,
               backend: str | None = None, gpu_memory: str | int | None = None,
               cpu_memory: str | int | None = None, context: int | None = None, batch_size: int = 1,
               kv_cache: str = "bf16", offload_options: dict | None = None) -> DbrxForCausalLM:
    """Load a float or dbrxq-quantized DBRX checkpoint.

    Args:
        path_or_repo_id: a local folder or a hub repo id.
        device: where the weights go (cpu, cuda, auto).
        dtype: activation/float weight dtype; None/'auto' keeps the checkpoint's.
        backend: quantized-kernel override (quantize.kernels names); None picks automatically.
        gpu_memory, cpu_memory: budgets ("20GiB", bytes); either turns expert offloading on
            (quantized checkpoints only), see dbrxq.placement / dbrxq.offload.
        context, batch_size, kv_cache: what the KV cache is planned for (offloading only);
            context defaults to min(max_seq_len, 4096).
        offload_options: more keywords for dbrxq.offload.enable_offloading (prefetch, cache_dir,
            drop_page_cache, timing, miss_policy).
    Raises:
        CheckpointError, ConfigError: with one line naming the file, tensor or field;
        BudgetError (a ConfigError) for a budget that cannot hold the non-expert weights.
    """
    folder = resolve_model_dir(path_or_repo_id, revision=revision)
    config = DbrxConfig.from_json(Path(folder) / "config.json")
    dev = parse_device(device)
    offloading = gpu_memory is not None or cpu_memory is not None
    if offloading and config.quantization_config is None:
        raise ConfigError(f"{folder}: --cpu-memory/--gpu-memory offloading needs a dbrxq-quantized checkpoint "
                          f"(this one is float); quantize it first with `dbrxq quantize`")
    with CheckpointReader(folder) as reader:
        check_checkpoint(reader, config, folder)  # names, shapes, dtypes: before anything is built
        target = parse_dtype(dtype) or _checkpoint_float_dtype(reader)
        if offloading:
            plan, layout = plan_offload(reader, config, device=dev, dtype=target, backend=backend,
                                        gpu_memory=gpu_memory, cpu_memory=cpu_memory, context=context,
                                        batch_size=batch_size, kv_cache=kv_cache)
            if all(s >= config.num_experts for s in plan.slots_per_layer):
                # every expert fits the budget: nothing would ever be read from disk, so run fully
                # resident and write no prepared-expert file
                log.warning("the memory budget holds every expert: running fully resident (no offloading)")
                offloading = False
        old_default = torch.get_default_dtype()
        torch.set_default_dtype(target)
        try:
            with torch.device("meta"):
                model = DbrxForCausalLM(config)
                if config.quantization_config is not None:
                    from quantize.modules import quantize_model_modules  # only quantized checkpoints need it
                    quantize_model_modules(model, config.quantization_config)
        finally:
            torch.set_default_dtype(old_default)
        expected = dict(model.state_dict(keep_vars=True))
        qconfig = None
        if config.quantization_config is not None:
            from quantize.config import QuantConfig
            qconfig = QuantConfig.from_dict(config.quantization_config)
        ignored = {"lm_head.weight"} if config.tie_word_embeddings else set()  # a tied head is the embedding
        unexpected = sorted(set(reader.keys()) - set(expected) - ignored)
        if unexpected:
            more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
            raise CheckpointError(f"{folder}: unexpected tensors {', '.join(unexpected[:3])}{more}: "
                                  f"not part of a DBRX model with this config.json")
        for name, meta in expected.items():
            # Offloaded experts stay where the checkpoint maps them (CPU, file-backed, untouched); so
            # do quantized tensors bound for a GPU, whose kernels repack them onto it (finalize_load):
            # the GPU then holds each weight once, in its kernel's layout.
            where = "cpu" if (offloading and ".ffn.experts." in name) or (
                dev.type != "cpu" and name.endswith(_EXACT_DTYPE_SUFFIXES)) else dev
            if name.endswith(_EXACT_DTYPE_SUFFIXES) and name in reader and reader.dtype(name) != meta.dtype:
                raise CheckpointError(f"{reader.file_of(name)}: tensor {name} has dtype {reader.dtype(name)}, "
                                      f"expected {meta.dtype} (quantize/format.py)")
            tensor = reader.get(name, device=where, dtype=meta.dtype, expected_shape=tuple(meta.shape))
            if name.endswith((".scales", ".qzeros")) and not (offloading and ".ffn.experts." in name):
                _check_qparams(name, tensor, qconfig, reader.file_of(name))  # offloaded: when prepared
            _set_tensor(model, name, tensor)
    release = PageReleaser()  # made after every shard is mapped
    for name, m in model.named_modules():  # quantized modules repack for their kernel once the bytes are in place
        if hasattr(m, "finalize_load") and not (offloading and name.endswith(".ffn.experts")):
            m.finalize_load(backend=backend, device=dev)
            # The repack touched the canonical bytes; they stay file-backed, so give the pages back
            # rather than holding the checkpoint in RSS next to the kernel's copy.
            for buf in m.buffers():
                release(buf)
            trim_heap()  # per module: the repack's freed temporaries otherwise double the peak
    model.eval()
    model.requires_grad_(False)
    model.source_dir = Path(folder)
    if offloading:
        from .offload import enable_offloading
        enable_offloading(model, plan, layout, backend=backend, non_expert_bytes=plan.non_expert_bytes,
                          **(offload_options or {}))
    return model


def plan_offload(reader: CheckpointReader, config: DbrxConfig, *, device: torch.device, dtype: torch.dtype,
                 backend: str | None, gpu_memory, cpu_memory, context: int | None, batch_size: int,
                 kv_cache: str):
    """(PlacementPlan, SlotLayout) for a quantized checkpoint, from headers and one expert's bytes."""
    from .kv_cache import check_flavour
    from .offload import checkpoint_sizes, layout_classes
    from .placement import make_plan, parse_size

    if config.quantization_config is None:
        raise ConfigError(f"{reader.folder}: offloading needs a dbrxq-quantized checkpoint (this one is float): "
                          f"quantize it first, e.g. `dbrxq quantize {reader.folder} OUT`")
    gpu = None if gpu_memory is None else parse_size(gpu_memory, "--gpu-memory")
    cpu = None if cpu_memory is None else parse_size(cpu_memory, "--cpu-memory")
    context = context or min(config.max_seq_len, 4096)
    if not 1 <= context <= config.max_seq_len:
        raise ConfigError(f"--context {context}: must be between 1 and the model's max_seq_len {config.max_seq_len}")
    non_expert, expert_bytes, layout = checkpoint_sizes(reader, config, backend, device, dtype)
    plan = make_plan(config, device=device, gpu_memory=gpu, cpu_memory=cpu, non_expert_bytes=non_expert,
                     classes=layout_classes(layout),
                     expert_bytes=expert_bytes, slot_bytes=layout.nbytes, context=context,
                     batch_size=batch_size, kv_flavour=check_flavour(kv_cache), dtype=dtype)
    return plan, layout


def describe_plan(path_or_repo_id: str | Path, *, device="cpu", dtype=None, revision: str | None = None,
                  backend: str | None = None, gpu_memory=None, cpu_memory=None, context: int | None = None,
                  batch_size: int = 1, kv_cache: str = "bf16") -> str:
    """The placement plan as text, reading headers and one expert only (``dbrxq run --plan``)."""
    folder = resolve_model_dir(path_or_repo_id, revision=revision)
    config = DbrxConfig.from_json(Path(folder) / "config.json")
    with CheckpointReader(folder) as reader:
        target = parse_dtype(dtype) or _checkpoint_float_dtype(reader)
        if config.quantization_config is None:
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
    from .kv_cache import check_flavour, kv_cache_bytes
    from .placement import format_size

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
