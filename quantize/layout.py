"""Between the two layouts of a quantized checkpoint's tensors: canonical (``qweight``/``scales``/
``qzeros`` per weight, experts stacked per kind) and blocks (the CPU kernel's bytes: ``<name>.qblocks``,
a layer's experts one ``[E, stride]`` tensor of slot images). Both directions are exact, so any
checkpoint converts either way without changing a number (``dbrxq convert``), and every consumer of
the canonical codes (GGUF export, the GPU kernels, the calibration pipeline's propagation) reads a
blocks checkpoint through :func:`to_canonical`.
"""

from __future__ import annotations

import torch

from dbrxq.model.config import DbrxConfig
from quantize.blocks import BLOCKS, PAGE, pack, unpack
from quantize.config import QuantConfig
from quantize.format import MIXED_PART, QWEIGHT, QZEROS, SCALES
from quantize.primitives import QuantizedTensor
from quantize.rtn import EXPERT_KINDS
from quantize.specs import expert_slot, expert_stack, module_kind

_EXPERTS = ".ffn.experts.mlp."


def _canonical(tensors: dict[str, torch.Tensor], base: str, bits: int, group_size: int) -> QuantizedTensor:
    return QuantizedTensor.from_tensors(tensors, base, bits, group_size)


def _padded(t: torch.Tensor, nbytes: int) -> torch.Tensor:
    out = torch.zeros(nbytes, dtype=torch.uint8)
    out[: t.numel()] = t
    return out


def _stacks(layer: int, config: DbrxConfig, qconfig: QuantConfig) -> list[tuple[int | None, object, list[int]]]:
    """(recipe index or None, recipe, member experts) of each stack of ``layer``."""
    mix = qconfig.expert_mix
    if mix is None:
        return [(None, qconfig.experts, list(range(config.num_experts)))]
    return [(j, o, mix.members(layer, j)) for j, o in enumerate(mix.options) if mix.members(layer, j)]


def expert_to_slot(w1: QuantizedTensor, v1: QuantizedTensor, w2: QuantizedTensor, config: DbrxConfig,
                   mq) -> torch.Tensor:
    """One expert's canonical weights as its stored slot image."""
    return expert_slot(config, mq).pack(w1, v1, w2)


def to_blocks(tensors: dict[str, torch.Tensor], config: DbrxConfig, qconfig: QuantConfig) -> dict[str, torch.Tensor]:
    """``tensors`` (a part of a canonical checkpoint: whole weights, whole layers' experts) with every
    quantized weight in the blocks layout; float tensors unchanged."""
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for name in tensors:
        if not name.endswith((QWEIGHT, SCALES, QZEROS)):
            out[name] = tensors[name]
            continue
        base = name.rsplit(".", 1)[0]
        if _EXPERTS in base:
            layer = int(base.split(".")[2])
            if layer in done:
                continue
            done.add(layer)
            for j, mq, members in _stacks(layer, config, qconfig):
                part = "" if j is None else f".{MIXED_PART.format(j)}"
                stack = f"transformer.blocks.{layer}.ffn.experts.mlp."
                qts = {k: _canonical(tensors, f"{stack}{k}{part}", mq.bits, mq.group_size) for k in EXPERT_KINDS}
                slot = expert_slot(config, mq)
                img = torch.empty(len(members), slot.stride, dtype=torch.uint8)
                for r in range(len(members)):
                    img[r] = slot.pack(*(_one(qts[k], r) for k in EXPERT_KINDS))
                out[expert_stack(layer, j)] = img
            continue
        if base in done:
            continue
        done.add(base)
        mq = qconfig.for_kind(module_kind(f"{base}.weight"))
        qt = _canonical(tensors, base, mq.bits, mq.group_size)
        b = pack(qt)
        out[f"{base}.{BLOCKS}"] = _padded(b, -(-b.numel() // PAGE) * PAGE)
    return out


def _one(qt: QuantizedTensor, r: int) -> QuantizedTensor:
    z = None if qt.qzeros is None else qt.qzeros[r]
    return QuantizedTensor(qt.qweight[r], qt.scales[r], z, qt.bits, qt.group_size, tuple(qt.shape[1:]))


def to_canonical(tensors: dict[str, torch.Tensor], config: DbrxConfig, qconfig: QuantConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_blocks`: every ``qblocks`` tensor in ``tensors`` as the canonical
    qweight/scales(/qzeros) tensors (experts stacked per kind, per recipe with expert_mix)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not name.endswith(f".{BLOCKS}"):
            out[name] = t
            continue
        base = name.removesuffix(f".{BLOCKS}")
        if ".ffn.experts.mlp" in base:
            layer = int(base.split(".")[2])
            j = None if base.endswith(".mlp") else int(base.rsplit(".o", 1)[1])
            mq = qconfig.experts if j is None else qconfig.expert_mix.options[j]
            slot = expert_slot(config, mq)
            per = [slot.unpack(t[r]) for r in range(t.shape[0])]
            part = "" if j is None else f".{MIXED_PART.format(j)}"
            for i, k in enumerate(EXPERT_KINDS):
                stack = f"transformer.blocks.{layer}.ffn.experts.mlp.{k}{part}"
                out[f"{stack}.{QWEIGHT}"] = torch.stack([p[i].qweight for p in per])
                out[f"{stack}.{SCALES}"] = torch.stack([p[i].scales for p in per])
                if not mq.symmetric:
                    out[f"{stack}.{QZEROS}"] = torch.stack([p[i].qzeros for p in per])
            continue
        mq = qconfig.for_kind(module_kind(f"{base}.weight"))
        n, k = _weight_shape(base, config)
        out.update(unpack(t, mq.bits, n, k, mq.group_size, not mq.symmetric).tensors(base))
    return out


def _weight_shape(base: str, config: DbrxConfig) -> tuple[int, int]:
    if base.endswith(".attn.Wqkv"):
        return config.qkv_out_features, config.d_model
    if base.endswith(".attn.out_proj"):
        return config.d_model, config.d_model
    assert base == "lm_head", base
    return config.vocab_size, config.d_model
