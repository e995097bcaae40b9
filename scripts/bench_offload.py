#!/usr/bin/env python
"""Decode speed with offloaded experts versus the fully-resident model, and versus the bound.

    python scripts/bench_offload.py --model OUT --expert-memory 1.5GiB          # CPU, reuse a checkpoint
    python scripts/bench_offload.py --workdir /tmp/b --expert-memory 1.5GiB     # make one (real width, 2 layers)
    python scripts/bench_offload.py --model OUT --device cuda --gpu-memory 24GiB  # GPU run

Without --model, a real-width random checkpoint of 2 layers (vocab 1024) is made in --workdir and
RTN-quantized (int4 experts; ~13 GB written then deleted, ~3.5 GB kept unless --cleanup).
Each configuration runs in its own process so peak RSS is its own. The offloaded CPU run gets a
RAM budget of (non-expert weights + KV + workspace) + --expert-memory. Reported: decode tokens/s,
cache hit rate, bytes moved per token, peak RSS, and the ratio of the measured decode time per
token to the bound ``missed expert bytes / read bandwidth + resident bytes read / read bandwidth``
(docs/architecture.md; the read bandwidth is measured here by dbrxq.sysinfo).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROMPT = [[(17 * i + 5) % 1000 for i in range(16)]]


def child(args) -> dict:
    """One configuration in this process; returns its numbers."""
    import torch

    import dbrxq
    from dbrxq.generate import generate
    from dbrxq.sysinfo import peak_rss_bytes

    budgets = {}
    if args.device == "cuda":
        budgets = {"gpu_memory": args.gpu_memory, "cpu_memory": args.cpu_memory}
    elif args.mode == "offload":
        # Plan once with a huge budget to learn the fixed bytes, then budget fixed + expert memory.
        from dbrxq.checkpoint import CheckpointReader
        from dbrxq.config import DbrxConfig
        from dbrxq.loading import plan_offload
        from dbrxq.placement import parse_size
        cfg = DbrxConfig.from_json(Path(args.model) / "config.json")
        with CheckpointReader(args.model) as r:
            plan, _ = plan_offload(r, cfg, device=torch.device("cpu"), dtype=torch.bfloat16, backend=None,
                                   gpu_memory=None, cpu_memory="1TiB", context=args.context, batch_size=1,
                                   kv_cache="bf16")
        budgets = {"cpu_memory": plan.device_fixed_bytes + parse_size(args.expert_memory, "--expert-memory")}
    t0 = time.perf_counter()
    if budgets:
        model = dbrxq.DbrxForCausalLM.from_pretrained(
            args.model, device=args.device, context=args.context,
            offload_options={"timing": True, "prefetch": args.prefetch or None}, **budgets)
    else:
        model = dbrxq.DbrxForCausalLM.from_pretrained(args.model, device=args.device)
    load_s = time.perf_counter() - t0
    rt = getattr(model, "offload", None)
    generate(model, PROMPT, max_new_tokens=2, kv_cache=rt.kv_factory if rt else None)  # warm-up
    if rt is not None:
        from dbrxq.offload import OffloadStats
        rt.stats = OffloadStats()
    out = generate(model, PROMPT, max_new_tokens=args.tokens, kv_cache=rt.kv_factory if rt else None)
    s = out.stats
    res = {"mode": args.mode, "load_s": load_s, "decode_tok_s": s.decode_tok_s,
           "decode_s_per_tok": s.decode_s / max(s.decode_steps, 1), "peak_rss": peak_rss_bytes()}
    if args.device == "cuda":
        res["gpu_max_allocated"] = torch.cuda.max_memory_allocated()
    if rt is not None:
        d = rt.stats.phases["decode"]
        res.update(hit_rate=d.hit_rate, hits_per_tok=d.hits / d.tokens, misses_per_tok=d.misses / d.tokens,
                   moved_per_tok=d.bytes_moved / d.tokens, slot_bytes=rt.layout.nbytes,
                   attention_ms=1e3 * d.attention_s / d.tokens, resident_ms=1e3 * d.resident_s / d.tokens,
                   missed_ms=1e3 * d.missed_s / d.tokens, tracked_peak=rt.stats.peak,
                   non_expert=rt.non_expert_bytes, plan=rt.plan.describe())
    return res


def make_model(workdir: Path) -> Path:
    src, out = workdir / "src", workdir / "q"
    if (out / "config.json").is_file():
        return out
    py = sys.executable
    subprocess.run([py, "scripts/make_checkpoint.py", str(src), "--preset", "dbrx", "--layers", "2",
                    "--vocab-size", "1024"], check=True)
    subprocess.run([py, "-m", "dbrxq.cli", "quantize", str(src), str(out), "--method", "rtn"], check=True)
    shutil.rmtree(src)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a dbrxq-quantized checkpoint (default: make one in --workdir)")
    p.add_argument("--workdir", default="/tmp/dbrxq-bench-offload")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--expert-memory", default="1.5GiB", help="CPU: RAM for expert slots on top of the fixed part")
    p.add_argument("--gpu-memory", default="24GiB", help="CUDA: GPU budget")
    p.add_argument("--cpu-memory", default=None, help="CUDA: pinned host budget (default: all experts)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--prefetch", action="store_true", help="speculative prefetch (default: on with CUDA only)")
    p.add_argument("--cleanup", action="store_true", help="delete the made checkpoint afterwards")
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # internal: run one configuration
    args = p.parse_args()
    if args.mode:
        print(json.dumps(child(args)))
        return 0

    from dbrxq.placement import format_size
    from dbrxq.sysinfo import describe_machine, read_bandwidth

    model = Path(args.model) if args.model else make_model(Path(args.workdir))
    bw = read_bandwidth(512 << 20)
    print(describe_machine())
    print(f"read bandwidth {bw / 1e9:.1f} GB/s; model {model}")
    results = {}
    modes = ["resident", "offload"] if args.device == "cpu" else ["offload"]
    for mode in modes:
        cmd = [sys.executable, __file__, "--model", str(model), "--device", args.device, "--mode", mode,
               "--expert-memory", args.expert_memory, "--gpu-memory", args.gpu_memory,
               "--tokens", str(args.tokens), "--context", str(args.context)]
        if args.cpu_memory:
            cmd += ["--cpu-memory", args.cpu_memory]
        if args.prefetch:
            cmd.append("--prefetch")
        r = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    for mode, r in results.items():
        line = (f"{mode:9s} decode {r['decode_tok_s']:.2f} tok/s ({1e3 * r['decode_s_per_tok']:.0f} ms/token), "
                f"peak RSS {format_size(r['peak_rss'])}, load {r['load_s']:.0f}s")
        if "gpu_max_allocated" in r:
            line += f", GPU max allocated {format_size(r['gpu_max_allocated'])}"
        print(line)
        if mode == "offload":
            print(r["plan"])
            missed = r["misses_per_tok"] * r["slot_bytes"]
            resident = r["hits_per_tok"] * r["slot_bytes"] + r["non_expert"]
            bound = missed / bw + resident / bw
            print(f"          hit rate {r['hit_rate']:.1%}, moved {format_size(r['moved_per_tok'])}/token; per token: "
                  f"attention {r['attention_ms']:.1f} ms, experts resident {r['resident_ms']:.1f} ms, "
                  f"experts missed {r['missed_ms']:.1f} ms; tracked peak "
                  + ", ".join(f"{k} {format_size(v)}" for k, v in r["tracked_peak"].items()))
            print(f"          bound {1e3 * bound:.0f} ms/token (missed {format_size(missed)} + resident "
                  f"{format_size(resident)} at {bw / 1e9:.1f} GB/s): measured / bound = "
                  f"{r['decode_s_per_tok'] / bound:.2f}")
    if args.cleanup and not args.model:
        shutil.rmtree(args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
