"""Bringing missed experts in: the CPU reader thread (reads overlapped with compute) and the miss
policies (move a missed expert into a slot, or compute it where its bytes are).

On a CPU-only run computing a missed expert "where it lives" would read the same bytes as copying
it, so a miss always moves (:class:`AlwaysMove`). With CUDA, :class:`MeasuredMissPolicy` times once,
per token count, one host-to-device copy + GPU compute against one CPU computation from the
canonical bytes and picks the cheaper.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time

from dbrxq.runtime.prepared import PreparedExpertFile

log = logging.getLogger(__name__)


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
    ``len(staging)`` such experts are in memory at once. ``delay`` (tests) sleeps before each read.

    Two queues: a step's misses (urgent, in the order they will be computed) go before background
    reads (the warm start filling the cache with the hottest experts, speculative prefetch), which
    would otherwise make the first tokens wait behind gigabytes of guesses. A background read whose
    slot is given to another expert before it ran is cancelled (:meth:`cancel`); one already running
    finishes first (one thread), so the slot's new read always lands last. A background read that a
    step turns out to use is promoted (:meth:`promote`) to the urgent queue, ahead of the step's misses."""

    def __init__(self, file: PreparedExpertFile, staging: list, delay: float = 0.0):
        self.file, self.delay = file, delay
        self._cv = threading.Condition()
        self._urgent: collections.deque = collections.deque()
        self._later: collections.deque = collections.deque()
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for slot in staging:
            self.free.put(slot)
        self.thread = threading.Thread(target=self._run, name="dbrxq-reader", daemon=True)
        self.thread.start()

    def submit(self, layer: int, expert: int, slot=None, *, background: bool = False) -> ReadJob:
        job = ReadJob(layer, expert, slot)
        with self._cv:
            (self._later if background else self._urgent).append(job)
            self._cv.notify()
        return job

    def cancel(self, job: ReadJob) -> None:
        """Drop a background read that has not started (its slot is taken for another expert)."""
        with self._cv:
            try:
                self._later.remove(job)
            except ValueError:  # already running or done: it completes before any later read
                return
        job.done.set()

    def promote(self, job: ReadJob) -> None:
        """Move a background read that has not started to the end of the urgent queue: a step uses
        its expert, and the step's own misses (urgent, queued after) may wait on staging slots that
        only its computing frees, so leaving it behind them would never finish."""
        with self._cv:
            try:
                self._later.remove(job)
            except ValueError:  # running, done or already urgent
                return
            self._urgent.append(job)

    def release(self, slot) -> None:
        self.free.put(slot)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._urgent and not self._later:
                    self._cv.wait()
                job = self._urgent.popleft() if self._urgent else self._later.popleft()
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
        with self._cv:
            self._urgent.append(None)
            self._cv.notify()
        self.thread.join()


STAGING_SLOTS = 2  # CPU: misses read ahead into these while compute works on another expert
