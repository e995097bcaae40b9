"""Helpers shared by the engine tests (tests/dbrxq/test_engine.py) and the CUDA tests, importing
nothing the GPU machine lacks (the server's FastAPI)."""

import threading

from dbrxq.serve.engine import Request


def collect(engine, reqs_kw, stagger: int = 0):
    """Submit requests (the last ``stagger`` after the first tokens of the others); their tokens and ends."""
    out = [[] for _ in reqs_kw]
    ends = [None] * len(reqs_kw)
    done = threading.Semaphore(0)
    first = threading.Event()

    def emit_for(i):
        def emit(ev):
            if ev.token is not None:
                out[i].append(ev.token)
                first.set()
            else:
                ends[i] = ev.finish
                done.release()
        return emit
    n = len(reqs_kw) - stagger
    for i, kw in enumerate(reqs_kw[:n]):
        engine.submit(Request(emit=emit_for(i), **kw))
    assert first.wait(60)
    for i, kw in enumerate(reqs_kw[n:], start=n):
        engine.submit(Request(emit=emit_for(i), **kw))
    for _ in reqs_kw:
        assert done.acquire(timeout=120)
    return out, ends
