"""Giving back the pages of memory-mapped checkpoint tensors.

safetensors returns CPU tensors backed by the memory-mapped shard, so reading a tensor costs no
anonymous memory, but every page a kernel touches (e.g. while repacking the canonical codes)
stays mapped and counts in our RSS. ``PageReleaser`` drops those page-table entries with
madvise(MADV_DONTNEED), and only for addresses inside a mapping of a regular file: for a
read-only file mapping that is safe (the next access re-reads the page from the page cache or
disk), whereas on anonymous memory it would zero the data. Also: page-aligned buffers (O_DIRECT
reads whole 4 KiB pages into page-aligned memory) and giving freed heap back (``trim_heap``).
"""

from __future__ import annotations

import ctypes
import mmap

import torch

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of regular files (from /proc/self/maps)."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5].startswith("/"):
                    a, b = (int(x, 16) for x in parts[0].split("-"))
                    out.append((a, b))
    except OSError:
        pass
    return out


class PageReleaser:
    """madvise(MADV_DONTNEED) on the whole pages inside a tensor's bytes, ONLY when they lie in a
    file mapping (for anonymous memory MADV_DONTNEED would zero the data). For a read-only use of
    a file mapping this only drops our page-table entries: the next access re-reads the file."""

    def __init__(self) -> None:
        self.maps = _file_mappings()
        try:
            self.libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            self.libc = None

    def __call__(self, t: torch.Tensor) -> None:
        if t.device.type == "cpu":
            self.range(t.data_ptr(), t.numel() * t.element_size())

    def range(self, start: int, nbytes: int) -> None:
        """The same for ``nbytes`` bytes at address ``start`` (e.g. a numpy view of a mapped file)."""
        end = start + nbytes
        if self.libc is None or not any(a <= start and end <= b for a, b in self.maps):
            return
        a, b = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
        if b > a:
            self.libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), _MADV_DONTNEED)


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc's malloc_trim; a no-op elsewhere).

    Repacking thousands of expert matrices frees many temporaries of a few MB each; glibc's
    dynamic mmap threshold keeps such blocks in the heap afterwards. Measured on a real-width
    2-layer int4 checkpoint (3.2 GiB): trimming only at the end of loading, anonymous memory
    peaked at 2x the repacked weights (7.8 GiB RSS); trimming after each module keeps it near 1x.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


PAGE = 4096  # O_DIRECT's alignment: reads of whole pages into page-aligned buffers


def whole_pages(nbytes: int) -> int:
    """``nbytes`` rounded up to whole pages."""
    return -(-nbytes // PAGE) * PAGE


def aligned_empty(nbytes: int, align: int = PAGE) -> torch.Tensor:
    """A CPU uint8 tensor of ``nbytes`` whose first byte sits on an ``align`` boundary (what
    O_DIRECT reads need); a view of a slightly larger allocation."""
    base = torch.empty(nbytes + align, dtype=torch.uint8)
    off = -base.data_ptr() % align
    return base[off:off + nbytes]


_LIBC = None


def in_page_cache(address: int, length: int) -> bool:
    """Whether every page of the mapped range [address, address + length) is in memory (mincore(2)): for a
    file mapping, whether the page cache holds it, so reading it costs no I/O. False when the kernel will not
    say (mincore refused, e.g. for a file the process may neither write nor owns; or no libc)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _LIBC = False
    if _LIBC is False or length <= 0:
        return False
    start = address - address % _PAGE
    pages = -(-(address + length - start) // _PAGE)
    vec = (ctypes.c_ubyte * pages)()
    if _LIBC.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * _PAGE), vec) != 0:
        return False
    return bool((torch.frombuffer(vec, dtype=torch.uint8) & 1).all())
