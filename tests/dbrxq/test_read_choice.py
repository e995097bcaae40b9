"""How misses are read, chosen by measurement (dbrxq.runtime.read_choice): the chooser on made-up timings,
then an offloaded model reading both ways with the resident model's bits, and the fallbacks."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from dbrxq.cli.options import offload_options
from dbrxq.loading.offloading import offload_model
from dbrxq.runtime import prepared
from dbrxq.runtime.read_choice import CACHE, DIRECT, ReadChoice
from tests.dbrxq.test_offload import (  # noqa: F401 (reference: a fixture)
    budget_for, quantized_model, reference, refuse_o_direct, run_steps)

MB = 1 << 20


def feed(choice: ReadChoice, reads: int, seconds_per_mb: dict[str, float], cpu_per_mb: dict | None = None) -> list[str]:
    """``reads`` reads of 1 MiB each at the given wall (and CPU) times; the ways picked, in order."""
    ways = []
    for _ in range(reads):
        w = choice.pick()
        choice.record(w, MB, seconds_per_mb[w], (cpu_per_mb or {}).get(w, 0.0))
        ways.append(w)
    return ways


def test_warms_up_both_ways_then_reads_the_faster_and_still_explores():
    c = ReadChoice(warmup=2, explore=8)
    ways = feed(c, 4, {DIRECT: 0.001, CACHE: 0.004})
    assert sorted(ways) == sorted([CACHE, CACHE, DIRECT, DIRECT])  # two of each first
    ways = feed(c, 32, {DIRECT: 0.001, CACHE: 0.004})
    assert ways.count(CACHE) == 4 and ways.count(DIRECT) == 28  # one read in 8 tries the slower way
    assert c.current == DIRECT and c.best() == DIRECT
    line = c.summary()
    assert "O_DIRECT 30 reads" in line and "page cache 6 reads" in line and line.endswith("now O_DIRECT")


def test_the_choice_follows_a_change():
    """The page cache warming up (earlier runs' pages, memory to spare): its reads become memory copies."""
    c = ReadChoice(warmup=2, explore=4, decay=0.5)
    feed(c, 16, {DIRECT: 0.001, CACHE: 0.004})
    assert c.current == DIRECT
    feed(c, 32, {DIRECT: 0.001, CACHE: 0.0002})
    assert c.current == CACHE
    assert feed(c, 8, {DIRECT: 0.001, CACHE: 0.0002}).count(CACHE) == 6


def test_cpu_time_counts_and_small_differences_do_not_move_the_choice():
    """Equal wall times, but the buffered read copies (CPU time taken from computing): O_DIRECT. Then the page
    cache 5% cheaper: within the margin, the choice stays; 30% cheaper: it moves."""
    c = ReadChoice(warmup=2, explore=4, margin=0.1)  # (the default margin is 25%)
    feed(c, 12, {DIRECT: 0.001, CACHE: 0.001}, {CACHE: 0.0005})
    assert c.current == DIRECT
    feed(c, 24, {DIRECT: 0.001, CACHE: 0.00095})
    assert c.current == DIRECT
    feed(c, 24, {DIRECT: 0.001, CACHE: 0.0007})
    assert c.current == CACHE
    assert "% CPU)" in c.summary()


def test_offloaded_reads_take_both_ways_and_keep_the_bits(reference, tmp_path):  # noqa: F811
    m = quantized_model()
    # direct=None: measured (every miss read: none computed from the page cache, which holds the file just written)
    rt = offload_model(m, cpu_memory=budget_for(1), context=32, cache_dir=tmp_path, map_cached=False)
    got = run_steps(m, rt.kv_factory)
    assert all(torch.equal(a, b) for a, b in zip(got, reference))
    if rt.file.dfd < 0:
        pytest.skip("this file system refuses O_DIRECT: one way only")
    c = rt.file.choice
    assert c is not None and c.reads[DIRECT] >= c.warmup and c.reads[CACHE] >= c.warmup
    assert c.current in (DIRECT, CACHE)
    # a first read into a buffer is not measured (it also faults the buffer's pages in)
    assert sum(c.reads.values()) == rt.cache.counters.misses - len(rt.file.filled) > 0


@pytest.mark.parametrize("direct, way", [(True, DIRECT), (False, CACHE)])
def test_a_forced_way_is_the_only_way(reference, tmp_path, direct, way):  # noqa: F811
    m = quantized_model()
    rt = offload_model(m, cpu_memory=budget_for(1), context=32, cache_dir=tmp_path, direct=direct)
    assert rt.file.choice is None
    if not direct:
        assert rt.file.dfd == -1
    got = run_steps(m, rt.kv_factory)
    assert all(torch.equal(a, b) for a, b in zip(got, reference))


def test_without_o_direct_the_measured_choice_quietly_uses_the_page_cache(reference, tmp_path, monkeypatch,  # noqa: F811
                                                                           caplog):
    refuse_o_direct(monkeypatch)
    m = quantized_model()
    with caplog.at_level(logging.INFO, logger="dbrxq.runtime.prepared"):
        rt = offload_model(m, cpu_memory=budget_for(1), context=32, cache_dir=tmp_path)
    assert rt.file.dfd == -1 and rt.file.choice is None and not rt.file.drop_page_cache  # nothing forced
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "O_DIRECT" in r.getMessage()]
    got = run_steps(m, rt.kv_factory)
    assert all(torch.equal(a, b) for a, b in zip(got, reference))


def test_cli_flags():
    assert offload_options(None, None, None, None) == {}
    assert offload_options(None, None, None, True)["direct"] is True
    assert offload_options(None, None, None, False)["direct"] is False



def test_with_every_read_dropped_o_direct_is_read_without_measuring(reference, tmp_path):  # noqa: F811
    """drop_page_cache (what cpu_memory="auto" sets): no page outlives a read, so nothing is measured."""
    m = quantized_model()
    rt = offload_model(m, cpu_memory=budget_for(1), context=32, cache_dir=tmp_path, drop_page_cache=True)
    assert rt.file.choice is None and not rt.file.forced_direct
    got = run_steps(m, rt.kv_factory)
    assert all(torch.equal(a, b) for a, b in zip(got, reference))


def test_a_miss_the_page_cache_holds_is_computed_where_it_lies(reference, tmp_path, monkeypatch):  # noqa: F811
    """Where the page cache is not dropped, a miss the cache does not admit (no slots here) whose pages are all
    in the page cache is computed from the mapping, with no copy into a staging slot; one whose pages are not
    is read. The same bits either way."""
    m = quantized_model()
    rt = offload_model(m, cpu_memory=budget_for(0), context=32, cache_dir=tmp_path)
    assert rt.map_cached
    for layer in range(2):  # every expert's pages into the page cache
        for e in range(16):
            _, off, n = rt.file.locate(layer, e)
            os.pread(rt.file.fd, n, off)
    assert all(rt.file.in_page_cache(layer, e) for layer in range(2) for e in range(16))
    got = run_steps(m, rt.kv_factory)
    assert all(torch.equal(a, b) for a, b in zip(got, reference))
    ph = rt.stats.phases["decode"]
    assert ph.from_page_cache == ph.misses > 0
    monkeypatch.setattr(prepared, "in_page_cache", lambda address, length: False)  # the kernel will not say
    before = ph.from_page_cache
    got = run_steps(m, rt.kv_factory)
    assert all(torch.equal(a, b) for a, b in zip(got, reference))
    assert ph.from_page_cache == before


def test_in_page_cache_reads_the_kernels_answer(tmp_path):
    """mincore on a file just read (in the page cache) and after the page cache dropped it."""
    import mmap
    from dbrxq.core.pages import in_page_cache
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
        t = torch.frombuffer(mm, dtype=torch.uint8)
        os.pread(fd, 1 << 20, 0)
        assert in_page_cache(t.data_ptr(), 1 << 20)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 1 << 20, os.POSIX_FADV_DONTNEED)
        assert not in_page_cache(t.data_ptr(), 1 << 20)
        del t
        mm.close()
    finally:
        os.close(fd)
