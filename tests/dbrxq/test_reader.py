"""The offloading reader's order: a step's misses before background reads, except those the step uses;
cancelled reads never run."""

from __future__ import annotations

import threading

from dbrxq.runtime.reader import Reader


class _File:
    """Records the order of reads; the first read blocks until released, so the test can queue behind it."""

    def __init__(self):
        self.order: list[tuple[int, int]] = []
        self.gate = threading.Event()

    def read_into(self, layer, expert, buffer):
        if not self.order:
            self.order.append((layer, expert))
            self.gate.wait(10)
            return
        self.order.append((layer, expert))


class _Slot:
    def __init__(self):
        self.expert, self.buffer, self.pending = None, bytearray(8), None


def test_urgent_reads_go_before_background_and_cancelled_ones_never_run():
    f = _File()
    reader = Reader(f, staging=[])
    try:
        first = reader.submit(0, 0, _Slot())
        while not f.order:  # the reader thread holds the first job
            threading.Event().wait(0.001)
        warm = [reader.submit(0, e, _Slot(), background=True) for e in (1, 2, 3)]
        reader.cancel(warm[1])
        reader.promote(warm[2])  # a step uses it: before the step's misses
        miss = reader.submit(1, 7, _Slot())
        f.gate.set()
        for job in (first, *warm, miss):
            job.wait()
        assert f.order == [(0, 0), (0, 3), (1, 7), (0, 1)]
        assert warm[1].done.is_set() and warm[1].slot.expert is None  # dropped, its slot untouched
        reader.cancel(first)  # already done: no-ops
        reader.promote(first)
    finally:
        reader.close()
