"""A model-agnostic expert cache: per-layer caches over fixed-size byte slots (mixtral-offloading's
design).

The cache knows (layer, expert) ids, slots and counters, nothing about DBRX; a slot's bytes follow
a dbrxq.plan.slots layout. Eviction is pluggable (:class:`EvictionPolicy`: :class:`LRU`, or
:class:`DecayedLFU` with frequency-aware admission), one instance per layer; :func:`simulate`
replays a routing trace through the same steps (scripts/bench_placement.py).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from dbrxq.core.pages import aligned_empty, whole_pages
from dbrxq.plan.slots import SlotLayout

# --------------------------------------------------------------------------------------------
# Eviction policies
# --------------------------------------------------------------------------------------------
class EvictionPolicy:
    """Chooses which cached key leaves; one instance per layer."""

    def touch(self, key: int) -> None: ...  # a hit
    def insert(self, key: int) -> None: ...  # a new resident
    def remove(self, key: int) -> None: ...
    def victim(self, exclude=()) -> int | None: ...  # None: every resident is excluded

    def admits(self, key: int, victim: int) -> bool:
        """Whether missed ``key`` may take ``victim``'s place (else it passes through uncached)."""
        return True


class LRU(EvictionPolicy):
    def __init__(self) -> None:
        self.order: OrderedDict[int, None] = OrderedDict()  # least recent first

    def touch(self, key: int) -> None:
        self.order.move_to_end(key)

    def insert(self, key: int) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def remove(self, key: int) -> None:
        del self.order[key]

    def victim(self, exclude=()) -> int | None:
        return next((k for k in self.order if k not in exclude), None)


class DecayedLFU(EvictionPolicy):
    """Frequency with exponential forgetting: each key's score is the number of times it was used,
    every use counted ``decay ** (uses of this layer since)``; the victim is the lowest score (ties:
    least recent). ``prior`` seeds scores (e.g. routing counts from calibration, scaled to about one
    window of uses) so the first evictions already know which experts are hot. decay 1 is plain LFU;
    decay 0 is LRU."""

    def __init__(self, decay: float = 0.995, prior: dict[int, float] | None = None) -> None:
        assert 0.0 <= decay <= 1.0, decay
        self.decay, self.step = decay, 0
        self.score: dict[int, tuple[float, int]] = {k: (float(v), 0) for k, v in (prior or {}).items()}
        self.resident: OrderedDict[int, None] = OrderedDict()  # least recent first

    def _count(self, key: int) -> None:
        self.step += 1
        v, t = self.score.get(key, (0.0, self.step))
        self.score[key] = (v * self.decay ** (self.step - t) + 1.0, self.step)

    def _bump(self, key: int) -> None:
        self._count(key)
        self.resident.move_to_end(key)

    def _now(self, key: int) -> float:
        v, t = self.score.get(key, (0.0, self.step))
        return v * self.decay ** (self.step - t)

    def touch(self, key: int) -> None:
        self._bump(key)

    def insert(self, key: int) -> None:
        self.resident[key] = None
        self._bump(key)

    def remove(self, key: int) -> None:
        del self.resident[key]

    def victim(self, exclude=()) -> int | None:
        keys = [k for k in self.resident if k not in exclude]  # min keeps the first (least recent) of equal scores
        return min(keys, key=self._now) if keys else None

    def admits(self, key: int, victim: int) -> bool:
        """Frequency-aware admission: missed ``key`` replaces ``victim`` only if its score after this
        use is at least the victim's, so a one-off expert does not push out a hot one when the step
        leaves no colder resident to evict. Refused, the use still counts."""
        if self._now(key) * self.decay + 1.0 >= self._now(victim) * self.decay:
            return True  # insert() counts the use
        self._count(key)
        return False


def simulate(trace: list[list[int]], capacity: int, policy: EvictionPolicy,
             initial: list[int] = ()) -> tuple[int, int]:
    """(hits, misses) of one layer's cache of ``capacity`` slots over ``trace`` (per token, the
    experts it routes to, in the order they are computed), starting with ``initial`` resident: the
    same steps as the offloading runtime's (dbrxq.runtime.offload.OffloadRuntime._plan_reads), without
    bytes: a token's hits are looked up first, then each miss is admitted in place of a resident
    the token does not use, if the policy admits it (else, or with none left, it passes through a
    staging slot, not cached)."""
    resident: set[int] = set()
    for e in list(initial)[:capacity]:
        resident.add(e)
        policy.insert(e)
    hits = misses = 0
    for experts in trace:
        keep = set(experts)
        for e in experts:
            if e in resident:
                hits += 1
                policy.touch(e)
        for e in experts:
            if e in resident:
                continue
            misses += 1
            if capacity == 0:
                continue
            if len(resident) >= capacity:
                old = policy.victim(keep)
                if old is None or not policy.admits(e, old):
                    continue
                policy.remove(old)
                resident.discard(old)
            resident.add(e)
            policy.insert(e)
    return hits, misses


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


@dataclass
class Slot:
    storage: torch.Tensor  # uint8 [layout.nbytes] on the cache's device
    weights: tuple  # kernel weights viewing `storage`
    expert: int = -1  # which expert's bytes are in it (-1: none)
    ready: Any = None  # CUDA event: the copy into the slot has finished
    released: Any = None  # CUDA event: the last computation reading the slot has finished
    buffer: torch.Tensor | None = None  # CPU: page-aligned, whole pages, whose first bytes are `storage`
    pending: Any = None  # CPU: the background read filling it (dbrxq.runtime.reader.ReadJob), until waited for
    by_class: dict = field(default_factory=dict)  # MixedLayout: class layout -> kernel weights viewing storage

    def weights_for(self, layout: SlotLayout) -> tuple:
        """The kernel weights of an expert of ``layout`` (one size class) in this slot."""
        w = self.by_class.get(id(layout))
        if w is None:
            w = self.by_class[id(layout)] = layout.views(self.storage[: layout.nbytes])
        return w


@dataclass
class CacheCounters:
    hits: int = 0
    misses: int = 0
    prefetched: int = 0  # experts brought in ahead of their use
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


class ExpertCache:
    """``capacity[layer]`` slots per layer on ``device``, each ``layout.nbytes`` bytes; with a
    :class:`MixedLayout` (experts of different sizes), ``class_capacity[layer][c]`` slots of each
    size class c, each that class's bytes, an expert going only into a slot of its own class.

    Slots are allocated on first use and then reused, so :meth:`resident_bytes` (what is
    allocated) never exceeds the capacities times the slot sizes. ``lookup`` counts a hit or a miss;
    ``admit`` returns the slot to fill for a missing expert, evicting per the layer's policy (among
    the residents of the expert's class).
    """

    def __init__(self, layout: SlotLayout, capacity: list[int], device: torch.device, *,
                 policy: Callable[[], EvictionPolicy] = LRU, pin_memory: bool = False, aligned: bool = False,
                 class_capacity: list[list[int]] | None = None):
        self.layout, self.capacity, self.device = layout, list(capacity), torch.device(device)
        self.aligned = aligned  # CPU: each slot is a page-aligned buffer of whole pages (O_DIRECT reads)
        self.pin_memory = pin_memory and self.device.type == "cpu"
        self.policies = [policy() for _ in capacity]
        self.where: list[dict[int, Slot]] = [{} for _ in capacity]  # layer -> expert -> slot
        if layout.mixed:
            assert class_capacity is not None and [sum(r) for r in class_capacity] == self.capacity
            self.sizes = [lay.nbytes for lay in layout.layouts]
        else:
            class_capacity, self.sizes = [[c] for c in self.capacity], [layout.nbytes]
        self.class_capacity = [list(r) for r in class_capacity]
        self.free: list[list[list[Slot]]] = [[[] for _ in r] for r in self.class_capacity]  # layer, class
        self.allocated = [[0] * len(r) for r in self.class_capacity]
        self.counters = CacheCounters()

    def class_of(self, layer: int, expert: int) -> int:
        return self.layout.of[layer][expert] if self.layout.mixed else 0

    def new_slot(self, cls: int | None = None) -> Slot:
        """An empty slot of size class ``cls`` (None: the largest; the staging and scratch slots).
        Its weights are views for the uniform layout (a MixedLayout's slots make them per class when
        an expert is in them: :meth:`Slot.weights_for`)."""
        n = self.layout.nbytes if cls is None else self.sizes[cls]

        def views(storage):
            return None if self.layout.mixed else self.layout.views(storage)
        if self.aligned and self.device.type == "cpu" and not self.pin_memory:
            buffer = aligned_empty(whole_pages(n))
            storage = buffer[:n]
            return Slot(storage, views(storage), buffer=buffer)
        storage = torch.empty(n, dtype=torch.uint8, device=self.device, pin_memory=self.pin_memory)
        return Slot(storage, views(storage))

    def resident_bytes(self) -> int:
        # (+ < 8 KiB per CPU slot: page padding and alignment)
        return sum(n * size for row in self.allocated for n, size in zip(row, self.sizes))

    def contains(self, layer: int, expert: int) -> bool:
        return expert in self.where[layer]

    def lookup(self, layer: int, expert: int, *, count: bool = True) -> Slot | None:
        slot = self.where[layer].get(expert)
        if slot is not None:
            self.policies[layer].touch(expert)
        if count:
            if slot is None:
                self.counters.misses += 1
            else:
                self.counters.hits += 1
        return slot

    def admit(self, layer: int, expert: int, exclude=()) -> Slot | None:
        """The slot that will hold ``expert`` (caller fills it); None when its class has no slots in the
        layer, or when every resident expert of its class is in ``exclude`` (still needed, e.g. by the
        step under way)."""
        assert expert not in self.where[layer], (layer, expert)
        c = self.class_of(layer, expert)
        if self.class_capacity[layer][c] == 0:
            return None
        if self.free[layer][c]:
            slot = self.free[layer][c].pop()
        elif self.allocated[layer][c] < self.class_capacity[layer][c]:
            slot = self.new_slot(c if self.layout.mixed else None)
            self.allocated[layer][c] += 1
        else:
            if self.layout.mixed:  # the victim comes from the expert's own class
                exclude = set(exclude) | {x for x in self.where[layer] if self.class_of(layer, x) != c}
            old = self.policies[layer].victim(exclude)
            if old is None or not self.policies[layer].admits(expert, old):
                return None
            self.policies[layer].remove(old)
            slot = self.where[layer].pop(old)
            self.counters.evictions += 1
        slot.expert = expert
        self.where[layer][expert] = slot
        self.policies[layer].insert(expert)
        return slot

    def cached(self, layer: int) -> list[int]:
        return sorted(self.where[layer])
