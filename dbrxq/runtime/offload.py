"""The offloading runtime: run a quantized DBRX whose experts do not all fit in memory.

What each tier holds (dbrxq.plan.placement sizes them):

- compute device (GPU, or RAM on a CPU-only run): non-expert weights, KV cache, workspace, the
  expert buffers outside the cache (CUDA: one scratch slot; CPU: the reader's two staging slots),
  and an :class:`~dbrxq.runtime.expert_cache.ExpertCache` (per-layer caches of kernel-ready slots).
- host RAM (CUDA only): a fixed set of experts in the GPU's kernel layout, pinned, so a GPU miss
  is ONE non-blocking copy on a side stream, overlapped with compute and ordered by events.
- disk: the prepared-expert file (dbrxq.runtime.prepared). On CPU its reads run on the reader
  thread (dbrxq.runtime.reader), overlapped with compute (:meth:`OffloadRuntime.moe`); ``mmap``
  computes misses in place from a mapping instead.

Prefetch (on with CUDA, opt-in on CPU): block i+1's norm_2 and router applied to block i's output
(CUDA, a forward hook) or to block i's post-attention residual (CPU, queued behind block i's own
misses) pick the experts to bring into block i+1's cache early. It only changes *where* bytes come
from, never results.

:class:`OffloadedExperts` stands where a layer's QExperts stood, with the same forward signature,
and hands each MoE step to the runtime (dbrxq.loading.offloading wires it in).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dbrxq.core.errors import ConfigError, GenerationError
from dbrxq.model.kv_cache import make_kv_cache
from dbrxq.model.moe import moe_dispatch, route
from dbrxq.plan.placement import PlacementPlan
from dbrxq.plan.slots import SlotLayout, prepare_expert
from dbrxq.runtime.expert_cache import LRU, DecayedLFU, ExpertCache
from dbrxq.runtime.prepared import PreparedExpertFile
from dbrxq.runtime.reader import (
    STAGING_SLOTS,
    AlwaysMove,
    MeasuredMissPolicy,
    MissPolicy,
    Reader,
)
from dbrxq.runtime.routing import routing_prior, save_routing
from quantize.kernels import CpuQWeight, glu

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Which experts stay: the eviction policies offered
# --------------------------------------------------------------------------------------------
POLICIES = ("lru", "lfu", "static")


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------
@dataclass
class PhaseStats:
    forwards: int = 0
    tokens: int = 0  # positions processed (B * T summed over forwards)
    attention_s: float = 0.0
    resident_s: float = 0.0  # experts computed from a cache slot (hits)
    missed_s: float = 0.0  # experts that missed: bringing them in + computing them
    bytes_moved: int = 0
    hits: int = 0
    misses: int = 0
    from_page_cache: int = 0  # misses computed from the mapping, the page cache holding their pages

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


@dataclass
class OffloadStats:
    phases: dict[str, PhaseStats] = field(default_factory=lambda: {"prefill": PhaseStats(), "decode": PhaseStats()})
    peak: dict[str, int] = field(default_factory=dict)  # tier -> peak tracked bytes


# --------------------------------------------------------------------------------------------
# The runtime the wrapped modules talk to
# --------------------------------------------------------------------------------------------
class OffloadRuntime:
    """Owns the tiers, the cache, the policies and the counters; one per model."""

    def __init__(self, plan: PlacementPlan, layout: SlotLayout, file: PreparedExpertFile, experts: list, *,
                 act, act_dtype: torch.dtype, non_expert_bytes: int, miss_policy: MissPolicy | None = None,
                 timing: bool = False, policy: str = "lfu", routing_counts: list[list[int]] | None = None,
                 mapped: bool = False, map_cached: bool = False):
        self.plan, self.layout, self.file, self.inner = plan, layout, file, experts
        self.mapped = mapped and plan.device == "cpu"  # misses computed in place from the mapped file
        # CPU: a miss the cache does not admit, whose pages the page cache holds, computed from the mapping (no
        # copy into a staging slot)
        self.map_cached = map_cached and plan.device == "cpu" and not self.mapped
        self.device = torch.device(plan.device)
        self.cuda = self.device.type == "cuda"
        self.act, self.act_dtype = act, act_dtype

        self.glu = glu  # the expert GLU, fused in C where the weights allow (as in QExperts.expert)
        self.non_expert_bytes = non_expert_bytes
        self.timing = timing
        if policy not in POLICIES:
            raise ConfigError(f"expert policy {policy!r}: expected one of {', '.join(POLICIES)}")
        self.policy = policy
        # routing seen by this runtime (added to what earlier runs saw), saved beside the prepared file
        self.observed = [[0] * plan.num_experts for _ in range(plan.n_layers)]
        self.routing_file: Path | None = None
        self.forwards_since_save = 0
        # per layer, experts by routing count (most routed first), when the checkpoint's quantize report has them
        self.hot = ([sorted(range(plan.num_experts), key=lambda e, c=c: -c[e]) for c in routing_counts]
                    if routing_counts else None)
        factory = LRU
        if policy == "lfu":
            priors = iter([routing_prior(c, plan.num_experts) for c in routing_counts] if routing_counts else [])
            factory = lambda: DecayedLFU(prior=next(priors, None))  # noqa: E731 (one per layer, in order)
        self.cache = ExpertCache(layout, plan.slots_per_layer, self.device, policy=factory,
                                 aligned=not self.cuda, class_capacity=plan.class_slots)
        # static: the hottest experts fill the slots and stay; other experts go through the scratch slot
        self.pinned = [self._hottest(i) if self.hot and policy == "static" else None
                       for i in range(len(plan.slots_per_layer))]
        self.speculate: list | None = None  # CPU: per layer, (norm_2, router, top_k, norm_p) to guess the next layer
        self._resid: dict[int, torch.Tensor] = {}  # CPU: block i's residual after attention, to guess block i+1
        if self.cuda:
            self.scratch = self.cache.new_slot()  # for layers without slots / computed-in-place misses
            self.reader = None
        else:  # the staging slots are the workspace's expert buffers (placement.make_plan)
            self.reader = Reader(file, [] if self.mapped else [self.cache.new_slot() for _ in range(STAGING_SLOTS)])
        self.kv_bytes = 0
        self.stats = OffloadStats()
        self.phase = "prefill"
        self.host: dict[tuple[int, int], torch.Tensor] = {}
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.staging = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=True)
            self.staging_done = torch.cuda.Event()
            for layer, es in enumerate(plan.host_experts):
                for e in es:
                    t = torch.empty(layout.nbytes_of(layer, e), dtype=torch.uint8, pin_memory=True)
                    file.read_into(layer, e, t)
                    self.host[layer, e] = t
            self.miss_policy = miss_policy or MeasuredMissPolicy(self._time_move, self._time_local)
        else:
            self.miss_policy = miss_policy or AlwaysMove()
        self.note_peak()

    def _hottest(self, layer: int) -> set[int]:
        """The most-routed experts of ``layer`` that fill its slots (per size class, with several)."""
        cap = list(self.cache.class_capacity[layer])
        out = set()
        for e in self.hot[layer]:
            c = self.cache.class_of(layer, e)
            if cap[c] > 0:
                cap[c] -= 1
                out.add(e)
        return out

    # -- memory accounting --
    def tracked_bytes(self) -> dict[str, int]:
        dev = self.non_expert_bytes + self.kv_bytes + self.plan.workspace_bytes + self.cache.resident_bytes()
        out = {"device": dev}
        if self.cuda:
            out["host"] = (len(self.host) + 1) * self.layout.nbytes
        return out

    def note_peak(self) -> None:
        for k, v in self.tracked_bytes().items():
            self.stats.peak[k] = max(self.stats.peak.get(k, 0), v)

    def kv_factory(self, batch_size: int, length: int):
        """What generate calls for a KV cache: the plan's flavour, within the planned context."""
        if length > self.plan.context or batch_size > self.plan.batch_size:
            raise GenerationError(f"this request needs a KV cache for {batch_size} x {length} tokens but the "
                                  f"memory plan reserved {self.plan.batch_size} x {self.plan.context}; "
                                  f"load with a larger context (--context) or batch")
        cache = make_kv_cache(self.model_config, batch_size, length, flavour=self.plan.kv_flavour,
                              dtype=self.act_dtype, device=self.device)
        self.kv_bytes = cache.nbytes()
        self.note_peak()
        return cache

    # -- moving bytes --
    def _fill(self, layer: int, e: int, slot) -> None:
        """Bring expert (layer, e) into ``slot``: async on CUDA (side stream), sync on CPU."""
        n = self.layout.nbytes_of(layer, e)
        self.stats.phases[self.phase].bytes_moved += n
        if not self.cuda:
            self.file.read_into(layer, e, slot.storage)
            return
        src = self.host.get((layer, e))
        if src is None:  # from disk through the pinned staging buffer (its last copy must be done)
            self.staging_done.synchronize()
            self.file.read_into(layer, e, self.staging)
            src = self.staging
        with torch.cuda.stream(self.copy_stream):
            if slot.released is not None:
                self.copy_stream.wait_event(slot.released)  # nobody still reads the old bytes
            slot.storage[:n].copy_(src[:n], non_blocking=True)
            slot.ready = torch.cuda.Event()
            slot.ready.record(self.copy_stream)
            if src is self.staging:
                self.staging_done.record(self.copy_stream)

    def _weights(self, slot, layer: int, e: int) -> tuple:
        """The kernel weights of expert (layer, e), which is in ``slot``."""
        return slot.weights if not self.layout.mixed else slot.weights_for(self.layout.layout_of(layer, e))

    def _compute(self, slot, x: torch.Tensor, layer: int, e: int) -> torch.Tensor:
        if self.cuda:
            if slot.ready is not None:
                torch.cuda.current_stream(self.device).wait_event(slot.ready)
        w1, v1, w2 = self._weights(slot, layer, e)
        y = self.glu(x, w1, v1, w2, self.act, out_dtype=torch.float32)  # as QExperts.expert: (n, D)
        if self.cuda:
            slot.released = torch.cuda.Event()
            slot.released.record(torch.cuda.current_stream(self.device))
        return y

    def _compute_on_cpu(self, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        """CUDA miss computed where the canonical bytes are (CPU), with the CPU kernel."""
        w1, v1, w2 = prepare_expert(self.inner[layer].expert_sources(e), None, torch.device("cpu"), x.dtype)
        xc = x.to("cpu")
        return self.glu(xc, w1, v1, w2, self.act, out_dtype=torch.float32).to(self.device)

    def _time_move(self, n: int) -> float:
        x = torch.zeros(n, self.model_config.d_model, dtype=self.act_dtype, device=self.device)
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        self._fill(0, 0, self.scratch)
        self._compute(self.scratch, x, 0, 0)
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def _time_local(self, n: int) -> float:
        x = torch.zeros(n, self.model_config.d_model, dtype=self.act_dtype, device=self.device)
        t0 = time.perf_counter()
        self._compute_on_cpu(0, 0, x)
        return time.perf_counter() - t0

    def _sync(self) -> None:
        if self.cuda and self.timing:
            torch.cuda.synchronize(self.device)

    # -- what OffloadedExperts calls --
    def moe(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
            independent: bool) -> torch.Tensor:
        """The MoE of ``layer`` (OffloadedExperts.forward). On CPU: every miss of the layer is handed to
        the reader first, in the order the experts will be computed, then a guess of the next layer's
        experts (speculative prefetch, when on); then the resident experts are computed while the
        reader works, then the missed ones in the order they arrive, each waiting only for its own
        bytes (moe_dispatch still sums in expert order: the same bits as the resident model)."""
        if self.cuda:
            return self._moe_cuda(layer, x, expert_ids, weights, independent)
        ph = self.stats.phases[self.phase]
        counts = torch.bincount(expert_ids.reshape(-1), minlength=self.plan.num_experts).tolist()
        self.observe(layer, counts)
        used = [e for e, n in enumerate(counts) if n]
        planned = self._plan_reads(layer, used)
        self._speculate(layer)
        self.note_peak()

        def run(e: int, xe: torch.Tensor) -> torch.Tensor:
            t0 = time.perf_counter()
            slot, job = planned[e]
            if slot == "mapped":
                storage = self.file.mapped(layer, e)
                y = self.glu(xe, *self.layout.layout_of(layer, e).views(storage), self.act, out_dtype=torch.float32)
                self.file.unmap(layer, e)
                ph.missed_s += time.perf_counter() - t0
                return y
            if job is not None:
                slot = job.wait()
            elif slot.pending is not None:  # a prefetch still under way
                slot.pending.wait()
            y = self._compute(slot, xe, layer, e)
            if job is not None and job.staging:
                planned[e] = (None, None)
                self.reader.release(slot)
            if job is None:
                ph.resident_s += time.perf_counter() - t0
            else:
                ph.missed_s += time.perf_counter() - t0
            return y
        first = [e for e in used if planned[e][1] is None and planned[e][0] != "mapped"]  # resident ones
        hits_first = first + [e for e in used if e not in first]
        try:
            return moe_dispatch(x, expert_ids, weights, self.plan.num_experts, run, independent, hits_first)
        finally:  # after an error: no read may still target a staging slot, and each goes back
            for slot, job in planned.values():
                if job is not None and job.staging:
                    job.done.wait()
                    if job.slot is not None:
                        self.reader.release(job.slot)

    def _moe_cuda(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                  independent: bool) -> torch.Tensor:
        """CUDA, planned as the CPU reader's step is: every miss the miss policy moves gets its copy
        issued on the side stream up front, in compute order, into a cache slot whose expert this
        step does not use (else the scratch slot; a miss finding that taken too is copied when its
        turn comes); the resident experts compute while the copies travel, then each missed expert
        once its own copy's event has fired. Misses the policy keeps on the host compute there."""
        ph = self.stats.phases[self.phase]
        counts = torch.bincount(expert_ids.reshape(-1), minlength=self.plan.num_experts).tolist()
        self.observe(layer, counts)
        used = [e for e, n in enumerate(counts) if n]
        slots: dict[int, object] = {}
        for e in used:
            slot = self.cache.lookup(layer, e)
            if slot is not None:
                ph.hits += 1
                slots[e] = slot
        misses = [e for e in used if e not in slots]
        # decided before any copy is issued: a first decision times a copy through the scratch slot
        local = {e for e in misses if not self.miss_policy.move(counts[e])}
        scratch_taken = False
        for e in misses:
            ph.misses += 1
            if e in local:
                continue
            dest = None if self.pinned[layer] is not None else self.cache.admit(layer, e, set(used))
            if dest is None and not scratch_taken:
                dest, scratch_taken = self.scratch, True
                dest.expert = -1
            if dest is not None:
                self._fill(layer, e, dest)
            slots[e] = dest  # None: the scratch slot, filled at its turn
        self.note_peak()

        def run(e: int, xe: torch.Tensor) -> torch.Tensor:
            self._sync()
            t0 = time.perf_counter()
            if e in local:
                y = self._compute_on_cpu(layer, e, xe)
            else:
                slot = slots[e]
                if slot is None:
                    slot = self.scratch
                    self._fill(layer, e, slot)  # waits (on the side stream) for the scratch's last reader
                y = self._compute(slot, xe, layer, e)
            self._sync()
            if e in misses:
                ph.missed_s += time.perf_counter() - t0
            else:
                ph.resident_s += time.perf_counter() - t0
            return y
        return moe_dispatch(x, expert_ids, weights, self.plan.num_experts, run, independent,
                            [e for e in used if e not in misses] + misses)

    def _plan_reads(self, layer: int, used: list[int]) -> dict:
        """expert -> (cache slot, None) for a hit, (slot or None, ReadJob) for a miss. A miss goes
        into a cache slot whose expert this step does not use, else into a staging slot."""
        ph = self.stats.phases[self.phase]
        keep, out = set(used), {}
        for e in used:
            slot = self.cache.lookup(layer, e)
            if slot is not None:
                ph.hits += 1
                out[e] = (slot, None)
                if slot.pending is not None:  # a background read still queued: the step needs it now,
                    self.reader.promote(slot.pending)  # before its misses (hits are computed first)
        for e in used:
            if e in out:
                continue
            ph.misses += 1
            ph.bytes_moved += self.layout.nbytes_of(layer, e)
            if self.mapped:  # computed from the file's pages in place: nothing to read ahead, nothing cached
                out[e] = ("mapped", None)
                continue
            dest = None if self.pinned[layer] is not None else self.cache.admit(layer, e, keep)
            if dest is None and self.map_cached and self.file.in_page_cache(layer, e):  # memory already
                ph.from_page_cache += 1
                out[e] = ("mapped", None)
                continue
            if dest is not None and dest.pending is not None:  # a background read of its old expert
                self.reader.cancel(dest.pending)
            job = self.reader.submit(layer, e, dest)
            if dest is not None:
                dest.pending = job
            out[e] = (dest, job)
        return out

    def _speculate(self, layer: int) -> None:
        """Start reading the experts block layer+1 will probably use: its norm and router applied to
        this block's residual after attention (the next block's input before this MoE adds to it)."""
        resid = self._resid.pop(layer, None)
        if self.speculate is None or resid is None or layer + 1 >= len(self.speculate):
            return
        norm, router, top_k, norm_p = self.speculate[layer + 1]
        with torch.no_grad():
            flat = norm(resid.reshape(-1, resid.shape[-1]))
            w, ids = route(router(flat), top_k, norm_p)
        score = torch.zeros(self.plan.num_experts).index_add_(0, ids.reshape(-1), w.reshape(-1).float())
        self.prefetch(layer + 1, [e for e in torch.argsort(score, descending=True).tolist() if score[e] > 0])

    def observe(self, layer: int, counts: list[int]) -> None:
        row = self.observed[layer]
        for e, n in enumerate(counts):
            row[e] += n

    def save_routing(self) -> None:
        """Write the routing counts observed so far (with earlier runs') beside the prepared file, so a
        checkpoint without a quantize report starts warm next time (an OSError only warns)."""
        if self.routing_file is not None and not save_routing(self.routing_file, self.observed):
            self.routing_file = None

    def close(self) -> None:
        self.save_routing()
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self.file.close()

    def place_hot(self) -> None:
        """Fill every layer's slots with its most-routed experts (from the quantize report's routing
        counts) before the first token, so the cache starts hot instead of cold."""
        if self.hot is None:
            if self.policy == "static":
                log.warning("expert policy static needs routing counts (the quantize report of the checkpoint); "
                            "none found, so experts are cached as they come (LRU)")
            return
        for layer, order in enumerate(self.hot):
            self._bring(layer, order)

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Bring ``experts`` of ``layer`` into its cache ahead of use (at most its capacity); nothing
        for a layer whose slots are pinned to its hottest experts (policy static)."""
        if self.pinned[layer] is not None:
            return
        self.cache.counters.prefetched += self._bring(layer, experts)

    def _bring(self, layer: int, experts: list[int]) -> int:
        n = 0
        room = list(self.cache.class_capacity[layer])  # the first experts of each size class that fit
        for e in experts:
            c = self.cache.class_of(layer, e)
            if room[c] <= 0:
                continue
            room[c] -= 1
            if not self.cache.contains(layer, e):
                slot = self.cache.admit(layer, e)
                if slot is None:  # the policy keeps what it has (decayed LFU's admission)
                    continue
                if self.reader is None:
                    self._fill(layer, e, slot)
                else:  # in the background; the layer waits for it only if it uses it
                    self.stats.phases[self.phase].bytes_moved += self.layout.nbytes_of(layer, e)
                    if slot.pending is not None:
                        self.reader.cancel(slot.pending)
                    slot.pending = self.reader.submit(layer, e, slot, background=True)
                n += 1
        self.note_peak()
        return n


class OffloadedExperts(nn.Module):
    """Drop-in for QExperts: ``forward(x (N, D), expert_ids (N, k), weights (N, k)) -> (N, D)``.

    ``inner`` (the QExperts, canonical buffers only) is kept as a plain attribute so the model's
    state_dict does not change shape; ``runtime`` decides where each expert is computed."""

    def __init__(self, inner: nn.Module, layer: int, runtime: OffloadRuntime):
        super().__init__()
        self.num_experts, self.layer = inner.num_experts, layer
        self.__dict__["inner"] = inner
        self.__dict__["runtime"] = runtime

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.runtime.moe(self.layer, x, expert_ids, weights, self.row_independent)

    @property
    def row_independent(self) -> bool:
        """Slots hold dbrxq's C-kernel weights (CPU), which compute each row alone."""
        return not self.runtime.cuda and all(isinstance(w, CpuQWeight) for w in self.runtime.layout.template)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, slots={self.runtime.cache.capacity[self.layer]}"
