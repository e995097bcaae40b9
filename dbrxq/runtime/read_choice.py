"""Which way a source's misses are read, chosen by measurement: through the page cache or with O_DIRECT.

Neither wins everywhere. O_DIRECT streams from the disk with no copy and leaves the page cache alone,
which decodes a memory-starved model faster; but it never profits from pages already cached, so with
memory to spare, or experts that earlier runs left in the page cache, the buffered read is a memory copy
and wins (docs/benchmarks.md, "Low memory", measures both ways on one checkpoint). So each source (a
checkpoint's shards, a prepared file) times its own reads: :class:`ReadChoice` tries each way a few
times, then reads the cheaper one, still trying the other once every ``explore`` reads so that a change
(the page cache filling, or being taken by someone else) can move the choice, and moving only for a clear
difference (``margin``).

Where every read is dropped from the page cache (the process was given all the memory:
``cpu_memory="auto"``) no page can stay cached for a later read, and the files are read with O_DIRECT
without measuring: in bench_lowmem's cgroups every O_DIRECT run decoded faster than its page-cache twin,
while per-read measurement there sometimes chose the page cache (docs/benchmarks.md). Measurement is for
the other case, memory left to the page cache, where a cached expert's read is a memory copy several times
faster than the disk: a difference the margin (25%) does not hide.

A read's cost is its wall time plus the CPU time it takes (the reading thread's, user and system): on a
machine whose cores are all computing while the reader reads, a buffered read's copy out of the page
cache (and dropping the pages after it) is time taken from the computation, which its wall time alone
does not show; an O_DIRECT read's thread sleeps while the device writes into the slot. Costs are
seconds per byte, decayed, so a run's recent reads count most.
"""

from __future__ import annotations

import logging
import threading

from dbrxq.core.units import format_size

log = logging.getLogger(__name__)

CACHE, DIRECT = "page cache", "O_DIRECT"


class ReadChoice:
    """Per read: :meth:`pick` a way, do the read, :meth:`record` its bytes and seconds.

    ``warmup`` reads of each way first (alternating), then the way of the least decayed seconds per byte,
    except every ``explore``-th read, which takes the other; ``decay`` weighs the older average against
    each new read. Thread-safe (the reader thread and the compute thread may both read)."""

    def __init__(self, ways: tuple[str, ...] = (DIRECT, CACHE), *, warmup: int = 2, explore: int = 32,
                 decay: float = 0.75, margin: float = 0.25, name: str = ""):
        self.ways, self.warmup, self.explore, self.decay, self.name = ways, warmup, explore, decay, name
        self.margin = margin
        self.cost: dict[str, float | None] = {w: None for w in ways}  # decayed seconds per byte
        self.reads = {w: 0 for w in ways}
        self.bytes = {w: 0 for w in ways}
        self.seconds = {w: 0.0 for w in ways}
        self.cpu = {w: 0.0 for w in ways}
        self.picks = 0
        self.current: str | None = None
        self._lock = threading.Lock()

    def best(self) -> str | None:
        """The way of the least measured cost (the current one unless another costs ``margin`` less), None
        while any way is still warming up."""
        if any(self.reads[w] < self.warmup for w in self.ways):
            return None
        cheapest = min(self.ways, key=lambda w: self.cost[w])
        if self.current is not None and self.cost[cheapest] >= (1 - self.margin) * self.cost[self.current]:
            return self.current
        return cheapest

    def pick(self) -> str:
        with self._lock:
            n, self.picks = self.picks, self.picks + 1
            best = self.best()
            if best is None:  # warming up: the way with the fewest reads, in order
                return min(self.ways, key=lambda w: self.reads[w])
            if n % self.explore == 0:
                others = [w for w in self.ways if w != best]
                return others[(n // self.explore) % len(others)]
            return best

    def record(self, way: str, nbytes: int, seconds: float, cpu: float = 0.0) -> None:
        """A read of ``nbytes`` by ``way`` that took ``seconds`` of wall time and ``cpu`` seconds of its thread's
        CPU time."""
        with self._lock:
            spb = (seconds + cpu) / max(nbytes, 1)
            old = self.cost[way]
            self.cost[way] = spb if old is None else self.decay * old + (1 - self.decay) * spb
            self.reads[way] += 1
            self.bytes[way] += nbytes
            self.seconds[way] += seconds
            self.cpu[way] += cpu
            best = self.best()
            if best is not None and best != self.current:
                log.info("%sreading experts %s (%.2f s/GB of wall and CPU time measured) rather than %s",
                         f"{self.name}: " if self.name else "", "with O_DIRECT" if best == DIRECT else
                         "through the page cache", self.cost[best] * 1e9,
                         ", ".join(f"{w} ({self.cost[w] * 1e9:.2f} s/GB)" for w in self.ways if w != best))
                self.current = best

    def summary(self) -> str:
        """One line for --stats: each way's reads and measured rate, and the way now chosen."""
        parts = [f"{w} {self.reads[w]} reads at {format_size(self.bytes[w] / self.seconds[w]) if self.seconds[w] else '-'}/s"
                 f" ({self.cpu[w] / self.seconds[w] if self.seconds[w] else 0:.0%} CPU)" for w in self.ways]
        return f"reads by measurement: {', '.join(parts)}; now {self.current or 'warming up'}"
