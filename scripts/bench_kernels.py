"""Benchmark of the quantized matmul backends on one real-width DBRX expert GLU.

    python scripts/bench_kernels.py            # w1, v1: 10752 x 6144, w2: 6144 x 10752
    python scripts/bench_kernels.py --quick    # a quarter-width run, fewer repeats

For each backend (quantize/kernels.py) and for float32/bf16 matmul: ms per GLU call (median after
warmup) at batch 1 and 16, the weight bytes one call reads, and the ratio to the bandwidth bound
(time / (bytes / read bandwidth)), where the read-only bandwidth is measured in the same run as
the best of several sums over a 1 GiB float32 tensor with the same thread count. Weights are
fresh random tensors (100+ MB, larger than the caches). Prints a markdown table and peak RSS.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dbrxq.sysinfo import describe_machine, peak_rss_bytes, read_bandwidth  # noqa: E402
from quantize import cext, kernels  # noqa: E402
from quantize.primitives import quantize_tensor  # noqa: E402


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median_ms(fn, warmup: int, runs: int) -> float:
    for _ in range(warmup):
        fn()
    return 1e3 * statistics.median(_timed(fn) for _ in range(runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="quarter-width matrices, fewer repeats")
    ap.add_argument("--runs", type=int, default=None)
    args = ap.parse_args()
    d, f = (1536, 2688) if args.quick else (6144, 10752)
    runs = args.runs or (3 if args.quick else 7)
    torch.manual_seed(0)

    print(describe_machine())
    print(f"C kernel path: {cext.cpu_path() if cext.load() else 'unavailable: ' + str(cext.unavailable_reason())}")
    bw = read_bandwidth()
    print(f"read-only bandwidth (sum over 1 GiB fp32): {bw / 1e9:.1f} GB/s")
    print(f"GLU: w1, v1 [{f}, {d}], w2 [{d}, {f}]; median of {runs} runs after warmup\n")

    floats = [torch.randn(f, d) * 0.02, torch.randn(f, d) * 0.02, torch.randn(d, f) * 0.02]
    xs = {m: torch.randn(m, d) for m in (1, 16)}
    rows = []  # (variant, bytes, {m: ms})

    def float_glu(ws, dt):
        return lambda x: F.linear(F.silu(F.linear(x, ws[0])) * F.linear(x, ws[1]), ws[2])

    for name, dt in (("fp32 matmul", torch.float32), ("bf16 matmul", torch.bfloat16)):
        ws = [w.to(dt) for w in floats]
        fn = float_glu(ws, dt)
        nbytes = sum(w.numel() * w.element_size() for w in ws)
        rows.append((name, nbytes, {m: median_ms(lambda: fn(x.to(dt)), 2, runs) for m, x in xs.items()}))
        del ws

    for bits, gs, label in ((4, 128, "int4 g128"), (8, -1, "int8 per-channel")):
        qts = [quantize_tensor(w, bits, gs, True) for w in floats]
        for backend in kernels.available_backends("cpu", bits, gs, shape=(f, d)):
            if backend == "torch" and bits == 8:
                continue  # as slow as int4's torch path and says nothing new
            pws = [kernels.prepare(q, backend, "cpu") for q in qts]
            slow = backend in ("torch", "bnb")
            r = max(3, runs // 2) if slow else runs
            ms = {m: median_ms(lambda: kernels.glu(x, *pws), 1 if slow else 2, r) for m, x in xs.items()}
            extra = " (re-quantized: nf4)" if backend == "bnb" and bits == 4 else (
                " (re-quantized: int8)" if backend == "bnb" else "")
            rows.append((f"{label} {backend}{extra}", sum(p.nbytes for p in pws), ms))
            del pws
        del qts

    print("| variant | MB read | batch 1 ms | x bound | batch 16 ms | x bound |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, nbytes, ms in rows:
        bound = 1e3 * nbytes / bw
        print(f"| {name} | {nbytes / 1e6:.0f} | {ms[1]:.1f} | {ms[1] / bound:.2f} | {ms[16]:.1f} | "
              f"{ms[16] / bound:.2f} |")
    print(f"\npeak RSS: {peak_rss_bytes() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
