"""Slot layouts: a prepared expert's kernel weights <-> one flat uint8 storage.

Each slot of an expert cache is ONE storage holding every tensor of one expert's kernel weights (w1,
v1, w2 as prepared by quantize.kernels), so bringing an expert in is one copy into the slot, and a
slot never moves or reallocates. :class:`SlotLayout` maps the tensors of a prepared expert to
offsets in such a storage; :class:`MixedLayout` holds one layout per size class (per-expert recipes).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch

from quantize.modules import prepare_weight

_ALIGN = 64  # bytes; every tensor in a slot starts on a cache line (and any dtype's alignment)


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor], memo: dict[int, Any]) -> Any:
    """A copy of ``obj`` (tensor, dict, dataclass, or object with a __dict__ such as a
    PreparedWeight) with every tensor t replaced by fn(t); shared tensors stay shared (memo)."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = fn(obj)
        return memo[id(obj)]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn, memo) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(v, fn, memo) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn, memo)
                                           for f in dataclasses.fields(obj) if f.init})
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        new = copy.copy(obj)
        for k, v in vars(obj).items():
            if isinstance(v, (torch.Tensor, dict, tuple, list)) or dataclasses.is_dataclass(v):
                setattr(new, k, _map_tensors(v, fn, memo))
        return new
    return obj


class SlotLayout:
    """Where each tensor of a prepared expert goes in a flat uint8 storage of ``nbytes``.

    Built from one prepared expert (a tuple of kernel weights); every expert of the model has the
    same shapes, hence the same layout. Lazily-filled caches inside kernel weights (torch_int4's
    per-dtype scales) must be warm before the layout is taken, or they would outlive the bytes of
    a slot: :meth:`from_prepared` runs one matmul in ``act_dtype`` first.
    """

    def __init__(self, template: tuple):
        # keep shapes and dtypes only: the prepared expert the layout was taken from would otherwise
        # stay allocated beside the cache (one real-width expert: ~100 MB on the GPU or in RAM)
        self.template = template = _map_tensors(
            template, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"), {})
        self.entries: list[tuple[int, torch.Size, torch.dtype]] = []  # (offset, shape, dtype)
        self._index: dict[int, int] = {}  # id(tensor in template) -> entry

        def record(t: torch.Tensor) -> torch.Tensor:
            off = self.nbytes_unaligned
            self._index[id(t)] = len(self.entries)
            self.entries.append((off, t.shape, t.dtype))
            self.nbytes_unaligned = off + -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
            return t

        self.nbytes_unaligned = 0
        _map_tensors(template, record, {})
        self.nbytes = self.nbytes_unaligned

    @staticmethod
    def warm(prepared: tuple, act_dtype: torch.dtype) -> tuple:
        """Run one (1, K) matmul per weight so lazily-made tensors exist (and get a place)."""
        for w in prepared:
            w.matmul(torch.zeros(1, w.shape[1], dtype=act_dtype, device=w.device))
        return prepared

    @classmethod
    def from_prepared(cls, prepared: tuple, act_dtype: torch.dtype) -> SlotLayout:
        return cls(cls.warm(prepared, act_dtype))

    def _view(self, storage: torch.Tensor, i: int) -> torch.Tensor:
        off, shape, dtype = self.entries[i]
        n = shape.numel() * torch.empty(0, dtype=dtype).element_size()
        return storage[off:off + n].view(dtype).view(shape)

    def views(self, storage: torch.Tensor) -> tuple:
        """Kernel weights whose tensors are views of ``storage`` (built once per slot)."""
        assert storage.dtype == torch.uint8 and storage.numel() == self.nbytes, (storage.shape, self.nbytes)
        return _map_tensors(self.template, lambda t: self._view(storage, self._index[id(t)]), {})

    def pack(self, prepared: tuple, storage: torch.Tensor) -> None:
        """Copy the tensors of ``prepared`` (same shapes as the template) into ``storage``."""
        order: list[torch.Tensor] = []
        _map_tensors(prepared, lambda t: order.append(t) or t, {})
        assert len(order) == len(self.entries), (len(order), len(self.entries))
        for i, t in enumerate(order):
            self._view(storage, i).copy_(t.reshape(self.entries[i][1]))

    # one class: every expert has this layout (MixedLayout has several)
    def layout_of(self, layer: int, expert: int) -> SlotLayout:
        return self

    def nbytes_of(self, layer: int, expert: int) -> int:
        return self.nbytes

    @property
    def mixed(self) -> bool:
        return False


class MixedLayout:
    """The slot layouts of experts stored with different recipes (format_version 3): one
    :class:`SlotLayout` per recipe (a size class), ``of[layer][expert]`` the class of each expert.
    The cache keeps a pool of slots per class (:class:`ExpertCache`); the staging and scratch slots
    are as large as the largest class (``nbytes``), so they take any expert. An expert occupies the
    first ``nbytes_of`` bytes of its slot, and only those are read, copied and counted."""

    mixed = True

    def __init__(self, layouts: list[SlotLayout], of: list[list[int]]):
        self.layouts, self.of = list(layouts), [list(r) for r in of]
        self.nbytes = max(lay.nbytes for lay in self.layouts)
        self.template = tuple(w for lay in self.layouts for w in lay.template)  # every class's kernel weights

    def layout_of(self, layer: int, expert: int) -> SlotLayout:
        return self.layouts[self.of[layer][expert]]

    def nbytes_of(self, layer: int, expert: int) -> int:
        return self.layout_of(layer, expert).nbytes

    def sizes(self) -> list[int]:
        """Each expert's bytes, layer-major (the prepared file's per-expert lengths)."""
        return [self.layouts[c].nbytes for row in self.of for c in row]

    def describe(self) -> str:
        return "/".join(str(lay.nbytes) for lay in self.layouts)


def prepare_expert(canonical: tuple, backend: str | None, device: torch.device, act_dtype: torch.dtype) -> tuple:
    """(w1, v1, w2) QuantizedTensors -> warm kernel weights on ``device`` (quantize.modules' dispatch)."""
    return SlotLayout.warm(tuple(prepare_weight(qt, backend, device) for qt in canonical), act_dtype)


def expert_layout(canonical: tuple, backend: str | None, device: torch.device, act_dtype: torch.dtype) -> SlotLayout:
    """The slot layout of every expert (all share shapes): made from one expert."""
    return SlotLayout(prepare_expert(canonical, backend, device, act_dtype))


def layout_classes(layout) -> tuple[list[int], list[list[int]]] | None:
    """make_plan's ``classes`` for a MixedLayout (each class's bytes, each expert's class); None for one size."""
    return ([lay.nbytes for lay in layout.layouts], layout.of) if layout.mixed else None


def model_layout(experts: list, backend: str | None, device: torch.device, act_dtype: torch.dtype):
    """The slot layout of a model's experts (QExperts per layer): a :class:`SlotLayout` when they share
    a recipe, else a :class:`MixedLayout` with one class per recipe (made from its first expert)."""
    def recipe(qts):
        return tuple((qt.bits, qt.group_size, qt.symmetric) for qt in qts)
    classes: dict = {}
    of = []
    for mod in experts:
        row = []
        for e in range(mod.num_experts):
            qts = mod.expert_sources(e)
            key = recipe(qts)
            if key not in classes:
                classes[key] = (len(classes), expert_layout(qts, backend, device, act_dtype))
            row.append(classes[key][0])
        of.append(row)
    layouts = [lay for _, lay in sorted(classes.values(), key=lambda c: c[0])]
    return layouts[0] if len(layouts) == 1 else MixedLayout(layouts, of)
