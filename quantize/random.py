"""Random codes written straight into the quantized format, for speed and memory benchmarks at real
width (DBRX's 40 layers without a float pass): seeded, loadable, scales spread like the float
maker's.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dbrxq.core.files import write_json_atomic
from dbrxq.formats.random import DEFAULT_CHUNK_BYTES, block_seed, random_chunks
from dbrxq.formats.shards import (
    DEFAULT_MAX_SHARD_BYTES,
    ShardedCheckpointWriter,
    tensor_nbytes,
)
from dbrxq.model.config import DbrxConfig
from quantize.blocks import BLOCKS, PAGE, RB, pack, packed_bytes, set_qparams, unpack
from quantize.format import QWEIGHT, QZEROS, SCALES, mixed_option
from quantize.specs import (expert_slot, mixed_option_of_stack, quantized_plan, quantized_tensor_specs,
                            resolve_layout)


def make_random_quantized_checkpoint(out_dir: str | os.PathLike, config: DbrxConfig, qconfig, *, seed: int = 0,
                                     dtype: torch.dtype = torch.bfloat16,
                                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> Path:
    """Write a dbrxq-quantized checkpoint of random codes directly, with no float checkpoint first:
    what speed benchmarks need at real width (writing 2 real-width layers in float, then quantizing
    them, moves ~16 GB to keep 3.4; this writes the 3.4). Codes are uniform over their range, scales
    ``initializer_range / std(code)`` times a uniform factor in [0.75, 1.25] (so weights have about the
    float checkpoint's spread), zero points the middle code; float tensors as make_random_checkpoint.
    A kernel reads the same bytes whatever their values, so this stands in for an RTN checkpoint in
    timings, not in quality measurements. ``qconfig``: a quantize.config.QuantConfig (with an
    ``expert_mix``, each expert gets its recipe's codes)."""

    out = Path(out_dir)
    qconfig = resolve_layout(config, qconfig)
    blocks = qconfig.layout == "blocks"
    specs = quantized_tensor_specs(config, qconfig, float_dtype=dtype)
    recipe = {name.removesuffix(".weight"): mq for name, _, mq in quantized_plan(config, qconfig) if mq is not None}
    total = sum(tensor_nbytes(s, d) for _, s, d in specs)
    gen = torch.Generator()
    with ShardedCheckpointWriter(out, specs, max_shard_bytes=max_shard_bytes, metadata={"format": "pt"},
                                 align=PAGE if blocks else 8) as writer, \
            tqdm(total=total, unit="B", unit_scale=True, desc="make_checkpoint", disable=not progress) as bar:
        for name, shape, dt in specs:
            base, _, part = name.rpartition(".")
            if part == BLOCKS:
                for chunk in _random_blocks(name, shape, config, qconfig, recipe, seed, gen):
                    writer.write(name, chunk)
                    bar.update(chunk.numel())
                continue
            mq = recipe.get(base)
            if mq is None and qconfig.expert_mix is not None and mixed_option(base) is not None:
                mq = qconfig.expert_mix.options[mixed_option(base)]  # a per-recipe stack (format_version 3)
            if mq is None:
                chunks = random_chunks(name, shape, config, seed=seed, dtype=dtype, chunk_bytes=DEFAULT_CHUNK_BYTES)
            else:
                gen.manual_seed(block_seed(seed, name, 0))
                lead = (1,) * (len(shape) - 2)  # experts: one [1, N, .] slice at a time
                n_slices = shape[0] if len(shape) == 3 else 1
                slice_shape = (*lead, *shape[-2:])
                code_std = ((4 ** mq.bits - 1) / 12) ** 0.5
                chunks = (
                    torch.randint(0, 256, slice_shape, dtype=torch.uint8, generator=gen) if part == QWEIGHT
                    else (torch.rand(slice_shape, generator=gen) * 0.5 + 0.75).mul_(
                        config.initializer_range / code_std).half() if part == SCALES
                    else torch.full(slice_shape, 2 ** (mq.bits - 1), dtype=torch.uint8)
                    for _ in range(n_slices))
                assert part in (QWEIGHT, SCALES, QZEROS), name
            for chunk in chunks:
                writer.write(name, chunk)
                bar.update(chunk.numel() * chunk.element_size())
    d = config.to_dict()
    d["torch_dtype"] = str(dtype).removeprefix("torch.")
    d["quantization_config"] = qconfig.to_dict()
    write_json_atomic(d, out / "config.json")
    return out


def _scales(n: int, k: int, mq, config: DbrxConfig, gen: torch.Generator) -> torch.Tensor:
    """Scales giving random codes about the float checkpoint's spread (see the docstring above)."""
    g = k if mq.group_size == -1 else mq.group_size
    code_std = ((4 ** mq.bits - 1) / 12) ** 0.5
    return (torch.rand(n, k // g, generator=gen) * 0.5 + 0.75).mul_(config.initializer_range / code_std).half()


def _random_weight_blocks(buf: torch.Tensor, mq, n: int, k: int, config: DbrxConfig, gen: torch.Generator) -> None:
    """Fill ``buf`` (one weight's blocks) with random codes, then its scales and zero points in place."""
    buf.copy_(torch.randint(0, 256, buf.shape, dtype=torch.uint8, generator=gen))
    g = k if mq.group_size == -1 else mq.group_size
    zeros = None if mq.symmetric else torch.full((n, k // g), 2 ** (mq.bits - 1), dtype=torch.uint8)
    set_qparams(buf, mq.bits, n, k, mq.group_size, _scales(n, k, mq, config, gen), zeros)
    if n % RB:  # padding rows hold zeros, as a pack leaves them
        buf.copy_(pack(unpack(buf, mq.bits, n, k, mq.group_size, not mq.symmetric)))


def _random_blocks(name: str, shape: tuple, config: DbrxConfig, qconfig, recipe: dict, seed: int,
                   gen: torch.Generator):
    """The chunks of one blocks-layout tensor of random codes: a weight's blocks (page padding zero), or
    a layer's experts one slot image at a time."""
    gen.manual_seed(block_seed(seed, name, 0))
    base = name.removesuffix(f".{BLOCKS}")
    if ".ffn.experts.mlp" in base:
        j = mixed_option_of_stack(base)
        mq = qconfig.experts if j is None else qconfig.expert_mix.options[j]
        slot = expert_slot(config, mq)
        for _ in range(shape[0]):
            img = torch.zeros(slot.stride, dtype=torch.uint8)
            for view, (n, k) in zip(slot.views(img), slot.shapes()):
                _random_weight_blocks(view, mq, n, k, config, gen)
            yield img[None]
        return
    mq = recipe[base]
    n, k = {"Wqkv": (config.qkv_out_features, config.d_model), "out_proj": (config.d_model, config.d_model)}.get(
        base.rsplit(".", 1)[1], (config.vocab_size, config.d_model))
    out = torch.zeros(shape[0], dtype=torch.uint8)
    g = k if mq.group_size == -1 else mq.group_size
    _random_weight_blocks(out[: packed_bytes(mq.bits, n, k, g, not mq.symmetric)], mq, n, k, config, gen)
    yield out
