"""Quantized drop-in modules for DBRX, and the one function that swaps them in.

- :class:`QLinear` replaces a bias-free ``nn.Linear`` (attention ``Wqkv`` / ``out_proj``, optionally
  ``lm_head``): buffers ``qweight``, ``scales`` (``qzeros``) in :mod:`quantize.format`'s layout.
- :class:`QExperts` replaces ``dbrxq.model.moe.DbrxExperts``: ``mlp.{w1,v1,w2}`` each hold
  ``qweight``/``scales``/(``qzeros``) with a leading expert dim, w1/v1 ``[E, F, D]``, w2
  ``[E, D, F]``, so one expert's bytes are ``t[e]`` of each tensor.
- In the ``blocks`` layout (format_version 4) :class:`QBlocksLinear` and :class:`QBlocksExperts` hold the
  CPU kernel's own bytes instead (``<name>.qblocks``; one ``ffn.experts.mlp.qblocks`` ``[E, stride]``
  per layer, an expert's w1, v1, w2 in one slot image: quantize.blocks), which the CPU kernel reads in
  place: loading them is a memory map. Their scales are checked on an expert's (a weight's) first use.
- :func:`quantize_model_modules` swaps them in (on meta, before a quantized checkpoint is
  assigned); :func:`quantize_model_rtn` quantizes a loaded float model in memory.

State-dict names are the hub's with ``.weight`` replaced, e.g.
``transformer.blocks.0.norm_attn_norm.attn.Wqkv.qweight`` and
``transformer.blocks.0.ffn.experts.mlp.w1.scales``. The buffers are the canonical bytes; the
kernel's own (possibly repacked) weight is made once by ``finalize_load`` via :func:`prepare_weight`,
the single place that picks a kernel. Moving a module after ``finalize_load`` needs another
``finalize_load``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import torch
from torch import nn

from dbrxq.core.errors import QuantizationError
from dbrxq.core.pages import PageReleaser, trim_heap
from dbrxq.model.moe import ACTIVATIONS, DbrxExperts, moe_dispatch
from quantize import kernels
from quantize.blocks import BLOCKS, BlocksTensor, ExpertSlot, weight_stored_bytes
from quantize.config import ModuleQuant, QuantConfig
from quantize.format import MIXED_PART, QWEIGHT, QZEROS, SCALES
from quantize.primitives import QuantizedTensor, packed_k, resolve_group_size
from quantize.rtn import EXPERT_KINDS, quantize_experts_rtn, quantize_rtn
from quantize.specs import resolve_layout

log = logging.getLogger(__name__)

__all__ = ["QLinear", "QExperts", "QWeight", "QBlocksLinear", "QBlocksExperts", "prepare_weight",
           "quantize_model_modules", "quantize_model_rtn"]


_WARNED: set[tuple[str, str]] = set()


def prepare_weight(qt: QuantizedTensor | BlocksTensor, backend: str | None, device: torch.device) -> Any:
    """The kernel weight for ``qt`` (``.matmul(x [..., K]) -> [..., N]``): the ONE dispatch point.

    ``backend`` None (or "auto") lets :func:`quantize.kernels.choose_backend` pick by device, bits
    and shape. A forced backend (``backend``, else $DBRXQ_BACKEND) runs every weight it can; the
    others (e.g. cpu_q4 forced on a recipe whose attention is int8) get the automatic choice, and
    a warning says so once per backend and reason. An unknown name is a QuantizationError.
    """
    forced = backend if backend not in (None, "auto") else (os.environ.get("DBRXQ_BACKEND") or None)
    if forced in (None, "auto"):
        return kernels.prepare(qt, "auto", device)
    if forced not in kernels.BACKENDS:
        raise QuantizationError(f"backend {forced!r} (from {'backend=' if backend else 'DBRXQ_BACKEND'}) is not one of "
                                f"{', '.join(kernels.BACKENDS)}")
    shape = tuple(qt.shape[-2:])
    why = kernels.backend_support(forced, device, qt.bits, qt.group_size, shape=shape, symmetric=qt.symmetric)
    if why is None:
        return kernels.prepare(qt, forced, device)
    chosen = kernels.choose_backend(device, qt.bits, qt.group_size, shape=shape, symmetric=qt.symmetric,
                                    override="auto")
    if (forced, why) not in _WARNED:
        _WARNED.add((forced, why))
        log.warning("backend %s cannot run %d-bit weights with group size %d (%s): those use %s",
                    forced, qt.bits, qt.group_size, why, chosen)
    return kernels.prepare(qt, chosen, device)


# --------------------------------------------------------------------------------------------
# Buffers in the canonical layout
# --------------------------------------------------------------------------------------------
class QWeight(nn.Module):
    """Holds one quantized weight of logical shape ``[*lead, N, K]`` as buffers.

    ``qweight`` uint8 ``[*lead, N, K//2]`` (4-bit) or ``[*lead, N, K]`` (8-bit), ``scales`` float16
    ``[*lead, N, K//G]``, ``qzeros`` uint8 ``[*lead, N, K//G]`` only when asymmetric. The dtypes are
    explicit because the loader builds the model on meta under a float default dtype. No forward:
    :class:`QLinear` and :class:`QExperts` compute with it.
    """

    def __init__(self, shape: tuple[int, ...], mq: ModuleQuant, *, device: torch.device | None = None,
                 name: str = "") -> None:
        super().__init__()
        assert mq.quantized, mq
        *lead, n, k = shape
        try:
            g = resolve_group_size(mq.group_size, k, mq.bits)
        except QuantizationError as e:
            raise QuantizationError(f"{name or 'weight'} {list(shape)}: {e}") from None
        self.bits, self.group_size, self.shape = mq.bits, mq.group_size, torch.Size(shape)
        self.register_buffer(QWEIGHT, torch.empty(*lead, n, packed_k(mq.bits, k), dtype=torch.uint8, device=device))
        self.register_buffer(SCALES, torch.empty(*lead, n, k // g, dtype=torch.float16, device=device))
        if not mq.symmetric:
            self.register_buffer(QZEROS, torch.empty(*lead, n, k // g, dtype=torch.uint8, device=device))
        else:
            self.qzeros = None  # a plain attribute: not part of the state dict

    def quantized(self, index: int | None = None) -> QuantizedTensor:
        """The weight (or, with ``index``, slice ``[index]`` of the leading dim) as views."""
        q, s, z = self.qweight, self.scales, self.qzeros
        shape = self.shape
        if index is not None:
            q, s, z, shape = q[index], s[index], None if z is None else z[index], shape[1:]
        return QuantizedTensor(q, s, z, self.bits, self.group_size, shape)

    @torch.no_grad()
    def copy_from(self, qt: QuantizedTensor) -> None:
        """Fill the buffers from ``qt`` (same spec); used by the in-memory RTN path."""
        assert (qt.bits, qt.group_size, tuple(qt.shape), qt.symmetric) == \
            (self.bits, self.group_size, tuple(self.shape), self.qzeros is None), (qt, self.shape)
        self.qweight.copy_(qt.qweight)
        self.scales.copy_(qt.scales)
        if qt.qzeros is not None:
            self.qzeros.copy_(qt.qzeros)

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, bits={self.bits}, group_size={self.group_size}, " \
               f"symmetric={self.qzeros is None}"


def _check_loaded(w: QWeight, what: str) -> None:
    if w.qweight.is_meta:
        raise QuantizationError(f"{what}: finalize_load called before the quantized tensors were loaded")


class QLinear(QWeight):
    """Bias-free ``nn.Linear`` replacement: ``y = x @ W.T`` with W in the canonical layout."""

    def __init__(self, in_features: int, out_features: int, mq: ModuleQuant, *,
                 device: torch.device | None = None, name: str = "") -> None:
        super().__init__((out_features, in_features), mq, device=device, name=name)
        self.in_features, self.out_features = in_features, out_features
        self._prepared: Any = None

    def finalize_load(self, backend: str | None = None, device: torch.device | None = None) -> None:
        """Make the kernel weight from the loaded buffers, on ``device`` (default: theirs)."""
        _check_loaded(self, "QLinear")
        self._prepared = prepare_weight(self.quantized(), backend, device or self.qweight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[..., K]`` -> ``[..., N]`` in x's dtype."""
        assert self._prepared is not None, "QLinear used before finalize_load()"
        return self._prepared.matmul(x)

    @property
    def row_independent(self) -> bool:
        """dbrxq's C kernels compute each row alone, bit for bit (dbrxq.model.batch.batch_invariant)."""
        return isinstance(self._prepared, kernels.CpuQWeight)


# --------------------------------------------------------------------------------------------
# Experts
# --------------------------------------------------------------------------------------------
class QMixedWeight(nn.Module):
    """One kind (w1, v1 or w2) of a layer's experts stored with several recipes (format_version 3):
    a :class:`QWeight` stack per recipe the layer uses, named ``o{j}`` (quantize.format.MIXED_PART),
    holding that recipe's experts in increasing id. ``quantized(e)`` finds expert e in its stack."""

    def __init__(self, shape: tuple[int, int], options: tuple[ModuleQuant, ...], choice: tuple[int, ...], *,
                 device: torch.device | None = None, name: str = "") -> None:
        super().__init__()
        members: dict[int, list[int]] = {}
        for e, j in enumerate(choice):
            members.setdefault(j, []).append(e)
        for j in sorted(members):
            part = MIXED_PART.format(j)
            self.add_module(part, QWeight((len(members[j]), *shape), options[j], device=device, name=f"{name}.{part}"))
        rank = {e: (MIXED_PART.format(j), r) for j, es in members.items() for r, e in enumerate(es)}
        self.where: list[tuple[str, int]] = [rank[e] for e in range(len(choice))]  # expert -> (stack, index in it)

    def quantized(self, index: int | None = None) -> QuantizedTensor:
        assert index is not None, "a mixed stack has no single tensor: ask for one expert"
        part, r = self.where[index]
        return getattr(self, part).quantized(r)


class QExpertGLU(nn.Module):
    """``w1``, ``v1`` ``[E, F, D]`` and ``w2`` ``[E, D, F]``, each a :class:`QWeight` (or, with
    per-expert recipes, a :class:`QMixedWeight`)."""

    def __init__(self, num_experts: int, ffn: int, d_model: int, mq: ModuleQuant, *,
                 device: torch.device | None = None, name: str = "",
                 mix: tuple[tuple[ModuleQuant, ...], tuple[int, ...]] | None = None) -> None:
        super().__init__()
        shapes = {"w1": (num_experts, ffn, d_model), "v1": (num_experts, ffn, d_model),
                  "w2": (num_experts, d_model, ffn)}
        for kind in EXPERT_KINDS:
            if mix is None:
                setattr(self, kind, QWeight(shapes[kind], mq, device=device, name=f"{name}.{kind}"))
            else:
                setattr(self, kind, QMixedWeight(shapes[kind][1:], *mix, device=device, name=f"{name}.{kind}"))


class PreparedExperts(nn.Module):
    """Experts computing with prepared kernel weights, one ``(w1, v1, w2)`` per expert (each with
    ``.matmul``): expert e is ``(act(x @ w1.T) * (x @ v1.T)) @ w2.T``. A layer whose experts are all on
    the C kernel runs in one call (:func:`quantize.kernels.moe`). Built directly from weights (a GGUF
    file's, dbrxq.loading.gguf), or by :class:`QExperts` from its buffers."""

    # A layer's step in one call (x, expert_ids, weights) -> out, set from above (quantize.triton_moe on a GPU)
    fused_moe: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __init__(self, num_experts: int, ffn_hidden_size: int, act: Callable[[torch.Tensor], torch.Tensor],
                 prepared: list[tuple[Any, Any, Any]] | None = None) -> None:
        super().__init__()
        self.num_experts, self.ffn_hidden_size, self.act = num_experts, ffn_hidden_size, act
        self._prepared: list[tuple[Any, Any, Any]] | None = None
        if prepared is not None:
            assert len(prepared) == num_experts
            self._prepared = [tuple(p) for p in prepared]
            self._prepared_changed()

    def set_prepared(self, e: int, prepared: tuple[Any, Any, Any]) -> None:
        """Replace expert e's kernel weights (for an offloading cache that moved them)."""
        assert self._prepared is not None and len(prepared) == 3
        self._prepared[e] = tuple(prepared)
        self._prepared_changed()

    def _prepared_changed(self) -> None:
        self._row_independent = all(isinstance(w, kernels.CpuQWeight) for p in self._prepared for w in p)
        self._table = kernels.moe_table(self._prepared, self.act)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """x ``(n, D)`` -> ``(n, D)`` through expert e."""
        assert self._prepared is not None, f"{type(self).__name__} used before its weights were prepared"
        return kernels.glu(x, *self._prepared[e], self.act, out_dtype=torch.float32)

    @property
    def row_independent(self) -> bool:
        """Every expert on dbrxq's C kernels, which compute each row alone (dbrxq.model.batch.batch_invariant)."""
        return self._prepared is not None and self._row_independent

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.fused_moe is not None:
            return self.fused_moe(x, expert_ids, weights)
        if self._table is not None:  # every expert on the C kernel: the layer in one call (the same bits)
            return kernels.moe(x, expert_ids, weights, self._table, self._prepared)
        return moe_dispatch(x, expert_ids, weights, self.num_experts, self.expert, self.row_independent)


class PreparedLinear(nn.Module):
    """Bias-free ``nn.Linear`` replacement computing with one prepared kernel weight (a GGUF file's)."""

    def __init__(self, prepared: Any) -> None:
        super().__init__()
        self._prepared = prepared
        self.out_features, self.in_features = prepared.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._prepared.matmul(x)

    @property
    def row_independent(self) -> bool:
        return isinstance(self._prepared, kernels.CpuQWeight)

    def extra_repr(self) -> str:
        return repr(self._prepared)


class QExperts(PreparedExperts):
    """Drop-in for ``DbrxExperts``: same attributes and ``forward(x, expert_ids, weights)``.

    Expert e computes ``(act(x @ w1[e].T) * (x @ v1[e].T)) @ w2[e].T`` with the prepared per-expert
    kernel weights; :meth:`expert_weights` gives one expert's canonical tensors (views), which is
    what an offloading cache moves.
    """

    def __init__(self, config, mq: ModuleQuant, *, device: torch.device | None = None,
                 name: str = "experts", mix: tuple[tuple[ModuleQuant, ...], tuple[int, ...]] | None = None) -> None:
        super().__init__(config.num_experts, config.ffn_hidden_size, ACTIVATIONS[config.activation])
        self.mixed = mix is not None  # per-expert recipes (format_version 3)
        self.mlp = QExpertGLU(config.num_experts, config.ffn_hidden_size, config.d_model, mq,
                              device=device, name=f"{name}.mlp", mix=mix)

    def expert_weights(self, e: int) -> tuple[QuantizedTensor, QuantizedTensor, QuantizedTensor]:
        """Expert e's (w1 ``[F, D]``, v1 ``[F, D]``, w2 ``[D, F]``): contiguous views of the buffers."""
        return tuple(getattr(self.mlp, kind).quantized(e) for kind in EXPERT_KINDS)

    expert_sources = expert_weights  # what prepare_weight takes (QBlocksExperts: the kernel's bytes)

    def finalize_load(self, backend: str | None = None, device: torch.device | None = None) -> None:
        """Prepare the kernel weights of every expert, each from its own slices, on ``device``
        (default: the buffers')."""
        for kind in EXPERT_KINDS:
            for w in (getattr(self.mlp, kind).children() if self.mixed else [getattr(self.mlp, kind)]):
                _check_loaded(w, f"QExperts.mlp.{kind}")
        dev = device or self.mlp.w1.qweight.device
        self._prepared = []
        release = PageReleaser()
        for e in range(self.num_experts):
            canonical = self.expert_weights(e)
            self._prepared.append(tuple(prepare_weight(qt, backend, dev) for qt in canonical))
            # Per expert, so a resident load peaks near the repacked size: the canonical pages the
            # repack touched (file-backed when loaded from disk) and its freed temporaries go back.
            for qt in canonical:
                for t in (qt.qweight, qt.scales, qt.qzeros):
                    if t is not None:
                        release(t)
            trim_heap()
        self._prepared_changed()


# --------------------------------------------------------------------------------------------
# The blocks layout: the CPU kernel's bytes, stored
# --------------------------------------------------------------------------------------------
def in_place(module: nn.Module) -> bool:
    """Whether ``module`` computes from its stored bytes as they are (the blocks layout): the loader
    then leaves its pages alone instead of giving back what a repack touched."""
    return isinstance(module, (QBlocksLinear, QBlocksExperts))


def _check_numbers(source: BlocksTensor, what: str) -> None:
    source.check_numbers(what)


class QBlocksLinear(nn.Module):
    """Bias-free ``nn.Linear`` replacement whose weight is stored in the kernel's blocks: buffer
    ``qblocks`` uint8 ``[whole pages]`` (quantize.blocks). The CPU kernel computes from it in place;
    other backends get the canonical codes, unpacked once at ``finalize_load``."""

    def __init__(self, in_features: int, out_features: int, mq: ModuleQuant, *,
                 device: torch.device | None = None, name: str = "") -> None:
        super().__init__()
        assert mq.quantized, mq
        self.in_features, self.out_features, self.name = in_features, out_features, name
        self.bits, self.group_size, self.asym = mq.bits, mq.group_size, not mq.symmetric
        n = weight_stored_bytes(mq.bits, out_features, in_features, mq.group_size, self.asym)
        self.register_buffer(BLOCKS, torch.empty(n, dtype=torch.uint8, device=device))
        self._prepared: Any = None
        self._checked = False

    def source(self) -> BlocksTensor:
        return BlocksTensor(self.qblocks, self.bits, self.group_size, (self.out_features, self.in_features),
                            self.asym)

    def quantized(self) -> QuantizedTensor:
        """The canonical weight (unpacked from the blocks; exact)."""
        return self.source().quantized()

    def finalize_load(self, backend: str | None = None, device: torch.device | None = None) -> None:
        if self.qblocks.is_meta:
            raise QuantizationError("QBlocksLinear: finalize_load called before the quantized tensors were loaded")
        self._prepared = prepare_weight(self.source(), backend, device or self.qblocks.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self._prepared is not None, "QBlocksLinear used before finalize_load()"
        if not self._checked:  # the numbers, on first use (the pages are about to be read anyway)
            _check_numbers(self.source(), f"tensor {self.name}.{BLOCKS}")
            self._checked = True
        return self._prepared.matmul(x)

    @property
    def row_independent(self) -> bool:
        return isinstance(self._prepared, kernels.CpuQWeight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"group_size={self.group_size}, symmetric={not self.asym}, layout=blocks"


class QBlocksExperts(nn.Module):
    """Drop-in for ``DbrxExperts`` storing a layer's experts in the kernel's blocks: ``mlp.qblocks``
    uint8 ``[E, stride]``, one slot image per expert (w1, v1, w2: quantize.blocks.ExpertSlot); with
    per-expert recipes one stack ``mlp.o{j}.qblocks`` ``[E_j, stride_j]`` per recipe in use. On CPU every
    expert computes from its stored bytes in place; an expert's scales are checked on its first use."""

    fused_moe = PreparedExperts.fused_moe  # as PreparedExperts'

    def __init__(self, config, mq: ModuleQuant, *, device: torch.device | None = None,
                 name: str = "experts", mix: tuple[tuple[ModuleQuant, ...], tuple[int, ...]] | None = None) -> None:
        super().__init__()
        self.num_experts, self.ffn_hidden_size, self.name = config.num_experts, config.ffn_hidden_size, name
        self.act: Callable[[torch.Tensor], torch.Tensor] = ACTIVATIONS[config.activation]
        self.mixed = mix is not None
        recipes = [mq] if mix is None else list(mix[0])
        choice = [0] * self.num_experts if mix is None else list(mix[1])
        self.slots = {j: ExpertSlot(r.bits, r.group_size, not r.symmetric, config.d_model, config.ffn_hidden_size)
                      for j, r in enumerate(recipes) if j in choice}
        self.mlp = nn.Module()
        stacks = {}
        for j in sorted(self.slots):
            members = [e for e in range(self.num_experts) if choice[e] == j]
            holder = self.mlp
            if self.mixed:  # a stack per recipe: mlp.o{j}.qblocks
                holder = nn.Module()
                self.mlp.add_module(MIXED_PART.format(j), holder)
            holder.register_buffer(BLOCKS, torch.empty(len(members), self.slots[j].stride, dtype=torch.uint8,
                                                       device=device))
            stacks[j] = (holder, members)
        self._stacks = stacks
        # expert -> (recipe, index in its stack)
        self.where = [(choice[e], stacks[choice[e]][1].index(e)) for e in range(self.num_experts)]
        self._prepared: list[tuple[Any, Any, Any]] | None = None
        self._checked: set[int] = set()

    def slot_of(self, e: int) -> tuple[torch.Tensor, ExpertSlot]:
        """Expert e's stored slot image (a view) and its layout."""
        j, r = self.where[e]
        return getattr(self._stacks[j][0], BLOCKS)[r], self.slots[j]

    def expert_sources(self, e: int) -> tuple[BlocksTensor, BlocksTensor, BlocksTensor]:
        """Expert e's (w1, v1, w2) as the kernel's bytes (views of the stored slot image)."""
        slot, lay = self.slot_of(e)
        return tuple(BlocksTensor(v, lay.bits, lay.group_size, shape, lay.asym)
                     for v, shape in zip(lay.views(slot), lay.shapes()))

    def expert_weights(self, e: int) -> tuple[QuantizedTensor, QuantizedTensor, QuantizedTensor]:
        """Expert e's canonical (w1, v1, w2), unpacked from its slot image (exact; allocates)."""
        return tuple(s.quantized() for s in self.expert_sources(e))

    def check_expert(self, e: int) -> None:
        """Refuse expert e if its stored scales or zeros are damaged (once per expert)."""
        if e in self._checked:
            return
        for kind, source in zip(EXPERT_KINDS, self.expert_sources(e)):
            _check_numbers(source, f"tensor {self.name}.mlp.{BLOCKS}: expert {e} {kind}")
        self._checked.add(e)

    def finalize_load(self, backend: str | None = None, device: torch.device | None = None) -> None:
        if any(getattr(h, BLOCKS).is_meta for h, _ in self._stacks.values()):
            raise QuantizationError("QBlocksExperts: finalize_load called before the quantized tensors were loaded")
        dev = device or getattr(next(iter(self._stacks.values()))[0], BLOCKS).device
        self._prepared = [tuple(prepare_weight(s, backend, dev) for s in self.expert_sources(e))
                          for e in range(self.num_experts)]
        self._prepared_changed()

    def set_prepared(self, e: int, prepared: tuple[Any, Any, Any]) -> None:
        assert self._prepared is not None and len(prepared) == 3
        self._prepared[e] = tuple(prepared)
        self._prepared_changed()

    _prepared_changed = QExperts._prepared_changed

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        assert self._prepared is not None, "QBlocksExperts used before finalize_load()"
        if e not in self._checked:
            self.check_expert(e)
        return kernels.glu(x, *self._prepared[e], self.act, out_dtype=torch.float32)

    row_independent = QExperts.row_independent

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.fused_moe is not None:  # the stacks it computes from were checked when they were made
            return self.fused_moe(x, expert_ids, weights)
        if self._table is not None:  # every expert on the C kernel: the layer in one call (the same bits)
            if len(self._checked) < self.num_experts:  # the experts this step meets, on their first use
                for e in set(expert_ids.reshape(-1).tolist()) - self._checked:
                    self.check_expert(e)
            return kernels.moe(x, expert_ids, weights, self._table, self._prepared)
        return moe_dispatch(x, expert_ids, weights, self.num_experts, self.expert, self.row_independent)


# --------------------------------------------------------------------------------------------
# Swapping
# --------------------------------------------------------------------------------------------
def _as_qconfig(quantization_config: dict | QuantConfig) -> QuantConfig:
    if isinstance(quantization_config, QuantConfig):
        return quantization_config
    return QuantConfig.from_dict(quantization_config)


def _targets(model: nn.Module, qc: QuantConfig):
    """Yield ``(parent, attribute, full name, kind)`` of every module ``qc`` quantizes."""
    if qc.embed.quantized:
        raise QuantizationError("quantization_config.embed: quantized embeddings are not supported yet; "
                                "set embed.bits to null")
    for i, block in enumerate(model.transformer.blocks):
        attn = block.norm_attn_norm.attn
        if qc.attn.quantized:
            for attr in ("Wqkv", "out_proj"):
                yield attn, attr, f"transformer.blocks.{i}.norm_attn_norm.attn.{attr}", "attn"
        if qc.experts.quantized:
            yield block.ffn, "experts", f"transformer.blocks.{i}.ffn.experts", "experts"
    if qc.lm_head.quantized:
        if model.lm_head is None:
            raise QuantizationError("quantization_config.lm_head: this model ties lm_head to the "
                                    "embeddings, which stay unquantized; set lm_head.bits to null")
        yield model, "lm_head", "lm_head", "lm_head"


def _replacement(old: nn.Module, mq: ModuleQuant, config, name: str, device, qc: QuantConfig | None = None) -> nn.Module:
    blocks = qc is not None and qc.layout == "blocks"
    if isinstance(old, DbrxExperts):
        mix = None
        if qc is not None and qc.expert_mix is not None:
            mix = (qc.expert_mix.options, qc.expert_mix.choice[int(name.split(".")[2])])
        if blocks:
            return QBlocksExperts(config, mq, device=device, name=name, mix=mix)
        return QExperts(config, mq, device=device, name=name, mix=mix)
    assert isinstance(old, nn.Linear) and old.bias is None, (name, old)
    if blocks:
        return QBlocksLinear(old.in_features, old.out_features, mq, device=device, name=name)
    return QLinear(old.in_features, old.out_features, mq, device=device, name=name)


def quantize_model_modules(model: nn.Module, quantization_config: dict | QuantConfig) -> nn.Module:
    """Swap, in place, the modules ``quantization_config`` quantizes for empty quantized ones.

    Attention ``Wqkv``/``out_proj`` and ``lm_head`` become :class:`QLinear`, each layer's
    ``DbrxExperts`` a :class:`QExperts`; kinds with bits None stay float. New buffers go on the
    replaced module's device (meta when the loader builds the model). Returns ``model``.

    Raises:
        QuantizationError: an unreadable quantization_config, quantized embeddings (not supported),
            or a group size that does not divide a module's input dim (naming the module).
    """
    qc = resolve_layout(model.config, _as_qconfig(quantization_config))
    for parent, attr, name, kind in list(_targets(model, qc)):
        old = getattr(parent, attr)
        device = next(old.parameters()).device
        setattr(parent, attr, _replacement(old, qc.for_kind(kind), model.config, name, device, qc))
    return model


@torch.no_grad()
def quantize_model_rtn(model: nn.Module, qconfig: dict | QuantConfig, *,
                       backend: str | None = None) -> nn.Module:
    """RTN-quantize a loaded float model in place (same swap as the loader, buffers filled from the
    float weights with quantize.rtn), then prepare the kernels. Returns ``model``.

    Codes and scales equal those :func:`quantize.writer.quantize_checkpoint` writes for the same
    float weights, so the two paths give the same logits with the same backend.
    """
    qc = dataclasses.replace(_as_qconfig(qconfig), layout="canonical")  # in memory: canonical buffers
    if qc.expert_mix is not None:
        raise QuantizationError("quantize_model_rtn: per-expert recipes (expert_mix) come from calibration "
                                "(calibration.pipeline); this in-memory path quantizes every expert alike")
    for parent, attr, name, kind in list(_targets(model, qc)):
        old = getattr(parent, attr)
        mq = qc.for_kind(kind)
        device = next(old.parameters()).device
        new = _replacement(old, mq, model.config, name, device)
        if isinstance(new, QExperts):
            for k in EXPERT_KINDS:
                qt = quantize_experts_rtn(getattr(old.mlp, k), k, new.num_experts, mq.bits,
                                          mq.group_size, mq.symmetric)
                getattr(new.mlp, k).copy_from(qt)
        else:
            new.copy_from(quantize_rtn(old.weight, mq.bits, mq.group_size, mq.symmetric))
        new.finalize_load(backend=backend)
        setattr(parent, attr, new)
    return model
