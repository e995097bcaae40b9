"""The quantized checkpoint's tensors: which hub tensors a recipe quantizes, and the name, shape and
dtype of every tensor written (the one definition the writers, the loader's checks and the
allocator share).
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch

from dbrxq.core.errors import QuantizationError
from dbrxq.formats.checkpoint import float_specs, hub_tensor_shapes
from dbrxq.formats.shards import TensorSpec
from dbrxq.model.config import DbrxConfig
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


def quantized_tensor_specs(config: DbrxConfig, qconfig: QuantConfig, *,
                           float_dtype: torch.dtype | Mapping[str, torch.dtype] = torch.bfloat16
                           ) -> list[TensorSpec]:
    """Every tensor of the quantized checkpoint as ``(name, shape, dtype)``, in write order.

    Args:
        float_dtype: dtype of the unquantized tensors, one for all or per hub name.
    Raises:
        QuantizationError: quantized embeddings, a quantized lm_head tied to them, or a group size
            that does not divide a tensor's input dim (naming the tensor).
    """
    specs: list[TensorSpec] = []
    mix = qconfig.expert_mix
    for name, hub_shape, mq in quantized_plan(config, qconfig):
        if mq is None:
            dt = float_dtype if isinstance(float_dtype, torch.dtype) else float_dtype[name]
            specs.append((name, hub_shape, dt))
            continue
        kind = module_kind(name)
        *lead, n, k = logical_shape(name, hub_shape, kind, config)
        base = name.removesuffix(".weight")
        if kind == "experts" and mix is not None:  # one stack per recipe the layer uses (MIXED_PART)
            layer = int(name.split(".")[2])
            for j, opt in enumerate(mix.options):
                members = mix.members(layer, j)
                if members:
                    specs += weight_specs(f"{base}.{MIXED_PART.format(j)}", (len(members),), n, k, opt)
            continue
        specs += weight_specs(base, tuple(lead), n, k, mq)
    return specs


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
