"""Benchmark of the quantized matmul backends on one real-width DBRX expert GLU.

    python scripts/bench_kernels.py            # w1, v1: 10752 x 6144, w2: 6144 x 10752
    python scripts/bench_kernels.py --quick    # a quarter-width run, fewer repeats

For each backend (quantize/kernels.py) and for float32/bf16 matmul: ms per GLU call (median after
warmup) at batch 1 and 16, the weight bytes one call reads, and the ratio to the bandwidth bound
(time / (bytes / read bandwidth)), where the read-only bandwidth is measured in the same run as
a sum over a 512 MiB float32 tensor with the same thread count, taken between every two timed
calls (the bandwidth of a shared VM drifts by 30% within minutes); each variant's bound uses the
median of the probes taken between its own calls, against the median of its times. Weights are
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
from dbrxq.sysinfo import describe_machine, peak_rss_bytes  # noqa: E402
from quantize import cext, kernels  # noqa: E402
from quantize.primitives import quantize_tensor  # noqa: E402


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="quarter-width matrices, fewer repeats")
    ap.add_argument("--runs", type=int, default=None)
    args = ap.parse_args()
    d, f = (1536, 2688) if args.quick else (6144, 10752)
    runs = args.runs or (3 if args.quick else 9)
    torch.manual_seed(0)

    print(describe_machine())
    print(f"C kernel path: {cext.cpu_path() if cext.load() else 'unavailable: ' + str(cext.unavailable_reason())}")
    print(f"GLU: w1, v1 [{f}, {d}], w2 [{d}, {f}]; median of {runs} runs after warmup\n")

    floats = [torch.randn(f, d) * 0.02, torch.randn(f, d) * 0.02, torch.randn(d, f) * 0.02]
    xs = {m: torch.randn(m, d) for m in (1, 16)}
    rows = []  # (variant, bytes, {m: (ms, read GB/s)})
    probe = torch.ones(1 << 27)  # 512 MiB float32: far larger than every cache
    probe.sum()

    def measure(name, nbytes, fn, dt=torch.float32, slow=False):
        """Median ms per call and the median read bandwidth of probes taken between the calls
        (this VM's bandwidth drifts by 30% within minutes, so each variant gets its own)."""
        res = {}
        for m, x in xs.items():
            x = x.to(dt)
            for _ in range(1 if slow else 2):
                fn(x)
            ts, bws = [], []
            for _ in range(max(3, runs // 2) if slow else runs):
                bws.append(probe.numel() * 4 / _timed(probe.sum))
                ts.append(_timed(lambda: fn(x)))
            res[m] = (1e3 * statistics.median(ts), statistics.median(bws))
        rows.append((name, nbytes, res))

    for name, dt in (("fp32 matmul", torch.float32), ("bf16 matmul", torch.bfloat16)):
        ws = [w.to(dt) for w in floats]
        measure(name, sum(w.numel() * w.element_size() for w in ws),
                lambda x: F.linear(F.silu(F.linear(x, ws[0])) * F.linear(x, ws[1]), ws[2]), dt)
        del ws

    for bits, gs, label in ((4, 128, "int4 g128"), (8, -1, "int8 per-channel")):
        qts = [quantize_tensor(w, bits, gs, True) for w in floats]
        for backend in kernels.available_backends("cpu", bits, gs, shape=(f, d)):
            if backend == "torch" and bits == 8:
                continue  # as slow as int4's torch path and says nothing new
            pws = [kernels.prepare(q, backend, "cpu") for q in qts]
            nbytes = sum(p.nbytes for p in pws)
            extra = " (re-quantized: nf4)" if backend == "bnb" and bits == 4 else (
                " (re-quantized: int8)" if backend == "bnb" else "")
            # torch's int4 CPU kernel has a fast path only for bf16 activations (15x the fp32 one)
            dts = (torch.float32, torch.bfloat16) if backend in ("torch_int4", "cpu_q4") else (torch.float32,)
            for dt in dts:
                act = f", {str(dt).removeprefix('torch.')} activations" if len(dts) > 1 else ""
                measure(f"{label} {backend}{extra}{act}", nbytes, lambda x: kernels.glu(x, *pws), dt,
                        slow=backend in ("torch", "bnb"))
            del pws
        del qts

    bws = [bw for _, _, res in rows for _, bw in res.values()]
    print(f"read-only bandwidth (sum over 512 MiB fp32, between the timed calls): "
          f"medians {min(bws) / 1e9:.1f} to {max(bws) / 1e9:.1f} GB/s across variants; each bound = bytes / "
          "the median of the probes taken between that variant's own calls\n")
    print("| variant | MB read | batch 1 ms | x bound | batch 16 ms | x bound |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, nbytes, res in rows:
        (t1, bw1), (t16, bw16) = res[1], res[16]
        print(f"| {name} | {nbytes / 1e6:.0f} | {t1:.1f} | {t1 * bw1 / 1e3 / nbytes:.2f} | {t16:.1f} | "
              f"{t16 * bw16 / 1e3 / nbytes:.2f} |")
    print(f"\npeak RSS: {peak_rss_bytes() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
