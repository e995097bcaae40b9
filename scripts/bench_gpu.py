#!/usr/bin/env python
"""dbrxq on a CUDA GPU, every figure against a ceiling measured in the same run.

    python scripts/bench_gpu.py                       # kernels + decode (2 real-width layers)
    python scripts/bench_gpu.py --skip-decode         # kernels only (no checkpoint written)
    python scripts/bench_gpu.py --json out.json       # also write the numbers as JSON

Ceilings, measured first: HBM read bandwidth (a sum over 4 GiB), host-to-device copy bandwidth from
pinned and from pageable memory (1 GiB), and the dense bf16 matmul rate (8192^3).

1. Kernels: one real-width DBRX expert GLU (w1, v1 [10752, 6144], w2 [6144, 10752]) through
   quantize.kernels.glu on the backend dbrxq picks on CUDA (torch's int4 kernel; 2/3-bit codes widened
   to int4), at 1 and 16 rows; time / (bytes the kernel reads / HBM read bandwidth). Next to it,
   the same GLU in dense bf16 (cuBLAS), the implementation a user would otherwise run; the same expert
   through the fused Triton MoE kernels (quantize/triton_moe.py, when triton imports); and the int8
   attention weight (Wqkv) on dbrxq's CUDA path and on torch's int8 kernel.
2. Decode: a real-width checkpoint of --layers layers (vocab 1024) of random int4 codes, written
   directly (quantize.random.make_random_quantized_checkpoint; speed does not depend on the
   values). Resident, then offloaded with GPU budgets holding 25/50/75% of the experts and every other
   expert pinned in host RAM, then one budget with no host tier (misses read from the prepared-expert
   file through the pinned staging buffer). Per token: time, hit rate, bytes moved, and the bound
   ``missed bytes / pinned H2D bandwidth + (hit expert bytes + non-expert bytes) / HBM bandwidth``
   (the bound for no overlap of copy and compute; copies run on a side stream, so the floor is the
   larger term alone, also printed). Peak GPU memory (torch's max_memory_allocated) against the budget.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PROMPT = [[(17 * i + 5) % 1000 for i in range(16)]]


def _time(fn, reps: int = 20, warmup: int = 3) -> float:
    """Mean seconds per call, by CUDA events around ``reps`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / reps


def _hbm_read(dev) -> float:
    x = torch.ones(1 << 30, dtype=torch.float32, device=dev)  # 4 GiB
    return x.numel() * 4 / _time(lambda: x.sum(), reps=10)


def _h2d(dev, pinned: bool, n: int = 1 << 30) -> float:
    src = torch.ones(n, dtype=torch.uint8, pin_memory=pinned)
    dst = torch.empty(n, dtype=torch.uint8, device=dev)
    return n / _time(lambda: dst.copy_(src, non_blocking=pinned), reps=5 if pinned else 3, warmup=1)


def _bf16_flops(dev, n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    return 2 * n**3 / _time(lambda: a @ a, reps=10)


def ceilings(dev) -> dict:
    out = {"hbm_read": _hbm_read(dev), "h2d_pinned": _h2d(dev, True), "h2d_pageable": _h2d(dev, False),
           "bf16_flops": _bf16_flops(dev)}
    torch.cuda.empty_cache()
    return out


def kernel_rows(dev, ceil: dict) -> list[dict]:
    from quantize import kernels
    from quantize.primitives import QuantizedTensor, pack_codes

    F_, D = 10752, 6144
    g = torch.Generator().manual_seed(0)

    def weight(n, k, bits, group, sym):
        codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
        scales = (torch.rand(n, k // group, generator=g) * 0.01 + 0.001).half()
        zeros = None if sym else torch.full((n, k // group), 2 ** (bits - 1), dtype=torch.uint8)
        return QuantizedTensor(pack_codes(codes, bits), scales, zeros, bits, group, (n, k))

    rows = _dense_rows(dev, ceil, F_, D)
    for bits, group, sym in ((4, 128, True), (3, 64, False), (2, 64, False)):
        qts = [weight(F_, D, bits, group, sym), weight(F_, D, bits, group, sym), weight(D, F_, bits, group, sym)]
        own = sum(t.numel() * t.element_size() for q in qts for t in (q.qweight, q.scales, q.qzeros) if t is not None)
        rows += _glu_rows(dev, ceil, [kernels.prepare(q, "auto", dev) for q in qts], own,
                          f"int{bits} g{group} {'sym' if sym else 'asym'}")
        rows += _fused_rows(dev, ceil, qts, own, f"int{bits} g{group} {'sym' if sym else 'asym'}")
    rows += _int8_rows(dev, ceil)
    torch.cuda.empty_cache()
    return rows


def _int8_rows(dev, ceil: dict) -> list[dict]:
    """A real-width Wqkv [8192, 6144] in int8 per channel (dbrxq's attention recipe), one row: dbrxq's
    CUDA path (bf16 codes through cuBLAS, then the scales) against torch's _weight_int8pack_mm."""
    from quantize import kernels
    from quantize.primitives import QuantizedTensor

    n, k = 8192, 6144
    g = torch.Generator().manual_seed(1)
    qt = QuantizedTensor(torch.randint(1, 256, (n, k), generator=g, dtype=torch.uint8),
                         (torch.rand(n, 1, generator=g) * 1e-3 + 1e-4).half(), None, 8, -1, (n, k))
    pw = kernels.prepare(qt, "torch_int8", dev)
    x = torch.randn(1, k, dtype=torch.bfloat16, device=dev)
    s16 = pw.s32.to(torch.bfloat16)
    rows = []
    for name, fn in (("int8 Wqkv (dbrxq: bf16 codes, cuBLAS)", lambda: pw.matmul(x)),
                     ("int8 Wqkv (torch _weight_int8pack_mm)", lambda: torch.ops.aten._weight_int8pack_mm(x, pw.w, s16))):
        t = _time(fn)
        rows.append({"weights": name, "rows": 1, "ms": t * 1e3, "bytes": pw.nbytes,
                     "ratio": t / (pw.nbytes / ceil["hbm_read"])})
    return rows


def _dense_rows(dev, ceil: dict, F_: int, D: int) -> list[dict]:
    dense = [torch.randn(s, dtype=torch.bfloat16, device=dev) * 0.02 for s in ((F_, D), (F_, D), (D, F_))]
    nbytes = sum(t.numel() * 2 for t in dense)
    rows = []
    for m in (1, 16):
        x = torch.randn(m, D, dtype=torch.bfloat16, device=dev)
        t = _time(lambda: (F.silu(x @ dense[0].t()) * (x @ dense[1].t())) @ dense[2].t())
        rows.append({"weights": "bf16 dense (cuBLAS)", "rows": m, "ms": t * 1e3, "bytes": nbytes,
                     "ratio": t / (nbytes / ceil["hbm_read"])})
    return rows


def _glu_rows(dev, ceil: dict, pws: list, own: int, name: str) -> list[dict]:
    from quantize import kernels
    read = sum(p.nbytes for p in pws)
    rows = []
    for m in (1, 16):
        x = torch.randn(m, pws[0].shape[1], dtype=torch.bfloat16, device=dev)
        t = _time(lambda: kernels.glu(x, *pws))
        rows.append({"weights": f"{name} ({pws[0].backend})", "rows": m, "ms": t * 1e3, "bytes": read,
                     "own_bytes": own, "ratio": t / (read / ceil["hbm_read"]), "ratio_own": t / (own / ceil["hbm_read"])})
    return rows


def _fused_rows(dev, ceil: dict, qts: list, own: int, name: str) -> list[dict]:
    """The same expert through quantize.triton_moe (one expert routed every row: the layer's two launches,
    codes dequantized in registers, plus the routing's grouping and one host sync); nothing without triton."""
    from quantize import triton_moe
    from quantize.kernels import widen_to_int4
    if triton_moe.available() is not None:
        print(f"fused MoE kernels skipped: {triton_moe.available()}", flush=True)
        return []
    ws = [widen_to_int4(q) if q.bits < 4 else q for q in qts]
    parts = [(w.qweight[None].to(dev), w.scales[None].to(dev), None if w.qzeros is None else w.qzeros[None].to(dev))
             for w in ws]
    stack = triton_moe.Int4Stack(*parts, group=ws[0].group)
    rows = []
    for m in (1, 16):
        x = torch.randn(m, ws[0].shape[1], dtype=torch.bfloat16, device=dev)
        ids = torch.zeros(m, 1, dtype=torch.int64, device=dev)
        w = torch.ones(m, 1, dtype=torch.float32, device=dev)
        t = _time(lambda: triton_moe.moe(x, ids, w, stack))
        read = sum(t_.numel() * t_.element_size() for p_ in parts for t_ in p_ if t_ is not None)
        rows.append({"weights": f"{name} (triton fused MoE)", "rows": m, "ms": t * 1e3, "bytes": read,
                     "own_bytes": own, "ratio": t / (read / ceil["hbm_read"]), "ratio_own": t / (own / ceil["hbm_read"])})
    return rows


def _profile(fn, name: str) -> None:
    """torch.profiler's busiest operators (host and GPU time) over ``fn``."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    avg = prof.key_averages()
    print(f"--- profile: {name}")
    print(avg.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    print(avg.table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=60), flush=True)


def decode_rows(dev, ceil: dict, workdir: Path, layers: int, tokens: int, profile: bool = False) -> list[dict]:
    import dbrxq
    from dbrxq.formats.checkpoint import CheckpointReader
    from dbrxq.formats.random import preset_config
    from dbrxq.model.config import DbrxConfig
    from dbrxq.plan.checkpoint import plan_offload
    from dbrxq.runtime.generate import generate
    from dbrxq.runtime.offload import OffloadStats
    from quantize.config import QuantConfig
    from quantize.random import make_random_quantized_checkpoint

    q = workdir / "q"
    if not (q / "config.json").is_file():
        t0 = time.perf_counter()
        make_random_quantized_checkpoint(q, preset_config("dbrx", n_layers=layers, vocab_size=1024), QuantConfig(),
                                         progress=False)
        print(f"wrote {q} in {time.perf_counter() - t0:.0f} s", flush=True)
    cfg = DbrxConfig.from_json(q / "config.json")
    L, E, k = cfg.n_layers, cfg.num_experts, cfg.top_k
    with CheckpointReader(q) as r:
        plan, layout = plan_offload(r, cfg, device=dev, dtype=torch.bfloat16, backend=None, gpu_memory="1TiB",
                                    cpu_memory=None, context=256, batch_size=1, kv_cache="bf16")
    slot, fixed = layout.nbytes, plan.device_fixed_bytes

    def run(name, **kw) -> dict:
        gc.collect()  # the previous model and its runtime refer to each other: free their GPU memory now
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        opts = {"offload_options": {"cache_dir": str(workdir / "cache")}, "context": 256} if kw else {}
        model = dbrxq.DbrxForCausalLM.from_pretrained(q, device=dev, **kw, **opts)
        load_s = time.perf_counter() - t0
        rt = getattr(model, "offload", None)
        factory = rt.kv_factory if rt else None
        generate(model, PROMPT, max_new_tokens=3, kv_cache=factory)  # warm-up (and the miss policy's timing)
        if rt:
            rt.stats = OffloadStats()
        out = generate(model, PROMPT, max_new_tokens=tokens, kv_cache=factory)
        s = out.stats
        if profile and name.startswith(("resident", "75%")):
            _profile(lambda: generate(model, PROMPT, max_new_tokens=4, kv_cache=factory), name)
        per_tok = s.decode_s / s.decode_steps
        res = {"config": name, "load_s": load_s, "ms_per_token": per_tok * 1e3, "prefill_tok_s": s.prefill_tok_s,
               "peak_gpu": torch.cuda.max_memory_allocated() - base}
        if rt:
            d = rt.stats.phases["decode"]
            non_expert = rt.non_expert_bytes
            res.update(budget=kw["gpu_memory"], hit_rate=d.hit_rate, moved_per_tok=d.bytes_moved / d.tokens,
                       misses_per_tok=d.misses / d.tokens, hits_per_tok=d.hits / d.tokens,
                       prefetched=rt.cache.counters.prefetched, host_experts=sum(map(len, rt.plan.host_experts)),
                       moves=dict(getattr(rt.miss_policy, "choice", {})))
            missed = d.misses / d.tokens * slot  # a miss: pinned host -> GPU; without a host tier, file -> staging first
            copy_s = missed / ceil["h2d_pinned"] + (0 if res["host_experts"] else missed / ceil["page_cache"])
            hbm_s = (d.hits / d.tokens * slot + non_expert) / ceil["hbm_read"]
        else:
            non_expert = sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
                             if ".ffn.experts." not in n and t.device.type == "cuda")
            copy_s, hbm_s = 0.0, (k * L * slot + non_expert) / ceil["hbm_read"]
        res.update(bound_ms=(copy_s + hbm_s) * 1e3, floor_ms=max(copy_s, hbm_s) * 1e3,
                   ratio=per_tok / (copy_s + hbm_s))
        print(json.dumps(res), flush=True)
        return res

    rows = [run("resident")]
    for frac in (0.75, 0.5, 0.25):
        rows.append(run(f"{frac:.0%} of experts on the GPU, rest pinned in host RAM",
                        gpu_memory=fixed + round(frac * E) * L * slot))
    # misses from the prepared file (page cache) through the pinned staging buffer: no host tier
    path = next((workdir / "cache" / "prepared").glob("*.bin"))
    ceil["page_cache"] = _file_read_bandwidth(path, slot)
    rows.append(run("50% on the GPU, no host tier (prepared file -> pinned staging)",
                    gpu_memory=fixed + E // 2 * L * slot, cpu_memory=slot))
    return rows


def _file_read_bandwidth(path: Path, nbytes: int) -> float:
    """Bytes/s reading the prepared file (already in the page cache) into pinned memory, an expert at a time."""
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    view = memoryview(buf.numpy()).cast("B")
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    stride = -(-nbytes // 4096) * 4096
    t0, done = time.perf_counter(), 0
    for off in range(0, size - stride + 1, stride):
        done += os.preadv(fd, [view], off)
    os.close(fd)
    return done / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/dbrxq-bench-gpu")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's busiest operators per decode row")
    p.add_argument("--json", help="write every number here too")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA device (torch.cuda.is_available() is False)")
    from dbrxq.core.sysinfo import describe_machine
    dev = torch.device("cuda")
    print(describe_machine())
    print(f"GPU: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    ceil = ceilings(dev)
    print(f"HBM read {ceil['hbm_read'] / 1e12:.2f} TB/s; host->GPU pinned {ceil['h2d_pinned'] / 1e9:.1f} GB/s, "
          f"pageable {ceil['h2d_pageable'] / 1e9:.1f} GB/s; bf16 matmul {ceil['bf16_flops'] / 1e12:.0f} TFLOP/s",
          flush=True)
    out = {"ceilings": ceil, "kernels": [] if args.skip_kernels else kernel_rows(dev, ceil)}
    print("\none real-width expert GLU | rows | ms | MB read | x HBM bound")
    for r in out["kernels"]:
        print(f"{r['weights']} | {r['rows']} | {r['ms']:.3f} | {r['bytes'] / 1e6:.0f} | {r['ratio']:.2f}"
              + (f" (own {r['own_bytes'] / 1e6:.0f} MB: {r['ratio_own']:.2f})" if "own_bytes" in r else ""))
    if not args.skip_decode:
        out["decode"] = decode_rows(dev, ceil, Path(args.workdir), args.layers, args.tokens, args.profile)
        print(f"\ndecode, {args.layers} real-width layers | ms/token | hit rate | MB moved/token | bound ms "
              f"(floor) | x bound | peak GPU MiB (budget)")
        for r in out["decode"]:
            print(f"{r['config']} | {r['ms_per_token']:.2f} | {r.get('hit_rate', 1):.0%} | "
                  f"{r.get('moved_per_tok', 0) / 1e6:.0f} | {r['bound_ms']:.2f} ({r['floor_ms']:.2f}) | "
                  f"{r['ratio']:.2f} | {r['peak_gpu'] / 2**20:.0f} ({r.get('budget', 0) / 2**20:.0f})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
