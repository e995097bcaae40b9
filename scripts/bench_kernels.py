"""Benchmark of the quantized matmul backends on one real-width DBRX expert GLU.

    python scripts/bench_kernels.py            # w1, v1: 10752 x 6144, w2: 6144 x 10752
    python scripts/bench_kernels.py --quick    # a quarter-width run, fewer turns

For each backend (quantize/kernels.py) and for float32/bf16 matmul, and for 2/3-bit experts on
dbrxq's C kernel (their own layouts, so their own smaller bytes): ms per GLU call at batch 1
and 16, the weight bytes one call reads, and the ratio to the bandwidth bound
(time / (bytes / read bandwidth)). The read-only bandwidth is measured in the same run as a sum
over a 512 MiB float32 tensor with the same thread count.

This VM's speed drifts by 30% over seconds to minutes, and a variant timed in one block of calls
got one state of the machine: in one run the same kernel measured 5.5 ms with float32 and 7.5 ms
with bf16 activations, called one after the other. So the variants take TURNS: each turn calls
every variant once, each call between two bandwidth probes, and a call's ratio is its time over
bytes / the mean bandwidth of its two probes. Per variant: the median time, the median of its
calls' ratios, and the median over turns of bf16's time in that turn over its own ("x faster
than bf16"). Slow variants (seconds per call) take a third of the turns. Weights are fresh
random tensors (100+ MB; the probes, 512 MiB, push them out of even a 480 MB L3). dbrxq's C
kernel runs once per SIMD path this CPU has (all give the same numbers), also on llama.cpp's K-quant
blocks (Q2_K .. Q6_K, as a GGUF file holds them); batch 16 is also given
against its compute floor: 16 x the GLU's multiply-adds at the peak rate of the path's inner
instruction on every thread, measured in the same run (dbrxq_peak_macs). Prints a markdown table
and peak RSS.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dbrxq.core.sysinfo import describe_machine, peak_rss_bytes  # noqa: E402
from make_random_gguf import random_blocks  # noqa: E402
from quantize import cext, kernels  # noqa: E402
from quantize.primitives import quantize_tensor  # noqa: E402

BATCHES = (1, 16)


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def variants(floats, d, f):
    """(name, bytes read per call, fn(x), activation dtype, slow, C kernel path or None) for every variant."""
    out = []
    for name, dt in (("fp32 matmul", torch.float32), ("bf16 matmul", torch.bfloat16)):
        ws = [w.to(dt) for w in floats]
        out.append((name, sum(w.numel() * w.element_size() for w in ws),
                    lambda x, ws=ws: F.linear(F.silu(F.linear(x, ws[0])) * F.linear(x, ws[1]), ws[2]), dt, False, None))
    for bits, gs, label in ((4, 128, "int4 g128"), (8, -1, "int8 per-channel")):
        qts = [quantize_tensor(w, bits, gs, True) for w in floats]
        for backend in kernels.available_backends("cpu", bits, gs, shape=(f, d)):
            if backend == "torch" and bits == 8:
                continue  # as slow as int4's torch path and says nothing new
            if backend in ("cpu_q4", "cpu_q8"):  # each SIMD path this CPU runs (all give the same numbers)
                for path in [p for p in cext.runnable_paths() if p != "generic"]:
                    pws = [kernels.prepare(q, backend, "cpu", cpu_path=path) for q in qts]
                    out.append((f"{label} {backend} ({path})", sum(p.nbytes for p in pws),
                                lambda x, pws=pws: kernels.glu(x, *pws), torch.float32, False, path))
                continue
            pws = [kernels.prepare(q, backend, "cpu") for q in qts]
            nbytes = sum(p.nbytes for p in pws)
            extra = " (re-quantized: nf4)" if backend == "bnb" and bits == 4 else (
                " (re-quantized: int8)" if backend == "bnb" else "")
            # torch's int4 CPU kernel has a fast path only for bf16 activations (15x the fp32 one)
            dts = (torch.float32, torch.bfloat16) if backend == "torch_int4" else (torch.float32,)
            for dt in dts:
                act = f", {str(dt).removeprefix('torch.')} activations" if len(dts) > 1 else ""
                slow = backend in ("torch", "bnb", "torch_int8") or (backend == "torch_int4" and dt == torch.float32)
                out.append((f"{label} {backend}{extra}{act}", nbytes, lambda x, pws=pws: kernels.glu(x, *pws),
                            dt, slow, None))
    # 2- and 3-bit (format_version 2): dbrxq's C kernel on their own layouts (qmatmul.c: 2-bit
    # fields, 3-bit as a 2-bit plane + a 1-bit plane), each SIMD path; bound = the bytes it reads
    for bits, gs, label in ((3, 64, "int3 g64 asym"), (2, 64, "int2 g64 asym")):
        qts = [quantize_tensor(w, bits, gs, False) for w in floats]
        if "cpu_q4" not in kernels.available_backends("cpu", bits, gs, shape=(f, d), symmetric=False):
            continue
        for path in [p for p in cext.runnable_paths() if p != "generic"]:
            pws = [kernels.prepare(q, "cpu_q4", "cpu", cpu_path=path) for q in qts]
            out.append((f"{label} cpu_q4 ({path})", sum(p.nbytes for p in pws),
                        lambda x, pws=pws: kernels.glu(x, *pws), torch.float32, False, path))
    # llama.cpp's K-quants as a GGUF file holds them (random block bytes: the speed does not depend on the
    # values), converted into the kernel's K-quant blocks; Q5_K and Q6_K hold 8-bit codes there
    if cext.load() is not None:
        rng = np.random.default_rng(0)
        for name in ("Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K"):
            raws = [random_blocks(rng, name, w.shape[0], w.shape[1]) for w in floats]
            for path in [p for p in cext.runnable_paths() if p != "generic"]:
                pws = [kernels.prepare_ggml(r, name, tuple(w.shape), cpu_path=path) for r, w in zip(raws, floats)]
                out.append((f"{name} cpu_q4 ({path})", sum(p.nbytes for p in pws),
                            lambda x, pws=pws: kernels.glu(x, *pws), torch.float32, False, path))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="quarter-width matrices, fewer turns")
    ap.add_argument("--turns", type=int, default=None, help="turns (default 15, --quick 3)")
    ap.add_argument("--only", default=None, help="comma-separated variant-name prefixes (e.g. 'int4 g128 cpu_q4,int3,int2')")
    args = ap.parse_args()
    d, f = (1536, 2688) if args.quick else (6144, 10752)
    turns = args.turns or (3 if args.quick else 15)
    torch.manual_seed(0)

    print(describe_machine())
    print(f"C kernel path: {cext.cpu_path() if cext.load() else 'unavailable: ' + str(cext.unavailable_reason())}")
    print(f"GLU: w1, v1 [{f}, {d}], w2 [{d}, {f}]; {turns} turns (slow variants: every third)\n")

    floats = [torch.randn(f, d) * 0.02, torch.randn(f, d) * 0.02, torch.randn(d, f) * 0.02]
    vs = variants(floats, d, f)
    if args.only:
        vs = [v for v in vs if v[0] == "bf16 matmul" or any(v[0].startswith(p) for p in args.only.split(","))]
    del floats
    xs = {m: torch.randn(m, d) for m in BATCHES}
    probe = torch.ones(1 << 27)  # 512 MiB float32: far larger than every cache
    probe.sum()
    for _, _, fn, dt, _, _ in vs:  # warm up: lazily made tensors, the C kernel build, page faults
        for x in xs.values():
            fn(x.to(dt))

    # per variant and batch: times, ratios to the bound, and the turn each call belongs to
    times = {(v[0], m): {} for v in vs for m in BATCHES}
    ratios = {k: [] for k in times}
    bw_all = []
    for turn in range(turns):
        for name, nbytes, fn, dt, slow, _ in vs:
            if slow and turn % 3:
                continue
            for m, x in xs.items():
                x = x.to(dt)
                t0 = _timed(probe.sum)
                t = _timed(lambda: fn(x))
                t1 = _timed(probe.sum)
                bw = probe.numel() * 4 * (1 / t0 + 1 / t1) / 2
                bw_all.append(bw)
                times[(name, m)][turn] = t
                ratios[(name, m)].append(t * bw / nbytes)

    def faster_than_bf16(name, m):
        """Median over the turns both ran of bf16's time / this variant's time."""
        mine, ref = times[(name, m)], times[("bf16 matmul", m)]
        return statistics.median(ref[k] / mine[k] for k in mine if k in ref)

    print(f"read-only bandwidth (sum over 512 MiB fp32, around every call): {min(bw_all) / 1e9:.1f} to "
          f"{max(bw_all) / 1e9:.1f} GB/s, median {statistics.median(bw_all) / 1e9:.1f}; each call's bound "
          "uses the probes right before and after it\n")
    # The compute floor of the C kernel's batched calls: M x the GLU's multiply-adds at the peak
    # rate of the path's inner instruction (qmatmul.c: dbrxq_peak_macs), on every thread.
    lib, th = cext.load(), torch.get_num_threads()
    peaks = {p: lib.dbrxq_peak_macs(cext.PATHS[p], 20_000_000) for p in cext.runnable_paths() if p != "generic"} if lib else {}
    for p, r in peaks.items():
        print(f"peak int8 multiply-adds, {p} ({'vpmaddubsw + vpaddw' if p == 'avx2' else 'vpdpbusd zmm'}): "
              f"{r / 1e9:.0f} G/s per thread")
    macs = 3 * d * f
    print("\n| variant | MB read | batch 1 ms | x bound | x faster than bf16 | batch 16 ms | x bound | x faster than bf16 "
          "| batch 16 x compute floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, nbytes, _, _, _, path in vs:
        cells = []
        for m in BATCHES:
            cells += [f"{1e3 * statistics.median(times[(name, m)].values()):.1f}",
                      f"{statistics.median(ratios[(name, m)]):.2f}", f"{faster_than_bf16(name, m):.2f}"]
        floor = "-"
        if path in peaks:
            floor = f"{statistics.median(times[(name, 16)].values()) / (16 * macs / (peaks[path] * th)):.2f}"
        print(f"| {name} | {nbytes / 1e6:.0f} | " + " | ".join(cells) + f" | {floor} |")
    print(f"\npeak RSS: {peak_rss_bytes() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
