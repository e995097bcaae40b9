#!/usr/bin/env python
"""Why dbrxq's serving engine runs every torch call on one thread: a batched decode step of the demo
model on the thread that loaded it, then on a second thread of the same process.

    python scripts/bench_threads.py            # 8 rows per step, 20 steps each
    python scripts/bench_threads.py --rows 1

With OpenMP, once one thread has run torch's parallel regions, its idle worker pool competes with
the pool of any other thread that runs torch; on a 2-core machine the second thread's steps are
several times slower. dbrxq.serve.engine.Engine therefore loads the model on its worker thread too.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dbrxq  # noqa: E402
from dbrxq.core.sysinfo import describe_machine  # noqa: E402
from dbrxq.model.kv_cache import SlotPool, make_kv_cache  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    model = dbrxq.load().model
    B = a.rows
    pool = SlotPool(make_kv_cache(model.config, B, 256, dtype=model.dtype, device="cpu"))
    for b in range(B):
        pool.length[pool.acquire()] = 10 + b
    tok = torch.randint(0, 1000, (B, 1))
    pos = torch.tensor([[10 + b] for b in range(B)])

    def timed() -> float:
        torch.set_grad_enabled(False)
        for _ in range(3):
            model(tok, position_ids=pos, past_key_values=pool.view(list(range(B))), use_cache=True)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            model(tok, position_ids=pos, past_key_values=pool.view(list(range(B))), use_cache=True)
        return (time.perf_counter() - t0) / a.steps * 1e3

    print(describe_machine())
    first = timed()
    out: list[float] = []
    t = threading.Thread(target=lambda: out.append(timed()))
    t.start()
    t.join()
    print(f"{B} rows per decode step: {first:.1f} ms on the thread that loaded the model, {out[0]:.1f} ms on a "
          f"second thread ({out[0] / first:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
