"""The disk tier of offloading: the prepared-expert file.

Every expert in the compute device's kernel layout, one slot image per expert at a stride of whole
4 KiB pages, made once per (checkpoint, backend, device) and reused. Why a file and not the
checkpoint: the checkpoint holds the canonical layout, and turning one real-width expert into the
fast CPU kernel's layout costs ~0.7 s (3 x 240 ms, cpu_q4, AVX2 box) against ~25 ms to compute it,
so a miss served from the checkpoint would be 30x slower than the read it needs. A miss reads the
slot image with ``os.preadv`` straight into its slot: one copy from the page cache (or, with
``direct``, O_DIRECT from the disk), no mapping, so RSS stays within the budget. The file is a
cache, untrusted like a checkpoint: a sidecar records what it was built from and a CRC-32 per expert.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import mmap
import os
import stat
import time
import zlib
from pathlib import Path

import torch

from dbrxq.core.errors import CheckpointError, ConfigError, DbrxqError
from dbrxq.core.files import temp_path, write_json_atomic
from dbrxq.core.pages import PAGE, PageReleaser, in_page_cache, whole_pages
from dbrxq.core.untrusted import MAX_INDEX_BYTES, is_int, read_json
from dbrxq.formats.checkpoint import CheckpointReader
from dbrxq.plan.slots import SlotLayout, prepare_expert
from dbrxq.runtime.read_choice import CACHE, DIRECT, ReadChoice
from quantize import cext
from quantize.blocks import check_numbers
from quantize.primitives import check_qparams
from quantize.specs import expert_stack

log = logging.getLogger(__name__)


class ExpertFiles:
    """Where the runtime reads experts it does not hold: for each (layer, expert) a file, a page-aligned
    offset and a size. A miss reads the bytes with ``preadv`` into a slot (through the page cache, or
    with O_DIRECT from the disk when opened ``direct`` and the destination is page-aligned), or
    computes from them in place in a read-only mapping (:meth:`mapped`). The first read of each expert
    in a process checks it (:meth:`verify`)."""

    ALIGN = PAGE

    def __init__(self, paths: list[Path], *, drop_page_cache: bool = False, direct: bool | None = False):
        self.paths = [Path(p) for p in paths]
        self.drop_page_cache = drop_page_cache
        self.verified: set[tuple[int, int]] = set()
        self.fds = [os.open(p, os.O_RDONLY) for p in self.paths]
        self.dfds = [-1] * len(self.paths)  # O_DIRECT descriptors: reads from the disk, never the page cache
        self.mms: list = [None] * len(self.paths)
        self.maddr: list[int | None] = [None] * len(self.paths)  # each mapping's address (in_page_cache)
        # destinations read into before: a first read into a buffer also faults its pages in (zero-filling them),
        # a cost of the buffer, not of the way it was read, so it is not measured
        self.filled: set[int] = set()
        # direct True: O_DIRECT; False: the page cache; None: O_DIRECT where every read is dropped from the page
        # cache (the process has all the memory: cached pages cannot outlive a read), else both ways, chosen per
        # read by their measured cost (read_choice), as the page cache may already hold the experts
        self.forced_direct = direct is True
        self.choice = ReadChoice(name=str(self.paths[0].parent if len(self.paths) > 1 else self.paths[0])) \
            if direct is None and not drop_page_cache else None
        if direct is not False:
            try:
                self.dfds = [os.open(p, os.O_RDONLY | getattr(os, "O_DIRECT", 0)) for p in self.paths]
            except OSError as e:
                self._no_direct(e)

    @property
    def path(self) -> Path:
        return self.paths[0]

    @property
    def fd(self) -> int:
        return self.fds[0]

    @property
    def dfd(self) -> int:
        return self.dfds[0]

    def locate(self, layer: int, expert: int) -> tuple[int, int, int]:
        """(file index, byte offset, bytes) of expert (layer, e)."""
        raise NotImplementedError

    def verify(self, layer: int, expert: int, data: torch.Tensor) -> None:
        """Check expert (layer, e)'s bytes (uint8) on their first read; raise CheckpointError if damaged."""

    def _no_direct(self, e: OSError) -> None:
        for i, d in enumerate(self.dfds):
            if d >= 0:
                os.close(d)
            self.dfds[i] = -1
        if not self.forced_direct:  # not asked for: the page cache is the one way left, as it is
            log.info("%s: O_DIRECT is not supported here (%s); reading through the page cache", self.path,
                     e.strerror or e)
            self.choice = None
            return
        log.warning("%s: O_DIRECT is not supported here (%s); reading through the page cache and dropping "
                    "each read from it", self.path, e.strerror or e)
        self.drop_page_cache = True

    def read_into(self, layer: int, expert: int, dst: torch.Tensor) -> None:
        """dst: CPU uint8, at least the expert's bytes (a slot in RAM, or pinned staging for a GPU). A
        page-aligned dst of whole pages is read with O_DIRECT when the files were opened ``direct``."""
        f, off, n = self.locate(layer, expert)
        whole = whole_pages(n)  # O_DIRECT reads whole pages
        can = self.dfds[f] >= 0 and dst.numel() >= whole and dst.data_ptr() % self.ALIGN == 0 and off % self.ALIGN == 0
        choice = self.choice if can else None
        way = choice.pick() if choice is not None else DIRECT if can else CACHE
        t0, c0 = time.perf_counter(), time.thread_time()
        if way == DIRECT:
            try:
                got = os.preadv(self.dfds[f], [memoryview(dst[:whole].numpy()).cast("B")], off)
            except OSError as e:  # a file system that opens O_DIRECT but refuses the read
                self._no_direct(e)
                return self.read_into(layer, expert, dst)
            got = min(got, n)
        else:
            got = os.preadv(self.fds[f], [memoryview(dst[:n].numpy()).cast("B")], off)
            if self.drop_page_cache:
                os.posix_fadvise(self.fds[f], off, whole_pages(n), os.POSIX_FADV_DONTNEED)
        if choice is not None and dst.data_ptr() in self.filled:
            choice.record(way, n, time.perf_counter() - t0, time.thread_time() - c0)
        self.filled.add(dst.data_ptr())
        if got != n:
            self.damaged(layer, expert, f"short read ({got} of {n} bytes)")
        if (layer, expert) not in self.verified:
            self.verify(layer, expert, dst[:n])
            self.verified.add((layer, expert))

    def damaged(self, layer: int, expert: int, why: str) -> None:
        raise CheckpointError(f"{self.path}: expert {expert} of layer {layer} is damaged ({why})")

    def mapped(self, layer: int, expert: int) -> torch.Tensor:
        """Expert (layer, e)'s bytes in place, in a read-only mapping of its file (no copy: served by
        the page cache, or faulted in from the disk); hand them back with :meth:`unmap`."""
        f, off, n = self.locate(layer, expert)
        t = torch.frombuffer(self._mapping(f), dtype=torch.uint8, count=n, offset=off)
        if (layer, expert) not in self.verified:
            self.verify(layer, expert, t)
            self.verified.add((layer, expert))
        return t

    def in_page_cache(self, layer: int, expert: int) -> bool:
        """Whether the page cache holds every page of expert (layer, e) (mincore on a mapping of its file;
        False where the kernel will not say): computing from the mapping then reads memory."""
        f, off, n = self.locate(layer, expert)
        self._mapping(f)
        return in_page_cache(self.maddr[f] + off, n)

    def _mapping(self, f: int) -> mmap.mmap:
        """File f mapped read-only (private: never written, never copied), once, and its address."""
        if self.mms[f] is None:
            self.mms[f] = mmap.mmap(self.fds[f], 0, access=mmap.ACCESS_COPY)
            buf = ctypes.c_char.from_buffer(self.mms[f])  # its address; the export ends with the object
            self.maddr[f] = ctypes.addressof(buf)
            del buf
        return self.mms[f]

    def unmap(self, layer: int, expert: int) -> None:
        """Drop expert (layer, e)'s pages from this process (MADV_DONTNEED: they stay in the page
        cache, and count in our RSS no more)."""
        f, off, n = self.locate(layer, expert)
        start = off - off % PAGE
        self.mms[f].madvise(mmap.MADV_DONTNEED, start, whole_pages(off + n - start))

    def close(self) -> None:
        for i, m in enumerate(self.mms):
            if m is not None:
                m.close()
                self.mms[i] = self.maddr[i] = None
        for fds in (self.fds, self.dfds):
            for i, d in enumerate(fds):
                if d >= 0:
                    os.close(d)
                    fds[i] = -1


class CheckpointExperts(ExpertFiles):
    """The experts of a checkpoint stored in the kernel's blocks, read where they are: each expert's slot
    image is a page-aligned range of its layer's ``ffn.experts.mlp.qblocks`` tensor in a shard (the
    writers put those first, after a page-padded header), so nothing is prepared or copied to a second
    file. The first read of each expert checks its scales and zero points (a damaged checkpoint is
    refused with one line, and left as it is: it is the user's file)."""

    def __init__(self, folder: Path, experts: list, *, drop_page_cache: bool = False, direct: bool | None = False):
        self.experts = experts  # QBlocksExperts per layer: where each expert sits in its stacks
        self.table: list[list[tuple[int, int, int]]] = []
        files: dict[Path, int] = {}
        with CheckpointReader(folder) as reader:
            for layer, mod in enumerate(experts):
                row = []
                for e in range(mod.num_experts):
                    j, r = mod.where[e]
                    name = expert_stack(layer, None if not mod.mixed else j)
                    path = reader.file_of(name)
                    f = files.setdefault(path, len(files))
                    slot = mod.slots[j]
                    row.append((f, reader.data_offset(name) + r * slot.stride, slot.nbytes))
                self.table.append(row)
        super().__init__(list(files), drop_page_cache=drop_page_cache, direct=direct)
        if direct is not False and any(off % PAGE for row in self.table for _, off, _ in row):
            if direct:
                log.warning("%s: its experts do not start on 4 KiB pages; reading them through the page cache", folder)
            self._no_direct(OSError("its experts do not start on 4 KiB pages"))

    def locate(self, layer: int, expert: int) -> tuple[int, int, int]:
        return self.table[layer][expert]

    def verify(self, layer: int, expert: int, data: torch.Tensor) -> None:
        mod = self.experts[layer]
        j, _ = mod.where[expert]
        slot = mod.slots[j]
        for kind, view, (n, k) in zip(("w1", "v1", "w2"), slot.views(data), slot.shapes()):
            check_numbers(view, slot.bits, n, k, slot.group_size, slot.asym,
                          f"{self.paths[self.table[layer][expert][0]]}: expert {expert} {kind} of layer {layer}")


class PreparedExpertFile(ExpertFiles):
    """Slot image of expert (layer, e) at byte ``(layer * E + e) * stride``: the experts of a canonical
    checkpoint, repacked once for the kernel (or of any checkpoint for a GPU, whose kernels have
    layouts of their own).

    The file is a cache, so it is untrusted like a checkpoint: a JSON sidecar (``<name>.json``,
    written after the file is complete) records what it was built from (:func:`prepared_identity`)
    and a CRC-32 of every expert's bytes. The first read of each expert in a process checks its
    CRC (one pass over bytes just read; later reads of the same expert skip it); a mismatch
    removes the file and its sidecar and stops with one line, so the next run rebuilds it.
    """

    FORMAT = "dbrxq-prepared-experts-v2"  # v2: experts at a stride of whole 4 KiB pages (O_DIRECT)

    def __init__(self, path: Path, nbytes: int, num_experts: int, *, crcs: list[int] | None = None,
                 drop_page_cache: bool = False, direct: bool | None = False, sizes: list[int] | None = None):
        super().__init__([path], drop_page_cache=drop_page_cache, direct=direct)
        self.nbytes, self.num_experts = nbytes, num_experts
        self.sizes = sizes  # per expert (layer-major) when they differ (MixedLayout), else every one nbytes
        self.stride = stride_of(nbytes)
        self.crcs = crcs

    def locate(self, layer: int, expert: int) -> tuple[int, int, int]:
        idx = layer * self.num_experts + expert
        return 0, idx * self.stride, self.size(idx)

    def size(self, idx: int) -> int:
        """Bytes of expert ``idx`` (layer-major) in the file."""
        return self.nbytes if self.sizes is None else self.sizes[idx]

    def verify(self, layer: int, expert: int, data: torch.Tensor) -> None:
        if self.crcs is not None and zlib.crc32(memoryview(data.numpy()).cast("B")) != \
                self.crcs[layer * self.num_experts + expert]:
            self.damaged(layer, expert, "its CRC-32 differs from the one recorded when the file was written")

    def damaged(self, layer: int, expert: int, why: str) -> None:
        for p in (self.path, sidecar_path(self.path)):
            with contextlib.suppress(OSError):
                p.unlink()
        raise CheckpointError(f"{self.path}: prepared-expert file damaged at layer {layer} expert {expert} ({why}); "
                              f"removed it, rerun to rebuild it from the checkpoint")

    @classmethod
    def build(cls, path: Path, experts: list, layout: SlotLayout, backend: str | None, device: torch.device,
              act_dtype: torch.dtype, *, identity: dict | None = None, **kw) -> PreparedExpertFile:
        """Write every expert of ``experts`` (QExperts-like: expert_weights(e)) atomically, then its
        sidecar (``identity`` + per-expert CRC-32)."""
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
    lib = cext.load()
    files = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(source_dir).glob("*.safetensors"))]
    return {"format": PreparedExpertFile.FORMAT, "source": str(Path(source_dir).resolve()), "files": files,
            "backend": str(backend), "device": device.type, "act_dtype": str(act_dtype),
            "kernel_layout": lib.dbrxq_layout_version() if lib is not None else 0, "cpu_path": str(cext.cpu_path()),
            "torch": torch.__version__, "slot_bytes": layout.nbytes, "n_layers": n_layers, "num_experts": num_experts,
            **({"size_classes": [lay.nbytes for lay in layout.layouts], "class_of": layout.of} if layout.mixed else {})}


def reusable_prepared(path: Path, want: int) -> bool:
    """Whether ``path`` holds a prepared-expert file that may be read: a regular file of ``want`` bytes
    that opens. The cache folder is dbrxq's own, so what cannot be reused is replaced: a symbolic
    link (never followed: it could lead anywhere) and a file that cannot be read are removed, a file
    of another size is rebuilt over; something that cannot be replaced (a folder) is refused in one line."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        log.warning("%s: a symbolic link where a prepared-expert file belongs; removed it (not followed), "
                    "rebuilding the file", path)
        path.unlink()
        return False
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise ConfigError(f"{path}: {kind} where dbrxq keeps a prepared-expert file; remove it, or choose another "
                          f"--cache-dir")
    if st.st_size != want:
        return False
    try:
        os.close(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)))
    except OSError as e:
        log.warning("%s: cannot read it (%s); removed it, rebuilding the file", path, e.strerror or e)
        path.unlink()
        return False
    return True


def read_prepared_sidecar(path: Path, identity: dict) -> list[int] | None:
    """The per-expert CRCs of the prepared file at ``path`` if its sidecar is well-formed and records
    exactly ``identity``; None otherwise (the file is then rebuilt)."""
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
    lib = cext.load()
    kernel_layout = lib.dbrxq_layout_version() if lib is not None else 0  # the C kernel's byte layout
    h.update(f"{backend}:{device.type}:{act_dtype}:{layout.nbytes}:{torch.__version__}:{cext.cpu_path()}:"
             f"{kernel_layout}".encode())
    if layout.mixed:
        h.update(f"{layout.describe()}:{layout.of}".encode())
    return h.hexdigest()[:20]
