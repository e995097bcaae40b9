"""Random codes written straight into the quantized format, for speed and memory benchmarks at real
width (DBRX's 40 layers without a float pass): seeded, loadable, scales spread like the float
maker's.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dbrxq.core.errors import DbrxqError
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


def router_scales(shares: list[float], top_k: int, *, seed: int = 0, samples: int = 20000, rounds: int = 60) -> list[float]:
    """Per expert, a factor for its router row so that tokens whose normalized hidden state is isotropic
    route to it with about ``shares`` of the top-k slots: an expert's logit is then Gaussian with a
    standard deviation proportional to its row's norm, and a larger one wins the top-k more often.
    Fitted on simulated logits (multiplicative steps towards the target shares). Shares this cannot
    reach (an expert almost never routed: even a zero logit beats negative ones) come out as close as
    it gets; the run reports the routing it saw."""
    E = len(shares)
    target = torch.tensor(shares, dtype=torch.float64).clamp(min=1e-6)
    target = target / target.sum()
    z = torch.randn(samples, E, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a = torch.ones(E, dtype=torch.float64)
    for _ in range(rounds):
        ids = (z * a).topk(top_k, dim=1).indices
        got = torch.bincount(ids.reshape(-1), minlength=E).double() / ids.numel()
        a = (a * (target / got.clamp(min=1e-6)) ** 0.5).clamp(1e-3, 1e3)
        a = a / a.mean()
    return a.tolist()


def make_random_quantized_checkpoint(out_dir: str | os.PathLike, config: DbrxConfig, qconfig, *, seed: int = 0,
                                     dtype: torch.dtype = torch.bfloat16,
                                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
                                     router_shares: list[list[float]] | None = None) -> Path:
    """Write a dbrxq-quantized checkpoint of random codes directly, with no float checkpoint first:
    what speed benchmarks need at real width (writing 2 real-width layers in float, then quantizing
    them, moves ~16 GB to keep 3.4; this writes the 3.4). Codes are uniform over their range, scales
    ``initializer_range / std(code)`` times a uniform factor in [0.75, 1.25] (so weights have about the
    float checkpoint's spread), zero points the middle code; float tensors as make_random_checkpoint.
    A kernel reads the same bytes whatever their values, so this stands in for an RTN checkpoint in
    timings, not in quality measurements. ``qconfig``: a quantize.config.QuantConfig (with an
    ``expert_mix``, each expert gets its recipe's codes). ``router_shares``: per layer (layer i takes
    entry i modulo their number, its experts in a seeded order), the routing shares to skew the router
    towards (:func:`router_scales`), e.g. a trained model's, measured by scripts/routing_stats.py."""

    out = Path(out_dir)
    if router_shares is not None:
        _check_shares(router_shares, config.num_experts)
    qconfig = resolve_layout(config, qconfig)
    blocks = qconfig.layout == "blocks"
    specs = quantized_tensor_specs(config, qconfig, float_dtype=dtype)
    recipe = {name.removesuffix(".weight"): mq for name, _, mq in quantized_plan(config, qconfig) if mq is not None}
    total = sum(tensor_nbytes(s, d) for _, s, d in specs)
    gen = torch.Generator()
    scales: dict[int, list[float]] = {}  # fitted per share profile
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
                if router_shares and name.endswith(".ffn.router.layer.weight"):
                    layer = int(name.split(".")[2])
                    chunks = _skewed(chunks, router_shares[layer % len(router_shares)], config, seed, layer, scales)
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
    """Fill ``buf`` (one weight's blocks) with random codes (numpy's PCG64, seeded from ``gen``: 4x
    torch's byte rate, which sets the time of a 40-layer checkpoint), then its scales and zero points."""
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
    buf.copy_(torch.from_numpy(rng.integers(0, 256, buf.numel(), dtype=np.uint8)))
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


def _check_shares(shares, num_experts: int) -> None:
    if not isinstance(shares, list) or not shares:
        raise DbrxqError("router shares: expected a non-empty list (one list of shares per layer)")
    for i, row in enumerate(shares):
        ok = isinstance(row, list) and len(row) == num_experts and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0 for x in row)
        if not ok or not sum(row) > 0:
            raise DbrxqError(f"router shares: layer {i}: expected {num_experts} finite non-negative numbers, "
                             "not all zero")


def _skewed(chunks, shares: list[float], config: DbrxConfig, seed: int, layer: int, cache: dict):
    """A router weight's rows scaled by :func:`router_scales` of ``shares`` (experts in a seeded order)."""
    key = id(shares)
    if key not in cache:
        cache[key] = router_scales(list(shares), config.top_k, seed=seed)
    order = torch.randperm(config.num_experts, generator=torch.Generator().manual_seed(block_seed(seed, "router", layer)))
    factor = torch.tensor(cache[key], dtype=torch.float32)[order]
    for chunk in chunks:  # the whole [E, D] router is one chunk
        yield (chunk.float() * factor[:, None]).to(chunk.dtype)
