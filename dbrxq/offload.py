"""Expert offloading: run a quantized DBRX whose experts do not all fit in memory.

What each tier holds (see dbrxq.placement for the budgets):

- compute device (GPU, or RAM on a CPU-only run): non-expert weights, KV cache, workspace, the
  expert buffers outside the cache (CUDA: one scratch slot; CPU: the reader's two staging slots),
  and an :class:`~dbrxq.expert_cache.ExpertCache` (per-layer caches of kernel-ready expert slots).
- host RAM (CUDA only): a fixed set of experts in the GPU's kernel layout, pinned, so a GPU miss
  is ONE non-blocking copy on a side stream, overlapped with compute and ordered by events.
- disk: a *prepared-expert file*: every expert in the compute device's kernel layout, one slot
  image per expert. It is made once per (checkpoint, backend, device) and reused. Why a file and
  not the checkpoint: the checkpoint holds the canonical layout, and turning one real-width expert
  into the fast CPU kernel's layout costs ~0.7 s (3 x 240 ms, cpu_q4, AVX2 box) against ~25 ms to
  compute it, so a miss served from the checkpoint would be 30x slower than the read it needs.
  A miss reads the slot image with ``os.preadv`` straight into its slot: one copy from the page
  cache (or, with ``direct``, O_DIRECT from the disk), no mapping, so RSS stays within the budget;
  ``drop_page_cache`` also evicts the read range from the page cache (posix_fadvise DONTNEED) for
  runs that must not grow it. On CPU the reads run on a :class:`Reader` thread, overlapped with
  compute (:meth:`OffloadRuntime.moe`); ``mmap`` computes misses in place from a mapping instead. While the file is being built, each expert's canonical checkpoint pages (memory-mapped by
  safetensors) are dropped from our RSS after use with madvise(MADV_DONTNEED).

Miss policy (:class:`MissPolicy`): on a CPU-only run computing a missed expert "where it lives"
would read the same bytes as copying it, so a miss always moves (:class:`AlwaysMove`). With CUDA,
:class:`MeasuredMissPolicy` times once, per token count, one host-to-device copy + GPU compute
against one CPU computation from the canonical bytes (which includes the CPU repack, see above)
and picks the cheaper; at DBRX width moving wins (the repack alone is ~30x a PCIe copy).

Prefetch (on with CUDA, opt-in on CPU): block i+1's norm_2 and router applied to block i's output
(CUDA, a forward hook) or to block i's post-attention residual (CPU, queued behind block i's own
misses) pick the experts to bring into block i+1's cache early. It only changes *where* bytes come
from, never results.

The model is untouched: each ``block.ffn.experts`` (a quantize.modules.QExperts) is wrapped by
an :class:`OffloadedExperts` with the same forward signature, holding the runtime object.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, DbrxqError
from .expert_cache import PAGE, LRU, DecayedLFU, ExpertCache, MixedLayout, SlotLayout, whole_pages
from .model import moe_dispatch, route
from .pages import PageReleaser
from .placement import PlacementPlan, format_size
from .writer import remove_stale_temps, temp_path, write_json_atomic

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Kernel weights of one expert
# --------------------------------------------------------------------------------------------
def prepare_expert(canonical: tuple, backend: str | None, device: torch.device, act_dtype: torch.dtype) -> tuple:
    """(w1, v1, w2) QuantizedTensors -> warm kernel weights on ``device`` (quantize.modules' dispatch)."""
    from quantize.modules import prepare_weight
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
        return tuple((qt.bits, qt.group_size, qt.qzeros is None) for qt in qts)
    classes: dict = {}
    of = []
    for mod in experts:
        row = []
        for e in range(mod.num_experts):
            qts = mod.expert_weights(e)
            key = recipe(qts)
            if key not in classes:
                classes[key] = (len(classes), expert_layout(qts, backend, device, act_dtype))
            row.append(classes[key][0])
        of.append(row)
    layouts = [lay for _, lay in sorted(classes.values(), key=lambda c: c[0])]
    return layouts[0] if len(layouts) == 1 else MixedLayout(layouts, of)


def canonical_nbytes(canonical: tuple) -> int:
    return sum(t.numel() * t.element_size() for qt in canonical for t in (qt.qweight, qt.scales, qt.qzeros)
               if t is not None)


# --------------------------------------------------------------------------------------------
# Disk tier: the prepared-expert file
# --------------------------------------------------------------------------------------------
class PreparedExpertFile:
    """Slot image of expert (layer, e) at byte ``(layer * E + e) * nbytes``; read with preadv.

    The file is a cache, so it is untrusted like a checkpoint: a JSON sidecar (``<name>.json``,
    written after the file is complete) records what it was built from (:func:`prepared_identity`)
    and a CRC-32 of every expert's bytes. The first read of each expert in a process checks its
    CRC (one pass over bytes just read; later reads of the same expert skip it); a mismatch
    removes the file and its sidecar and stops with one line, so the next run rebuilds it.
    """

    FORMAT = "dbrxq-prepared-experts-v2"  # v2: experts at a stride of whole 4 KiB pages (O_DIRECT)
    ALIGN = PAGE

    def __init__(self, path: Path, nbytes: int, num_experts: int, *, crcs: list[int] | None = None,
                 drop_page_cache: bool = False, direct: bool = False, sizes: list[int] | None = None):
        self.path, self.nbytes, self.num_experts = Path(path), nbytes, num_experts
        self.sizes = sizes  # per expert (layer-major) when they differ (MixedLayout), else every one nbytes
        self.stride = stride_of(nbytes)
        self.drop_page_cache = drop_page_cache
        self.crcs = crcs
        self.verified: set[int] = set()
        self.fd = os.open(self.path, os.O_RDONLY)
        self.dfd = -1  # O_DIRECT descriptor: reads from the disk, never the page cache
        if direct:
            try:
                self.dfd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            except OSError as e:
                self._no_direct(e)

    def _no_direct(self, e: OSError) -> None:
        log.warning("%s: O_DIRECT is not supported here (%s); reading through the page cache and dropping "
                    "each read from it", self.path, e.strerror or e)
        if self.dfd >= 0:
            os.close(self.dfd)
        self.dfd = -1
        self.drop_page_cache = True

    def read_into(self, layer: int, expert: int, dst: torch.Tensor) -> None:
        """dst: CPU uint8, at least nbytes (a slot in RAM, or pinned staging for a GPU). A page-aligned
        dst of ``stride`` bytes is read with O_DIRECT when the file was opened with ``direct``."""
        idx = layer * self.num_experts + expert
        off, n = idx * self.stride, self.size(idx)
        whole = whole_pages(n)  # O_DIRECT reads whole pages
        if self.dfd >= 0 and dst.numel() >= whole and dst.data_ptr() % self.ALIGN == 0:
            try:
                got = os.preadv(self.dfd, [memoryview(dst[:whole].numpy()).cast("B")], off)
            except OSError as e:  # a file system that opens O_DIRECT but refuses the read
                self._no_direct(e)
                return self.read_into(layer, expert, dst)
            got = min(got, n)
        else:
            got = os.preadv(self.fd, [memoryview(dst[:n].numpy()).cast("B")], off)
            if self.drop_page_cache:
                os.posix_fadvise(self.fd, off, self.stride, os.POSIX_FADV_DONTNEED)
        if got != n:
            self._damaged(layer, expert, f"short read ({got} of {n} bytes)")
        if self.crcs is not None and idx not in self.verified:
            if zlib.crc32(memoryview(dst[:n].numpy()).cast("B")) != self.crcs[idx]:
                self._damaged(layer, expert, "its CRC-32 differs from the one recorded when the file was written")
            self.verified.add(idx)

    def size(self, idx: int) -> int:
        """Bytes of expert ``idx`` (layer-major) in the file."""
        return self.nbytes if self.sizes is None else self.sizes[idx]

    def _damaged(self, layer: int, expert: int, why: str) -> None:
        for p in (self.path, sidecar_path(self.path)):
            with contextlib.suppress(OSError):
                p.unlink()
        raise CheckpointError(f"{self.path}: prepared-expert file damaged at layer {layer} expert {expert} ({why}); "
                              f"removed it, rerun to rebuild it from the checkpoint")

    def mapped(self, layer: int, expert: int) -> torch.Tensor:
        """Expert (layer, e)'s bytes in place, in a read-only mapping of the file (no copy: served by
        the page cache, or faulted in from the disk); hand them back with :meth:`unmap`."""
        import mmap
        if getattr(self, "mm", None) is None:
            self.mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY)  # private: never written, never copied
        idx = layer * self.num_experts + expert
        n = self.size(idx)
        t = torch.frombuffer(self.mm, dtype=torch.uint8, count=n, offset=idx * self.stride)
        if self.crcs is not None and idx not in self.verified:
            if zlib.crc32(memoryview(self.mm)[idx * self.stride: idx * self.stride + n]) != self.crcs[idx]:
                self._damaged(layer, expert, "its CRC-32 differs from the one recorded when the file was written")
            self.verified.add(idx)
        return t

    def unmap(self, layer: int, expert: int) -> None:
        """Drop expert (layer, e)'s pages from this process (MADV_DONTNEED: they stay in the page
        cache, and count in our RSS no more)."""
        import mmap
        self.mm.madvise(mmap.MADV_DONTNEED, (layer * self.num_experts + expert) * self.stride, self.stride)

    def close(self) -> None:
        if getattr(self, "mm", None) is not None:
            self.mm.close()
            self.mm = None
        for name in ("fd", "dfd"):
            if getattr(self, name) >= 0:
                os.close(getattr(self, name))
                setattr(self, name, -1)

    @classmethod
    def build(cls, path: Path, experts: list, layout: SlotLayout, backend: str | None, device: torch.device,
              act_dtype: torch.dtype, *, identity: dict | None = None, **kw) -> PreparedExpertFile:
        """Write every expert of ``experts`` (QExperts-like: expert_weights(e)) atomically, then its
        sidecar (``identity`` + per-expert CRC-32)."""
        from quantize.primitives import check_qparams
        path.parent.mkdir(parents=True, exist_ok=True)
        release = PageReleaser()
        buf = torch.empty(layout.nbytes, dtype=torch.uint8)
        pad = bytes(stride_of(layout.nbytes) - layout.nbytes)
        E = experts[0].num_experts
        t0 = time.perf_counter()
        tmp = temp_path(path)
        crcs = []
        try:
            with open(tmp, "wb") as f:
                for layer, mod in enumerate(experts):
                    for e in range(E):
                        canonical = mod.expert_weights(e)
                        for qt in canonical:  # the checkpoint's numbers, checked once, here
                            check_qparams(qt.scales, qt.qzeros, qt.bits, f"layer {layer} expert {e}")
                        lay = layout.layout_of(layer, e)  # its size class (MixedLayout), first bytes of a stride
                        if layout.mixed:
                            buf.zero_()  # a smaller class leaves the end of the stride: the same file bytes every build
                        lay.pack(prepare_expert(canonical, backend, device, act_dtype), buf[: lay.nbytes])
                        f.write(memoryview(buf.numpy()))
                        f.write(pad)
                        crcs.append(zlib.crc32(memoryview(buf[: lay.nbytes].numpy())))
                        for qt in canonical:  # the checkpoint's pages are not needed any more
                            for t in (qt.qweight, qt.scales, qt.qzeros):
                                if t is not None:
                                    release(t)
                    log.info("prepared experts of layer %d/%d (%.1fs)", layer + 1, len(experts), time.perf_counter() - t0)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        if identity is not None:
            write_json_atomic({**identity, "crc32": crcs}, sidecar_path(path))
        return cls(path, layout.nbytes, E, crcs=crcs, sizes=layout.sizes() if layout.mixed else None, **kw)


def stride_of(nbytes: int) -> int:
    """Bytes between experts in a prepared file (and of a CPU slot's buffer): whole 4 KiB pages."""
    return whole_pages(nbytes)


def sidecar_path(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def prepared_identity(source_dir: Path | None, backend: str | None, device: torch.device, layout: SlotLayout,
                      act_dtype: torch.dtype, n_layers: int, num_experts: int) -> dict:
    """What a prepared-expert file is made from: the checkpoint's files (name, size, mtime), the kernel
    (backend, device, byte layout version, SIMD path), torch, and the file's shape."""
    from quantize import cext
    lib = cext.load()
    files = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(source_dir).glob("*.safetensors"))]
    return {"format": PreparedExpertFile.FORMAT, "source": str(Path(source_dir).resolve()), "files": files,
            "backend": str(backend), "device": device.type, "act_dtype": str(act_dtype),
            "kernel_layout": lib.dbrxq_layout_version() if lib is not None else 0, "cpu_path": str(cext.cpu_path()),
            "torch": torch.__version__, "slot_bytes": layout.nbytes, "n_layers": n_layers, "num_experts": num_experts,
            **({"size_classes": [lay.nbytes for lay in layout.layouts], "class_of": layout.of} if layout.mixed else {})}


def read_prepared_sidecar(path: Path, identity: dict) -> list[int] | None:
    """The per-expert CRCs of the prepared file at ``path`` if its sidecar is well-formed and records
    exactly ``identity``; None otherwise (the file is then rebuilt)."""
    from .untrusted import MAX_INDEX_BYTES, is_int, read_json
    side = sidecar_path(path)
    try:
        data = read_json(side, MAX_INDEX_BYTES, folder=path.parent)
    except DbrxqError as e:
        log.warning("prepared-expert file %s: %s; rebuilding it", path, e)
        return None
    if not isinstance(data, dict):
        return None
    crcs = data.pop("crc32", None)
    n = identity["n_layers"] * identity["num_experts"]
    if data != identity or not isinstance(crcs, list) or len(crcs) != n or not all(is_int(c) for c in crcs):
        log.warning("prepared-expert file %s was built from something else (or its sidecar is damaged); "
                    "rebuilding it", path)
        return None
    return crcs


def prepared_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where prepared-expert files live: ``cache_dir``, else dbrxq's cache ($DBRXQ_CACHE, else
    ~/.cache/dbrxq: :func:`quantize.cext.cache_dir`, where the kernel builds go too); then ``prepared/``."""
    from quantize import cext
    return (Path(cache_dir) if cache_dir else cext.cache_dir()) / "prepared"


def prepared_file_key(source_dir: Path | None, backend: str | None, device: torch.device, layout: SlotLayout,
                      act_dtype: torch.dtype) -> str | None:
    """A name that changes with the checkpoint files, the kernel (path and byte layout) and this torch;
    None without files."""
    if source_dir is None:
        return None
    h = hashlib.sha256()
    for p in sorted(Path(source_dir).glob("*.safetensors")):
        st = p.stat()
        h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    from quantize import cext
    lib = cext.load()
    kernel_layout = lib.dbrxq_layout_version() if lib is not None else 0  # the C kernel's byte layout
    h.update(f"{backend}:{device.type}:{act_dtype}:{layout.nbytes}:{torch.__version__}:{cext.cpu_path()}:"
             f"{kernel_layout}".encode())
    if layout.mixed:
        h.update(f"{layout.describe()}:{layout.of}".encode())
    return h.hexdigest()[:20]


# --------------------------------------------------------------------------------------------
# Which experts stay: eviction policy and routing statistics
# --------------------------------------------------------------------------------------------
POLICIES = ("lru", "lfu", "static")


def _prior(counts: list[int], num_experts: int) -> dict[int, float]:
    """Routing counts scaled so an average expert starts with the weight of ~20 uses."""
    scale = 20.0 / max(1.0, sum(counts) / num_experts)
    return {e: counts[e] * scale for e in range(num_experts)}


def routing_counts(folder: Path | None, n_layers: int, num_experts: int) -> list[list[int]] | None:
    """Per layer, per expert, the calibration tokens routed to it, from the checkpoint's
    ``quantize_report.json`` (written by `dbrxq quantize`); None when there is none or it does not fit."""
    from .untrusted import MAX_INDEX_BYTES, is_int, read_json
    path = Path(folder) / "quantize_report.json" if folder is not None else None
    if path is None or not path.is_file():
        return None
    try:
        layers = read_json(path, MAX_INDEX_BYTES, folder=Path(folder)).get("layers")
        counts = [[0] * num_experts for _ in range(n_layers)]
        for L in layers:
            for ex in L["experts"]:
                if not (is_int(L["layer"]) and 0 <= L["layer"] < n_layers and is_int(ex["expert"])
                        and 0 <= ex["expert"] < num_experts and is_int(ex["tokens"]) and ex["tokens"] >= 0):
                    raise TypeError
                counts[L["layer"]][ex["expert"]] = ex["tokens"]
    except (DbrxqError, AttributeError, KeyError, TypeError, IndexError):
        log.warning("%s: no usable per-expert routing counts; experts are placed as they come", path)
        return None
    return counts


ROUTING_FORMAT = "dbrxq-observed-routing-v1"
ROUTING_SAVE_EVERY = 64  # forward passes between saves of the observed routing counts


def routing_path(prepared: Path) -> Path:
    """Where the routing counts observed while running from ``prepared`` (a prepared-expert file) are kept."""
    return Path(prepared).with_suffix(".routing.json")


def _save_routing(path: Path, observed: list[list[int]]) -> bool:
    try:
        write_json_atomic({"format": ROUTING_FORMAT, "counts": observed}, path)
    except OSError as e:
        log.warning("%s: could not save the observed routing counts (%s)", path, e)
        return False
    return True


def read_observed_routing(path: Path, n_layers: int, num_experts: int) -> list[list[int]] | None:
    """Counts written by :meth:`OffloadRuntime.save_routing`, checked (shape, non-negative integers);
    None when absent or unusable (with a warning: the cache then starts as it would without them)."""
    from .untrusted import MAX_INDEX_BYTES, is_int, read_json
    if not path.is_file():
        return None
    try:
        data = read_json(path, MAX_INDEX_BYTES, folder=path.parent)
        counts = data["counts"]
        ok = (data.get("format") == ROUTING_FORMAT and isinstance(counts, list) and len(counts) == n_layers
              and all(isinstance(r, list) and len(r) == num_experts and all(is_int(c) and c >= 0 for c in r)
                      for r in counts))
    except (DbrxqError, TypeError, KeyError, AttributeError):
        ok = False
    if not ok:
        log.warning("%s: not usable routing counts; ignored (they are rewritten as this run observes routing)", path)
        return None
    return counts


# --------------------------------------------------------------------------------------------
# Miss policies
# --------------------------------------------------------------------------------------------
class MissPolicy:
    def move(self, n_tokens: int) -> bool:
        """True: bring the missed expert into a cache slot; False: compute it where it lives."""
        raise NotImplementedError


class AlwaysMove(MissPolicy):
    def move(self, n_tokens: int) -> bool:
        return True


class MeasuredMissPolicy(MissPolicy):
    """Picks by measured cost per token-count bucket (powers of two): ``move_s(n)`` (copy + device
    compute) vs ``local_s(n)`` (compute where the bytes are); each measured once, lazily."""

    def __init__(self, move_s, local_s):
        self.move_s, self.local_s = move_s, local_s
        self.choice: dict[int, bool] = {}

    def move(self, n_tokens: int) -> bool:
        b = 1 << max(0, (n_tokens - 1).bit_length())
        if b not in self.choice:
            m, c = self.move_s(b), self.local_s(b)
            self.choice[b] = m <= c
            log.info("miss policy at %d tokens: move %.2f ms vs compute in place %.2f ms -> %s",
                     b, m * 1e3, c * 1e3, "move" if self.choice[b] else "compute in place")
        return self.choice[b]


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

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


@dataclass
class OffloadStats:
    phases: dict[str, PhaseStats] = field(default_factory=lambda: {"prefill": PhaseStats(), "decode": PhaseStats()})
    peak: dict[str, int] = field(default_factory=dict)  # tier -> peak tracked bytes


# --------------------------------------------------------------------------------------------
# The CPU reader: expert reads overlapped with compute
# --------------------------------------------------------------------------------------------
class ReadJob:
    """One expert being read into a slot (a cache slot, or a staging slot the reader takes)."""

    __slots__ = ("layer", "expert", "slot", "staging", "done", "error")

    def __init__(self, layer: int, expert: int, slot):
        self.layer, self.expert, self.slot, self.staging = layer, expert, slot, slot is None
        self.done = threading.Event()
        self.error: BaseException | None = None

    def wait(self):
        """The slot, once its bytes have arrived (re-raises the read's error)."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.slot


class Reader:
    """One thread reading prepared experts in the order they are asked for, while the caller
    computes. Why a thread with preadv (and not io_uring or a pool): a DBRX expert is one contiguous
    100 MB read, which one preadv streams at the device's rate (1.0-1.4 GB/s with O_DIRECT on this
    project's VM disk, 2.8-3.6 GB/s from the page cache, as scripts/bench_offload.py measures each
    run), and the syscall releases the GIL, so compute
    goes on; the order matters more than the depth, because the layer computes its experts one
    after another. A job without a slot takes one of the staging slots (misses that no cache slot
    may take), waiting until compute hands one back (:meth:`release`), so at most
    ``len(staging)`` such experts are in memory at once. ``delay`` (tests) sleeps before each read."""

    def __init__(self, file: PreparedExpertFile, staging: list, delay: float = 0.0):
        self.file, self.delay = file, delay
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for slot in staging:
            self.free.put(slot)
        self.thread = threading.Thread(target=self._run, name="dbrxq-reader", daemon=True)
        self.thread.start()

    def submit(self, layer: int, expert: int, slot=None) -> ReadJob:
        job = ReadJob(layer, expert, slot)
        self.jobs.put(job)
        return job

    def release(self, slot) -> None:
        self.free.put(slot)

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                if job.slot is None:
                    job.slot = self.free.get()
                job.slot.expert = job.expert
                if self.delay:
                    time.sleep(self.delay)
                self.file.read_into(job.layer, job.expert, job.slot.buffer)
            except BaseException as e:  # handed to the thread that waits for it
                job.error = e
            finally:
                job.done.set()

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()


STAGING_SLOTS = 2  # CPU: misses read ahead into these while compute works on another expert


# --------------------------------------------------------------------------------------------
# The runtime the wrapped modules talk to
# --------------------------------------------------------------------------------------------
class OffloadRuntime:
    """Owns the tiers, the cache, the policies and the counters; one per model."""

    def __init__(self, plan: PlacementPlan, layout: SlotLayout, file: PreparedExpertFile, experts: list, *,
                 act, act_dtype: torch.dtype, non_expert_bytes: int, miss_policy: MissPolicy | None = None,
                 timing: bool = False, policy: str = "lfu", routing_counts: list[list[int]] | None = None,
                 mapped: bool = False):
        self.plan, self.layout, self.file, self.inner = plan, layout, file, experts
        self.mapped = mapped and plan.device == "cpu"  # misses computed in place from the mapped file
        self.device = torch.device(plan.device)
        self.cuda = self.device.type == "cuda"
        self.act, self.act_dtype = act, act_dtype
        from quantize.kernels import glu

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
            priors = iter([_prior(c, plan.num_experts) for c in routing_counts] if routing_counts else [])
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
        from .errors import GenerationError
        from .kv_cache import make_kv_cache
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
        y = self.glu(x, w1, v1, w2, self.act)  # same call as QExperts.expert: (n, D)
        if self.cuda:
            slot.released = torch.cuda.Event()
            slot.released.record(torch.cuda.current_stream(self.device))
        return y

    def _compute_on_cpu(self, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        """CUDA miss computed where the canonical bytes are (CPU), with the CPU kernel."""
        w1, v1, w2 = prepare_expert(self.inner[layer].expert_weights(e), None, torch.device("cpu"), x.dtype)
        xc = x.to("cpu")
        return self.glu(xc, w1, v1, w2, self.act).to(self.device)

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
                y = self.glu(xe, *self.layout.layout_of(layer, e).views(storage), self.act)
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
        for e in used:
            if e in out:
                continue
            ph.misses += 1
            ph.bytes_moved += self.layout.nbytes_of(layer, e)
            if self.mapped:  # computed from the file's pages in place: nothing to read ahead, nothing cached
                out[e] = ("mapped", None)
                continue
            dest = None if self.pinned[layer] is not None else self.cache.admit(layer, e, keep)
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
        if self.routing_file is not None and not _save_routing(self.routing_file, self.observed):
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
                    slot.pending = self.reader.submit(layer, e, slot)
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
        from quantize.kernels import CpuQWeight
        return not self.runtime.cuda and all(isinstance(w, CpuQWeight) for w in self.runtime.layout.template)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, slots={self.runtime.cache.capacity[self.layer]}"


# --------------------------------------------------------------------------------------------
# Wiring
# --------------------------------------------------------------------------------------------
def _install_hooks(model: nn.Module, rt: OffloadRuntime, prefetch: bool) -> None:
    def begin(module, args, kwargs):
        x = kwargs.get("input_ids")
        if x is None:
            x = args[0] if args else kwargs.get("inputs_embeds")
        rt.phase = "decode" if x.shape[1] == 1 else "prefill"
        ph = rt.stats.phases[rt.phase]
        ph.forwards += 1
        ph.tokens += x.shape[0] * x.shape[1]
        rt.forwards_since_save += 1
        if rt.forwards_since_save >= ROUTING_SAVE_EVERY:
            rt.forwards_since_save = 0
            rt.save_routing()

    model.register_forward_pre_hook(begin, with_kwargs=True)
    blocks = model.transformer.blocks
    if rt.timing:
        for b in blocks:
            attn = b.norm_attn_norm

            def pre(module, args):
                rt._sync()
                module._t0 = time.perf_counter()

            def post(module, args, out):
                rt._sync()
                rt.stats.phases[rt.phase].attention_s += time.perf_counter() - module._t0

            attn.register_forward_pre_hook(pre)
            attn.register_forward_hook(post)
    if not prefetch:
        return
    top_k = model.config.top_k
    if not rt.cuda:  # the reader starts block i+1's likely experts once block i's misses are queued
        rt.speculate = [(b.norm_attn_norm.norm_2, b.ffn.router, top_k, b.ffn.norm_p) for b in blocks]
        for i, b in enumerate(blocks[:-1]):
            def stash(module, args, out, i=i):
                rt._resid[i] = out[0]  # (B, T, D): the residual after block i's attention
            b.norm_attn_norm.register_forward_hook(stash)
        return
    for i in range(len(blocks) - 1):
        nxt = blocks[i + 1]

        def guess(module, args, out, nxt=nxt, layer=i + 1):
            x = out[0]  # (B, T, D): block i's output, i.e. block i+1's input
            flat = nxt.norm_attn_norm.norm_2(x.reshape(-1, x.shape[-1]))
            w, ids = route(nxt.ffn.router(flat), top_k, nxt.ffn.norm_p)  # (N, k)
            score = torch.zeros(rt.plan.num_experts, device=w.device).index_add_(0, ids.reshape(-1), w.reshape(-1))
            order = [e for e in torch.argsort(score, descending=True).tolist() if score[e] > 0]
            rt.prefetch(layer, order)

        blocks[i].register_forward_hook(guess)


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


def enable_offloading(model: nn.Module, plan: PlacementPlan, layout: SlotLayout, *, backend: str | None = None,
                      non_expert_bytes: int, cache_dir: str | os.PathLike | None = None, prefetch: bool | None = None,
                      drop_page_cache: bool = False, direct: bool = False, timing: bool = False,
                      miss_policy: MissPolicy | None = None, policy: str = "lfu",
                      warm_start: bool = True, mmap: bool = False) -> OffloadRuntime:
    """Wrap every layer's experts in :class:`OffloadedExperts` per ``plan``; returns the runtime
    (also at ``model.offload``). ``prefetch``: guess the next block's experts and start bringing them
    in early (CUDA: side-stream copies; CPU: the reader thread, behind the current block's own
    misses). Default: on with CUDA, off on CPU, where reads are the bottleneck and a wrong guess
    spends exactly that: on the random-weight real-width 2-layer checkpoint the guesses moved 41%
    more bytes per token and decoding from the page cache took 193 instead of 157 ms/token
    (scripts/bench_offload.py with and without --prefetch). ``direct``: read the prepared file with O_DIRECT (CPU), bypassing the page
    cache, so the disk is what is measured. ``policy``: which experts stay in the
    slots: "lfu" (default: decayed LFU with frequency-aware admission, seeded with the routing counts
    of the checkpoint's quantize report when it has one; the best hit rate at every budget on the
    demo model's real routing, scripts/bench_placement.py), "lru" or "static" (the report's most-routed experts fill the slots and
    stay; others go through the staging slots). With a report, every policy starts with the hottest
    experts resident (``warm_start``; False starts empty) (scripts/bench_placement.py measures the
    policies on real routing)."""
    experts = [b.ffn.experts for b in model.transformer.blocks]
    assert all(hasattr(m, "expert_weights") for m in experts), "offloading needs quantized experts (QExperts)"
    dev = torch.device(plan.device)
    act_dtype = model.dtype
    src = getattr(model, "source_dir", None)
    key = prepared_file_key(src, backend, dev, layout, act_dtype)
    root = prepared_dir(cache_dir)
    path = root / f"{key}.bin" if key else Path(tempfile.mkdtemp(prefix="dbrxq-prepared-")) / "experts.bin"
    want = plan.n_layers * plan.num_experts * stride_of(layout.nbytes)
    identity = (prepared_identity(src, backend, dev, layout, act_dtype, plan.n_layers, plan.num_experts)
                if key else None)
    crcs = (read_prepared_sidecar(path, identity) if key and path.is_file() and path.stat().st_size == want
            else None)
    if crcs is not None:
        log.info("reusing prepared experts %s", path)
        file = PreparedExpertFile(path, layout.nbytes, plan.num_experts, crcs=crcs, drop_page_cache=drop_page_cache,
                                  direct=direct, sizes=layout.sizes() if layout.mixed else None)
    else:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(root)  # halves of files whose builder was killed
        free = shutil.disk_usage(path.parent).free
        if free < want:
            raise ConfigError(f"{path.parent}: the prepared-expert file needs {format_size(want)}, {format_size(free)} "
                              "free there; choose another place with --cache-dir or DBRXQ_CACHE, or free space "
                              "(`dbrxq cache --clear` removes earlier files)")
        log.warning("writing kernel-ready experts (%s) to %s, once per checkpoint and kernel; `dbrxq cache` lists "
                    "such files, `dbrxq cache --clear` removes them", format_size(want), path)
        file = PreparedExpertFile.build(path, experts, layout, backend, dev, act_dtype, identity=identity,
                                        drop_page_cache=drop_page_cache, direct=direct)
        if key is None:
            os.unlink(path)  # anonymous: the open descriptor keeps it readable until closed
            os.rmdir(path.parent)
    counts = routing_counts(src, plan.n_layers, plan.num_experts)
    observed = read_observed_routing(routing_path(path), plan.n_layers, plan.num_experts) if key else None
    if counts is None and observed is not None:  # no quantize report: what earlier runs of it routed
        log.info("expert placement from the routing observed in earlier runs (%s)", routing_path(path))
        counts = observed
    rt = OffloadRuntime(plan, layout, file, experts, act=experts[0].act, act_dtype=act_dtype,
                        non_expert_bytes=non_expert_bytes, miss_policy=miss_policy, timing=timing, policy=policy,
                        routing_counts=counts, mapped=mmap)
    if key:
        rt.routing_file = routing_path(path)
        if observed is not None:
            rt.observed = [list(r) for r in observed]
        # also at exit (a run of fewer than ROUTING_SAVE_EVERY forwards that never closes the runtime)
        weakref.finalize(rt, _save_routing, rt.routing_file, rt.observed)
    if warm_start or policy == "static":
        rt.place_hot()
    rt.model_config = model.config
    for i, block in enumerate(model.transformer.blocks):
        block.ffn.experts = OffloadedExperts(experts[i], i, rt)
    _install_hooks(model, rt, rt.cuda if prefetch is None else prefetch)
    model.offload = rt
    return rt


# --------------------------------------------------------------------------------------------
# Plans: from a checkpoint's headers (before loading) or from a model in memory
# --------------------------------------------------------------------------------------------
_QUANT_SUFFIXES = (".qweight", ".scales", ".qzeros")


def checkpoint_sizes(reader, config, backend: str | None, device: torch.device, act_dtype: torch.dtype):
    """(non-expert bytes, expert canonical bytes, slot layout) from headers and ONE expert's bytes.

    Non-expert: float tensors in the activation dtype; quantized ones (attention) on a CPU twice, for
    the canonical buffers and the kernel's copy made by finalize_load (on a GPU, the copy alone).
    """
    from quantize.config import QuantConfig
    from quantize.primitives import QuantizedTensor

    non_expert = 0
    for name in reader.keys():
        if ".ffn.experts." in name:
            continue
        numel = 1
        for d in reader.shape(name):
            numel *= d
        dt = reader.dtype(name)
        if name.endswith(_QUANT_SUFFIXES):
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
        """One expert's canonical tensors from the headers' tensors (mapped, read for the repack)."""
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
        # them back, or they stay in RSS outside every budget (97 MiB at real width, measured with
        # tests/dbrxq/test_offload.py's real-width RSS test before this release). (A PageReleaser made
        # now, after the reads: it knows only the file mappings that exist when it is made.)
        release = PageReleaser()
        for qt in canonical:
            for t in (qt.qweight, qt.scales, qt.qzeros):
                if t is not None:
                    release(t)
        return layout
    if mix is None:
        canonical = first_expert(0, "", 0, qc.experts)
        return non_expert, canonical_nbytes(canonical), layout_of(canonical)
    # per-expert recipes: one layout per recipe in use (a size class), from its first expert
    from quantize.format import MIXED_PART
    layouts, index, most = [], {}, 0
    for j, opt in enumerate(mix.options):
        where = next(((i, mix.members(i, j)) for i in range(config.n_layers) if mix.members(i, j)), None)
        if where is None:
            continue
        canonical = first_expert(where[0], "." + MIXED_PART.format(j), 0, opt)
        most = max(most, canonical_nbytes(canonical))
        index[j] = len(layouts)
        layouts.append(layout_of(canonical))
    return non_expert, most, MixedLayout(layouts, [[index[j] for j in row] for row in mix.choice])


def offload_model(model: nn.Module, *, device: torch.device | str | None = None, gpu_memory=None, cpu_memory=None,
                  context: int | None = None, batch_size: int = 1, kv_cache: str = "bf16",
                  backend: str | None = None, **kw) -> OffloadRuntime:
    """Offload a quantized model already in memory (e.g. from quantize_model_rtn); budgets as in
    dbrxq.load. ``kw`` goes to :func:`enable_offloading`."""
    from .placement import make_plan, parse_size
    dev = torch.device(device) if device is not None else model.device
    experts = [b.ffn.experts for b in model.transformer.blocks]
    canonical = max((m.expert_weights(e) for m in experts for e in range(m.num_experts)), key=canonical_nbytes)
    layout = model_layout(experts, backend, dev, model.dtype)
    non_expert = non_expert_bytes_of(model)
    plan = make_plan(model.config, device=dev, classes=layout_classes(layout),
                     gpu_memory=None if gpu_memory is None else parse_size(gpu_memory, "gpu_memory"),
                     cpu_memory=None if cpu_memory is None else parse_size(cpu_memory, "cpu_memory"),
                     non_expert_bytes=non_expert, expert_bytes=canonical_nbytes(canonical),
                     slot_bytes=layout.nbytes, context=context or model.config.max_seq_len,
                     batch_size=batch_size, kv_flavour=kv_cache, dtype=model.dtype)
    return enable_offloading(model, plan, layout, backend=backend, non_expert_bytes=non_expert, **kw)
