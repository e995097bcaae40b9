"""Build a DbrxForCausalLM from a checkpoint folder or hub repo id, float or quantized.

The model is built on the meta device (no memory), quantized modules are swapped in by one
function when config.json carries a ``quantization_config``, then every parameter and buffer is
read from the checkpoint one tensor at a time, straight onto the target device and dtype, and
assigned. At no point are two copies of the weights in RAM. The match is strict: a tensor the
model expects but the checkpoint lacks, one with the wrong shape, or one the model does not
know, is a CheckpointError naming it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointReader, resolve_model_dir
from .config import DbrxConfig
from .errors import CheckpointError, ConfigError
from .model import DbrxForCausalLM

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
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but this torch sees no CUDA device")
    return dev


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def _checkpoint_float_dtype(reader: CheckpointReader) -> torch.dtype:
    for name in reader.keys():
        dt = reader.dtype(name)
        if dt.is_floating_point:
            return dt
    return torch.float32


def load_model(path_or_repo_id: str | Path, *, device: str | torch.device | None = "cpu",
               dtype: str | torch.dtype | None = None, revision: str | None = None,
               backend: str | None = None) -> DbrxForCausalLM:
    """Load a float or dbrxq-quantized DBRX checkpoint.

    Args:
        path_or_repo_id: a local folder or a hub repo id.
        device: where the weights go (cpu, cuda, auto).
        dtype: activation/float weight dtype; None/'auto' keeps the checkpoint's.
        backend: quantized-kernel override (quantize.kernels names); None picks automatically.
    Raises:
        CheckpointError, ConfigError: with one line naming the file, tensor or field.
    """
    folder = resolve_model_dir(path_or_repo_id, revision=revision)
    config = DbrxConfig.from_json(Path(folder) / "config.json")
    dev = parse_device(device)
    with CheckpointReader(folder) as reader:
        target = parse_dtype(dtype) or _checkpoint_float_dtype(reader)
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
        ignored = {"lm_head.weight"} if config.tie_word_embeddings else set()  # a tied head is the embedding
        unexpected = sorted(set(reader.keys()) - set(expected) - ignored)
        if unexpected:
            more = f" (and {len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
            raise CheckpointError(f"{folder}: unexpected tensors {', '.join(unexpected[:3])}{more}: "
                                  f"not part of a DBRX model with this config.json")
        for name, meta in expected.items():
            tensor = reader.get(name, device=dev, dtype=meta.dtype, expected_shape=tuple(meta.shape))
            _set_tensor(model, name, tensor)
    for m in model.modules():  # quantized modules repack for their kernel once the bytes are in place
        if hasattr(m, "finalize_load"):
            m.finalize_load(backend=backend)
    model.eval()
    model.requires_grad_(False)
    model.source_dir = Path(folder)
    return model
