"""Build a DbrxForCausalLM from a checkpoint folder or hub repo id, float or quantized.

The model is built on the meta device (no memory), quantized modules are swapped in by one
function when config.json carries a ``quantization_config``, then every parameter and buffer is
read from the checkpoint one tensor at a time, straight onto the target device and dtype, and
assigned. At no point are two copies of the weights in RAM. The match is strict: a tensor the
model expects but the checkpoint lacks, one with the wrong shape, or one the model does not
know, is a CheckpointError naming it.

With a memory budget (``cpu_memory`` / ``gpu_memory``), the placement plan (dbrxq.plan.placement) is
made from the checkpoint's headers and ONE expert's bytes before anything else is read, so a budget
that is too small fails in a second; expert tensors are then left as the memory-mapped checkpoint
views (never touched, never resident), and dbrxq.runtime.offload wraps each layer's experts.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from dbrxq.core.errors import CheckpointError, ConfigError
from dbrxq.core.memory import memory_limit, process_rss
from dbrxq.core.pages import PageReleaser, trim_heap
from dbrxq.core.units import format_size
from dbrxq.formats.shards import tensor_nbytes
from dbrxq.core.sysinfo import parse_device, parse_dtype
from dbrxq.formats.checkpoint import (
    EXACT_DTYPE_SUFFIXES,
    CheckpointReader,
    check_checkpoint,
    checkpoint_float_dtype,
)
from dbrxq.formats.gguf_file import is_gguf
from dbrxq.formats.hub import resolve_model_dir
from dbrxq.loading.gguf import load_gguf_model
from dbrxq.loading.offloading import enable_offloading
from dbrxq.model.config import DbrxConfig
from dbrxq.model.dbrx import DbrxForCausalLM, register_loader, skip_init
from dbrxq.plan.checkpoint import plan_offload
from quantize.config import quantization_of
from quantize.format import mixed_option
from quantize.float_experts import use_float_kernel
from quantize.modules import in_place, quantize_model_modules
from quantize.primitives import check_qparams
from quantize.triton_moe import use_triton_moe
from quantize.specs import expected_tensors, module_kind

log = logging.getLogger(__name__)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def _too_big(reader: CheckpointReader, qconfig, folder) -> bool:
    """Whether a quantized checkpoint held whole (its tensors, twice in the canonical layout, whose
    kernel copies sit beside them) would not fit the memory this process may use: then loading offloads
    its experts with --cpu-memory auto rather than letting the kernel swap or kill it."""
    held = sum(tensor_nbytes(reader.shape(n), reader.dtype(n)) for n in reader.keys())
    held *= 1 if qconfig.layout == "blocks" else 2
    try:
        limit, where = memory_limit()
        if held + process_rss() <= limit:
            return False
    except OSError:  # no /proc (not Linux): nothing to decide from, load it whole as asked
        return False
    log.warning("%s: its weights (%s) do not fit the memory this process may use (%s: %s): offloading experts "
                "with --cpu-memory auto", folder, format_size(held), where, format_size(limit))
    return True


def _nbytes(m: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in m.buffers() if not b.is_meta)


def _check_qparams(name: str, t: torch.Tensor, qconfig, where) -> None:
    base = name.rsplit(".", 1)[0]
    j = mixed_option(base)
    if qconfig.expert_mix is not None and j is not None:
        mq = qconfig.expert_mix.options[j]  # a per-recipe stack (quantize.format.MIXED_PART)
    else:
        mq = qconfig.for_kind(module_kind(base) or module_kind(f"{base}.weight"))
    scales, zeros = (t, None) if name.endswith(".scales") else (None, t)
    check_qparams(scales, zeros, mq.bits, f"{where}: tensor {name}", symmetric=mq.symmetric)


@register_loader
def load_model(path_or_repo_id: str | Path, *, device: str | torch.device | None = "cpu",
               dtype: str | torch.dtype | None = None, revision: str | None = None,
               backend: str | None = None, gpu_memory: str | int | None = None,
               cpu_memory: str | int | None = None, context: int | None = None, batch_size: int = 1,
               kv_cache: str = "bf16", offload_options: dict | None = None) -> DbrxForCausalLM:
    """Load a float or dbrxq-quantized DBRX checkpoint, or a DBRX GGUF file (dbrxq.loading.gguf).

    Args:
        path_or_repo_id: a local folder, a hub repo id, or a ``.gguf`` file.
        device: where the weights go (cpu, cuda, auto).
        dtype: activation/float weight dtype; None/'auto' keeps the checkpoint's.
        backend: quantized-kernel override (quantize.kernels names); None picks automatically.
        gpu_memory, cpu_memory: budgets ("20GiB", bytes); either turns expert offloading on
            (quantized checkpoints only), see dbrxq.plan.placement / dbrxq.runtime.offload.
        context, batch_size, kv_cache: what the KV cache is planned for (offloading only);
            context defaults to min(max_seq_len, 4096).
        offload_options: more keywords for dbrxq.loading.offloading.enable_offloading (prefetch, cache_dir,
            drop_page_cache, timing, miss_policy).
    Raises:
        CheckpointError, ConfigError: with one line naming the file, tensor or field;
        BudgetError (a ConfigError) for a budget that cannot hold the non-expert weights.
    """
    if is_gguf(path_or_repo_id):  # a GGUF file (dbrxq's or llama.cpp's): its own loader
        return load_gguf_model(path_or_repo_id, device=device, dtype=parse_dtype(dtype), backend=backend,
                               offloading=gpu_memory is not None or cpu_memory is not None)
    t0 = time.perf_counter()
    folder = resolve_model_dir(path_or_repo_id, revision=revision)
    config = DbrxConfig.from_json(Path(folder) / "config.json")
    qconfig = quantization_of(config, Path(folder) / "config.json")
    dev = parse_device(device)
    offloading = gpu_memory is not None or cpu_memory is not None
    if offloading and qconfig is None:
        raise ConfigError(f"{folder}: --cpu-memory/--gpu-memory offloading needs a dbrxq-quantized checkpoint "
                          f"(this one is float); quantize it first with `dbrxq quantize`")
    with CheckpointReader(folder) as reader:
        check_checkpoint(reader, config, folder, expected_tensors(config, qconfig))  # before anything is built
        files = {reader.file_of(n) for n in reader.keys()}
        log.info("loading %s: %d layers, %s of weights in %d file(s)", folder, config.n_layers,
                 format_size(sum(p.stat().st_size for p in files)), len(files))
        target = parse_dtype(dtype) or checkpoint_float_dtype(reader)
        if not offloading and qconfig is not None and dev.type == "cpu" and _too_big(reader, qconfig, folder):
            cpu_memory, offloading = "auto", True
        auto = isinstance(cpu_memory, str) and cpu_memory.strip().lower() == "auto"
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
            with torch.device("meta"), skip_init():
                model = DbrxForCausalLM(config)
                if qconfig is not None:
                    quantize_model_modules(model, qconfig)
        finally:
            torch.set_default_dtype(old_default)
        expected = dict(model.state_dict(keep_vars=True))
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
                dev.type != "cpu" and name.endswith(EXACT_DTYPE_SUFFIXES)) else dev
            if name.endswith(EXACT_DTYPE_SUFFIXES) and name in reader and reader.dtype(name) != meta.dtype:
                raise CheckpointError(f"{reader.file_of(name)}: tensor {name} has dtype {reader.dtype(name)}, "
                                      f"expected {meta.dtype} (quantize/format.py)")
            tensor = reader.get(name, device=where, dtype=meta.dtype, expected_shape=tuple(meta.shape))
            if name.endswith((".scales", ".qzeros")) and not (offloading and ".ffn.experts." in name):
                _check_qparams(name, tensor, qconfig, reader.file_of(name))  # offloaded: when prepared
            _set_tensor(model, name, tensor)
    release = PageReleaser()  # made after every shard is mapped
    todo = [(name, m) for name, m in model.named_modules()
            if hasattr(m, "finalize_load") and not (offloading and name.endswith(".ffn.experts"))]
    repacked = [m for _, m in todo if not in_place(m)]
    if repacked and qconfig is not None and qconfig.layout == "canonical" and dev.type == "cpu":
        log.warning("%s is in the canonical layout: every load repacks its weights for the kernel; `dbrxq convert "
                    "%s OUT` writes the blocks layout, which loads as a memory map", folder, folder)
    bar = tqdm(total=sum(_nbytes(m) for m in repacked), unit="B", unit_scale=True, desc="preparing weights",
               disable=None if len(repacked) > 8 else True, leave=False)
    for _, m in todo:  # quantized modules repack for their kernel once the bytes are in place
        m.finalize_load(backend=backend, device=dev)
        if in_place(m):  # the kernel reads the mapped bytes themselves: nothing was repacked
            continue
        bar.update(_nbytes(m))
        # The repack touched the canonical bytes; they stay file-backed, so give the pages back
        # rather than holding the checkpoint in RSS next to the kernel's copy.
        for buf in m.buffers():
            release(buf)
        trim_heap()  # per module: the repack's freed temporaries otherwise double the peak
    bar.close()
    if dev.type == "cpu":
        use_float_kernel(model)  # float experts (a float checkpoint's) step through the C kernel, one call a layer
    elif os.environ.get("DBRXQ_TRITON_MOE") == "1" and not offloading:  # experimental: docs/gpu.md
        log.warning("DBRXQ_TRITON_MOE=1: %d layers' experts run through the fused Triton kernels",
                    use_triton_moe(model, dev))
    model.eval()
    model.requires_grad_(False)
    model.source_dir = Path(folder)
    log.info("loaded %s (%d layers, %s, %s) in %.1f s", folder, config.n_layers,
             "float" if qconfig is None else f"{qconfig.layout} layout", dev, time.perf_counter() - t0)
    if offloading:
        options = dict(offload_options or {})
        if auto and dev.type == "cpu":
            # the budget is all the memory there is: the page cache has no room to help, and what the
            # reads leave in it would push the process's own pages (attention, slots) out
            options.setdefault("drop_page_cache", True)
        enable_offloading(model, plan, layout, backend=backend, non_expert_bytes=plan.non_expert_bytes, **options)
    return model
