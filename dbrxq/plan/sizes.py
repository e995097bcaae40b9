"""Sizes for the placement plan: from a checkpoint's headers and ONE expert's bytes before anything
is loaded, or from a model already in memory.
"""

from __future__ import annotations

import torch
from torch import nn

from dbrxq.core.pages import PageReleaser
from dbrxq.plan.slots import MixedLayout, SlotLayout, expert_layout
from quantize.blocks import BLOCKS, BlocksTensor
from quantize.config import QuantConfig
from quantize.format import MIXED_PART
from quantize.primitives import QuantizedTensor
from quantize.specs import expert_slot, expert_stack


def canonical_nbytes(canonical: tuple) -> int:
    return sum(t.numel() * t.element_size() for qt in canonical for t in (qt.qweight, qt.scales, qt.qzeros)
               if t is not None)


def non_expert_bytes_of(model: nn.Module) -> int:
    """Bytes of the model's tensors outside the experts, plus quantized layers' kernel copies."""
    total, seen = 0, set()
    for name, m in model.named_modules():
        if ".experts" in name:
            continue
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if t is not None and id(t) not in seen and not t.is_meta:
                seen.add(id(t))
                total += t.numel() * t.element_size()
        prepared = getattr(m, "_prepared", None)
        if prepared is not None and hasattr(prepared, "nbytes"):
            total += prepared.nbytes
    return total


_QUANT_SUFFIXES = (".qweight", ".scales", ".qzeros")


def source_nbytes(sources: tuple) -> int:
    """Stored bytes of one expert: its canonical tensors, or (blocks layout) its kernel bytes."""
    return sum(s.nbytes if isinstance(s, BlocksTensor) else canonical_nbytes((s,)) for s in sources)


def checkpoint_sizes(reader, config, backend: str | None, device: torch.device, act_dtype: torch.dtype):
    """(non-expert bytes, expert stored bytes, slot layout) from headers and ONE expert's bytes.

    Non-expert: float tensors in the activation dtype; quantized ones (attention) in the canonical
    layout on a CPU twice, for the canonical buffers and the kernel's copy made by finalize_load (on a
    GPU, the copy alone); in the blocks layout once (the CPU kernel reads the mapped bytes; a GPU holds
    its own copy, the stored bytes staying file-backed and untouched).
    """

    non_expert = 0
    for name in reader.keys():
        if ".ffn.experts." in name:
            continue
        numel = 1
        for d in reader.shape(name):
            numel *= d
        dt = reader.dtype(name)
        if name.endswith(f".{BLOCKS}"):
            non_expert += numel
        elif name.endswith(_QUANT_SUFFIXES):
            # CPU: the canonical buffers and the kernel's copy; a GPU holds the kernel's copy alone (the
            # canonical bytes stay file-backed on the host), whose scale/zero pairs may take 2x the scales
            copies = 2 if device.type == "cpu" or name.endswith(".scales") else 1
            non_expert += copies * numel * torch.empty(0, dtype=dt).element_size()
        elif name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        else:
            non_expert += numel * torch.empty(0, dtype=act_dtype if dt.is_floating_point else dt).element_size()
    qc = QuantConfig.from_dict(config.quantization_config)
    mix = qc.expert_mix
    F_, D = config.ffn_hidden_size, config.d_model

    def first_expert(layer: int, stack: str, index: int, mq) -> tuple:
        """One expert's canonical tensors (or blocks) from the headers' tensors (mapped, read for the repack)."""
        if qc.layout == "blocks":
            j = None if not stack else int(stack.removeprefix(".o"))
            slot = expert_slot(config, mq)
            img = reader.get(expert_stack(layer, j))[index]
            return tuple(BlocksTensor(v, mq.bits, mq.group_size, shape, not mq.symmetric)
                         for v, shape in zip(slot.views(img), slot.shapes()))
        canonical = []
        for kind, shape in (("w1", (F_, D)), ("v1", (F_, D)), ("w2", (D, F_))):
            base = f"transformer.blocks.{layer}.ffn.experts.mlp.{kind}{stack}"
            z = reader.get(f"{base}.qzeros")[index] if f"{base}.qzeros" in reader else None
            canonical.append(QuantizedTensor(reader.get(f"{base}.qweight")[index], reader.get(f"{base}.scales")[index],
                                             z, mq.bits, mq.group_size, shape))
        return tuple(canonical)

    def layout_of(canonical: tuple) -> SlotLayout:
        layout = expert_layout(canonical, backend, device, act_dtype)
        # The repack read the expert's canonical pages through a mapping the loaded model keeps open: give
        # them back, or they stay in RSS outside every budget (97 MiB at real width: the real-width case
        # of tests/dbrxq/test_offload.py's peak-RSS test fails without this). (A PageReleaser made
        # now, after the reads: it knows only the file mappings that exist when it is made.)
        release = PageReleaser()
        for qt in canonical:
            for t in ((qt.blocks,) if isinstance(qt, BlocksTensor) else (qt.qweight, qt.scales, qt.qzeros)):
                if t is not None:
                    release(t)
        return layout
    if mix is None:
        canonical = first_expert(0, "", 0, qc.experts)
        return non_expert, source_nbytes(canonical), layout_of(canonical)
    # per-expert recipes: one layout per recipe in use (a size class), from its first expert
    layouts, index, most = [], {}, 0
    for j, opt in enumerate(mix.options):
        where = next(((i, mix.members(i, j)) for i in range(config.n_layers) if mix.members(i, j)), None)
        if where is None:
            continue
        canonical = first_expert(where[0], "." + MIXED_PART.format(j), 0, opt)
        most = max(most, source_nbytes(canonical))
        index[j] = len(layouts)
        layouts.append(layout_of(canonical))
    return non_expert, most, MixedLayout(layouts, [[index[j] for j in row] for row in mix.choice])
