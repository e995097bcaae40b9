"""The quantized checkpoint's tensors: which hub tensors a recipe quantizes, and the name, shape and
dtype of every tensor written (the one definition the writers, the loader's checks and the
allocator share).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping

import torch

from dbrxq.core.errors import QuantizationError
from dbrxq.formats.checkpoint import float_specs, hub_tensor_shapes
from dbrxq.formats.shards import TensorSpec
from dbrxq.model.config import DbrxConfig
from quantize.blocks import BLOCKS, ExpertSlot, check_packable, weight_stored_bytes
from quantize.config import ModuleQuant, QuantConfig
from quantize.format import MIXED_PART, QWEIGHT, QZEROS, SCALES
from quantize.primitives import packed_k, resolve_group_size
from quantize.rtn import EXPERT_KINDS


def module_kind(name: str) -> str | None:
    """The QuantConfig kind of hub tensor ``name`` (experts, attn, lm_head, embed) or None."""
    if name.endswith((".attn.Wqkv.weight", ".attn.out_proj.weight")):
        return "attn"
    if name.rsplit(".", 1)[-1] in EXPERT_KINDS and ".ffn.experts.mlp." in name:
        return "experts"
    if name == "lm_head.weight":
        return "lm_head"
    if name == "transformer.wte.weight":
        return "embed"
    return None


def logical_shape(name: str, hub_shape: tuple[int, ...], kind: str, config: DbrxConfig) -> tuple[int, ...]:
    """The canonical (out, in) shape: experts [E, F, D] (w1, v1) / [E, D, F] (w2); else the hub's."""
    if kind != "experts":
        return hub_shape
    e, f, d = config.num_experts, config.ffn_hidden_size, config.d_model
    return (e, d, f) if name.endswith(".w2") else (e, f, d)


def quantized_plan(config: DbrxConfig, qconfig: QuantConfig) -> Iterator[tuple[str, tuple, ModuleQuant | None]]:
    """Yield (hub name, hub shape, ModuleQuant or None for a plain copy) in the hub's order."""
    if qconfig.embed.quantized:
        raise QuantizationError("embed: quantized embeddings are not supported yet; keep them at 16 bits")
    if qconfig.lm_head.quantized and config.tie_word_embeddings:
        raise QuantizationError("lm_head: this model ties lm_head to the embeddings, which stay "
                                "unquantized; keep lm_head at 16 bits")
    for name, shape in hub_tensor_shapes(config).items():
        kind = module_kind(name)
        mq = qconfig.for_kind(kind) if kind else None
        yield name, shape, (mq if mq is not None and mq.quantized else None)


def resolve_layout(config: DbrxConfig, qconfig: QuantConfig) -> QuantConfig:
    """``qconfig`` with a concrete layout for ``config``: "auto" is "blocks" when the kernel's blocks hold
    every quantized weight of the model (K a multiple of 64, or 32 at 8 bits: every real DBRX weight),
    else "canonical"."""
    if qconfig.layout != "auto":
        return qconfig
    try:
        quantized_tensor_specs(config, dataclasses.replace(qconfig, layout="blocks"))
    except QuantizationError:
        try:
            quantized_tensor_specs(config, dataclasses.replace(qconfig, layout="canonical"))
        except QuantizationError:
            raise
        return dataclasses.replace(qconfig, layout="canonical")
    return dataclasses.replace(qconfig, layout="blocks")


def quantized_tensor_specs(config: DbrxConfig, qconfig: QuantConfig, *,
                           float_dtype: torch.dtype | Mapping[str, torch.dtype] = torch.bfloat16
                           ) -> list[TensorSpec]:
    """Every tensor of the quantized checkpoint as ``(name, shape, dtype)``, in write order. In the blocks
    layout every ``qblocks`` tensor (whole 4 KiB pages) comes before the float tensors, so that each
    stays page-aligned in a shard whose data starts on a page (dbrxq.formats.shards, ``align``).

    Args:
        float_dtype: dtype of the unquantized tensors, one for all or per hub name.
    Raises:
        QuantizationError: quantized embeddings, a quantized lm_head tied to them, a group size
            that does not divide a tensor's input dim, or (blocks) a shape the kernel's blocks cannot
            hold (naming the tensor).
    """
    qconfig = resolve_layout(config, qconfig)
    specs: list[TensorSpec] = []
    mix = qconfig.expert_mix
    blocks = qconfig.layout == "blocks"
    for name, hub_shape, mq in quantized_plan(config, qconfig):
        if mq is None:
            dt = float_dtype if isinstance(float_dtype, torch.dtype) else float_dtype[name]
            specs.append((name, hub_shape, dt))
            continue
        kind = module_kind(name)
        *lead, n, k = logical_shape(name, hub_shape, kind, config)
        base = name.removesuffix(".weight")
        if blocks:
            specs += _blocks_specs(name, base, kind, n, k, mq, config, qconfig)
            continue
        if kind == "experts" and mix is not None:  # one stack per recipe the layer uses (MIXED_PART)
            layer = int(name.split(".")[2])
            for j, opt in enumerate(mix.options):
                members = mix.members(layer, j)
                if members:
                    specs += weight_specs(f"{base}.{MIXED_PART.format(j)}", (len(members),), n, k, opt)
            continue
        specs += weight_specs(base, tuple(lead), n, k, mq)
    if blocks:  # pages first (a stable partition: each group keeps the hub's order)
        specs = [sp for sp in specs if sp[0].endswith(BLOCKS)] + [sp for sp in specs if not sp[0].endswith(BLOCKS)]
    return specs


def expert_stack(layer: int, option: int | None = None) -> str:
    """The stored name of a layer's experts in the blocks layout (``option``: a per-recipe stack)."""
    part = "" if option is None else f".{MIXED_PART.format(option)}"
    return f"transformer.blocks.{layer}.ffn.experts.mlp{part}.{BLOCKS}"


def mixed_option_of_stack(base: str) -> int | None:
    """The recipe index j of a blocks-layout expert stack ``...ffn.experts.mlp.o{j}`` (None: ``...mlp``)."""
    tail = base.rsplit(".", 1)[1]
    return int(tail[1:]) if base.endswith(tail) and tail.startswith("o") and tail[1:].isdigit() else None


def expert_slot(config: DbrxConfig, mq: ModuleQuant) -> ExpertSlot:
    """The slot image of one expert of ``config`` stored with recipe ``mq`` (blocks layout)."""
    return ExpertSlot(mq.bits, mq.group_size, not mq.symmetric, config.d_model, config.ffn_hidden_size)


def _blocks_specs(name: str, base: str, kind: str, n: int, k: int, mq: ModuleQuant, config: DbrxConfig,
                  qconfig: QuantConfig) -> list[TensorSpec]:
    """The blocks layout's tensors for hub tensor ``name``: a layer's experts are ONE tensor (emitted
    with w1; v1 and w2 live in the same slot images), any other weight one ``<base>.qblocks``."""
    if kind != "experts":
        try:
            g = resolve_group_size(mq.group_size, k, mq.bits)
        except QuantizationError as e:
            raise QuantizationError(f"{base} (input dim {k}): {e}") from None
        check_packable(mq.bits, n, k, g, base)
        return [(f"{base}.{BLOCKS}", (weight_stored_bytes(mq.bits, n, k, mq.group_size, not mq.symmetric),),
                 torch.uint8)]
    if not name.endswith(".w1"):
        return []
    layer = int(name.split(".")[2])
    mix = qconfig.expert_mix
    stacks = [(None, mq, config.num_experts)] if mix is None else \
        [(j, o, len(mix.members(layer, j))) for j, o in enumerate(mix.options) if mix.members(layer, j)]
    out = []
    for j, opt, count in stacks:
        for kk in (config.d_model, config.ffn_hidden_size):
            try:
                g = resolve_group_size(opt.group_size, kk, opt.bits)
            except QuantizationError as e:
                raise QuantizationError(f"{base} (input dim {kk}): {e}") from None
            check_packable(opt.bits, config.num_experts, kk, g, f"{base.rsplit('.', 1)[0]}")
        out.append((expert_stack(layer, j), (count, expert_slot(config, opt).stride), torch.uint8))
    return out


def weight_specs(base: str, lead: tuple, n: int, k: int, mq: ModuleQuant) -> list[TensorSpec]:
    try:
        g = resolve_group_size(mq.group_size, k, mq.bits)
    except QuantizationError as e:
        raise QuantizationError(f"{base} (input dim {k}): {e}") from None
    specs = [(f"{base}.{QWEIGHT}", (*lead, n, packed_k(mq.bits, k)), torch.uint8),
             (f"{base}.{SCALES}", (*lead, n, k // g), torch.float16)]
    if not mq.symmetric:
        specs.append((f"{base}.{QZEROS}", (*lead, n, k // g), torch.uint8))
    return specs


def expected_tensors(config: DbrxConfig, qconfig: QuantConfig | None) -> list[tuple[str, tuple[int, ...], torch.dtype | None]]:
    """What dbrxq.formats.checkpoint.check_checkpoint expects of a checkpoint with ``qconfig`` (None: a
    float one): name, shape and dtype of every tensor, None where any float dtype will do."""
    if qconfig is None:
        return float_specs(config)
    float_names = set(hub_tensor_shapes(config))
    return [(n, s, None if n in float_names else d) for n, s, d in quantized_tensor_specs(config, qconfig)]
