#!/usr/bin/env python
"""Offloaded decoding against its bound: budgets holding 25/50/75% of the experts, experts read
from the page cache and from the disk itself, every bandwidth measured in the same run.

    python scripts/bench_offload.py --model OUT                 # CPU, a quantized checkpoint
    python scripts/bench_offload.py --workdir /tmp/b            # make one (real width, 2 layers)
    python scripts/bench_offload.py --model OUT --device cuda --gpu-memory 24GiB   # one GPU run (scripts/bench_gpu.py has the GPU table)

Without --model, a real-width random checkpoint of 2 layers (vocab 1024) is made in --workdir and
RTN-quantized (int4 experts; ~13 GB written then deleted, 3.5 GB kept unless --cleanup).

Each configuration runs in its own process (peak RSS is its own). A budget of S slots per layer is
``fixed + S x layers x slot bytes`` of --cpu-memory, fixed being what the plan reserves first
(non-expert weights, KV cache for --context, workspace including the reader's two staging slots).
Sources: "page cache" reads the prepared-expert file through the page cache after one pass has
loaded it there; "mmap" computes each missed expert in place from a mapping of that cached file
(no copy: its bound counts the missed bytes at RAM speed); "disk" reads it with O_DIRECT (``offload_options={"direct": True}``), so nothing
comes from RAM. Measured here, in this run: RAM read bandwidth (dbrxq.core.sysinfo.read_bandwidth), the
page-cache bandwidth (preadv of the prepared file, one expert per call, as the reader does) and the
disk's (the same with O_DIRECT). Per token the bound is
``missed expert bytes / source bandwidth + (hit expert bytes + non-expert bytes) / RAM bandwidth``
(reads and compute one after the other); the reads can overlap the compute, so
the slower side alone is a floor, and the ratio to it is reported too.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
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
    from dbrxq.core.sysinfo import peak_rss_bytes
    from dbrxq.runtime.generate import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == "baseline":  # what the interpreter, torch, dbrxq and its kernel cost before any weight
        from quantize import cext
        cext.load()
        return {"peak_rss": peak_rss_bytes()}
    kw = {}
    if args.device == "cuda":
        kw = {"gpu_memory": args.gpu_memory, "cpu_memory": args.cpu_memory}
    elif args.mode == "offload":
        from dbrxq.formats.checkpoint import CheckpointReader
        from dbrxq.model.config import DbrxConfig
        from dbrxq.plan.checkpoint import plan_offload
        cfg = DbrxConfig.from_json(Path(args.model) / "config.json")
        with CheckpointReader(args.model) as r:
            plan, layout = plan_offload(r, cfg, device=torch.device("cpu"), dtype=torch.bfloat16, backend=None,
                                        gpu_memory=None, cpu_memory="1TiB", context=args.context, batch_size=1,
                                        kv_cache="bf16")
        kw = {"cpu_memory": plan.device_fixed_bytes + args.slots * cfg.n_layers * layout.nbytes}
    t0 = time.perf_counter()
    if kw:
        opts = {"timing": True, "mmap": args.source == "mmap", "cache_dir": args.cache_dir}
        if args.source != "default":  # default: the runtime's own choices (how to read, cached misses mapped)
            opts["direct"] = args.source == "disk"
            opts["map_cached"] = args.source == "map-cached"
        if args.policy:
            opts["policy"] = args.policy
        if args.prefetch:
            opts["prefetch"] = True
        model = dbrxq.DbrxForCausalLM.from_pretrained(args.model, device=args.device, context=args.context,
                                                      offload_options=opts, **kw)
    else:
        model = dbrxq.DbrxForCausalLM.from_pretrained(args.model, device=args.device)
    load_s = time.perf_counter() - t0
    rt = getattr(model, "offload", None)
    if rt is not None and args.source in ("page-cache", "mmap", "default", "map-cached"):  # one pass puts the files in the page cache
        for path in rt.file.paths:
            with open(path, "rb") as f:
                while f.read(64 << 20):
                    pass
    generate(model, PROMPT, max_new_tokens=2, kv_cache=rt.kv_factory if rt else None)  # warm-up
    if rt is not None:
        from dbrxq.runtime.offload import OffloadStats
        rt.stats = OffloadStats()
    out = generate(model, PROMPT, max_new_tokens=args.tokens, kv_cache=rt.kv_factory if rt else None)
    s = out.stats
    res = {"mode": args.mode, "load_s": load_s, "decode_tok_s": s.decode_tok_s,
           "decode_s_per_tok": s.decode_s / max(s.decode_steps, 1), "peak_rss": peak_rss_bytes()}
    if kw.get("cpu_memory") and args.device == "cpu":
        res["budget"] = kw["cpu_memory"]
    if args.device == "cuda":
        res["gpu_max_allocated"] = torch.cuda.max_memory_allocated()
    if rt is not None:
        d = rt.stats.phases["decode"]
        res.update(hit_rate=d.hit_rate, hits_per_tok=d.hits / d.tokens, misses_per_tok=d.misses / d.tokens,
                   mapped_per_tok=d.from_page_cache / d.tokens,
                   moved_per_tok=d.bytes_moved / d.tokens, slot_bytes=rt.layout.nbytes,
                   prefetched=rt.cache.counters.prefetched, non_expert=rt.non_expert_bytes,
                   tracked_peak=rt.stats.peak["device"], file=str(rt.file.paths[rt.file.locate(0, 0)[0]]),
                   stride=getattr(rt.file, "stride", None) or rt.file.locate(0, 1)[1] - rt.file.locate(0, 0)[1],
                   direct=rt.file.dfd >= 0, plan=rt.plan.describe())
    return res


def run_child(args, **over) -> dict:
    a = {**vars(args), **over}
    cmd = [sys.executable, __file__, "--model", str(a["model"]), "--device", a["device"], "--mode", a["mode"],
           "--gpu-memory", a["gpu_memory"], "--tokens", str(a["tokens"]), "--context", str(a["context"]),
           "--slots", str(a["slots"]), "--source", a["source"], "--cache-dir", a["cache_dir"]]
    if a.get("cpu_memory"):
        cmd += ["--cpu-memory", a["cpu_memory"]]
    if a.get("policy"):
        cmd += ["--policy", a["policy"]]
    if a.get("prefetch"):
        cmd.append("--prefetch")
    if a.get("threads"):
        cmd += ["--threads", str(a["threads"])]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def source_bandwidth(path: str, nbytes: int, stride: int, direct: bool, limit: int = 4 << 30) -> float:
    """Bytes/s reading ``path`` one expert (nbytes at a stride) per preadv, as the reader does; with
    ``direct`` through O_DIRECT into a page-aligned buffer (the disk), else through the page cache."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    buf = mmap.mmap(-1, stride)  # page-aligned
    size = min(os.fstat(fd).st_size, limit)
    t0 = time.perf_counter()
    done = 0
    for off in range(0, size - stride + 1, stride):
        done += os.preadv(fd, [buf if direct else memoryview(buf)[:nbytes]], off)
    dt = time.perf_counter() - t0
    os.close(fd)
    return done / dt


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
    p.add_argument("--gpu-memory", default="24GiB", help="CUDA: GPU budget")
    p.add_argument("--cpu-memory", default=None, help="CUDA: pinned host budget (default: all experts)")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--fractions", default="0.25,0.5,0.75", help="share of each layer's experts resident")
    p.add_argument("--sources", default="page-cache,mmap,disk",
                   help="page-cache (preadv copies), mmap (misses computed in place from the mapped file), disk, "
                        "map-cached (page-cache, with misses the cache does not admit computed from the mapping "
                        "where the page cache holds them), default (the runtime's own choices, after the same "
                        "warming pass)")
    p.add_argument("--policy", help="lru, lfu or static (default: dbrxq's)")
    p.add_argument("--prefetch", action="store_true", help="speculative prefetch (default: off on CPU)")
    p.add_argument("--cache-dir", default=None, help="where the prepared-expert file goes (default: --workdir/cache)")
    p.add_argument("--threads", type=int, help="CPU threads for compute (default: torch's)")
    p.add_argument("--cleanup", action="store_true", help="delete the made checkpoint afterwards")
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)  # internal: run one configuration
    p.add_argument("--slots", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--source", default="page-cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.cache_dir = args.cache_dir or str(Path(args.workdir) / "cache")
    if args.mode:
        print(json.dumps(child(args)))
        return 0

    from dbrxq.core.sysinfo import describe_machine, read_bandwidth
    from dbrxq.core.units import format_size
    from dbrxq.model.config import DbrxConfig

    args.model = str(Path(args.model) if args.model else make_model(Path(args.workdir)))
    E = DbrxConfig.from_json(Path(args.model) / "config.json").num_experts
    print(describe_machine())
    if args.device == "cuda":
        r = run_child(args, mode="offload")
        print(json.dumps(r, indent=1))
        return 0
    ram = read_bandwidth(512 << 20)
    base = run_child(args, mode="baseline")["peak_rss"]
    resident = run_child(args, mode="resident")
    first = run_child(args, mode="offload", slots=E // 4)  # also builds the prepared-expert file
    page = source_bandwidth(first["file"], first["slot_bytes"], first["stride"], direct=False)
    disk = source_bandwidth(first["file"], first["slot_bytes"], first["stride"], direct=True)
    print(f"RAM read {ram / 1e9:.1f} GB/s; prepared file {first['file']} ({format_size(os.path.getsize(first['file']))}):"
          f" page cache {page / 1e9:.2f} GB/s, disk (O_DIRECT) {disk / 1e9:.2f} GB/s; one expert "
          f"{format_size(first['slot_bytes'])}; the disk is measured again before each disk row (a VM disk "
          f"varies)")
    print(f"baseline process (interpreter, torch, dbrxq, kernel): peak RSS {format_size(base)}")
    print(f"resident: {resident['decode_tok_s']:.2f} tok/s ({1e3 * resident['decode_s_per_tok']:.0f} ms/token), "
          f"peak RSS {format_size(resident['peak_rss'])}\n")
    print("| resident experts | source | source GB/s | tok/s | ms/token | hit rate | moved/token | bound ms (sum / overlap) "
          "| measured / bound | measured / overlap floor | budget | peak RSS | RSS - budget |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for frac in (float(f) for f in args.fractions.split(",")):
        slots = round(frac * E)
        for source in args.sources.split(","):
            if source == "disk":
                disk = source_bandwidth(first["file"], first["slot_bytes"], first["stride"], direct=True)
            r = run_child(args, mode="offload", slots=slots, source=source)
            bw = disk if source == "disk" else ram if source == "mmap" else page
            missed = r["misses_per_tok"] * r["slot_bytes"]
            local = r["hits_per_tok"] * r["slot_bytes"] + r["non_expert"]
            overlap = max(missed / bw, local / ram)
            serial = missed / bw + local / ram
            ms = 1e3 * r["decode_s_per_tok"]
            src = source + ("" if source != "disk" or r["direct"] else " (no O_DIRECT here)")
            if source in ("map-cached", "default"):
                src += f" ({r['mapped_per_tok']:.1f} of {r['misses_per_tok']:.1f} misses/token computed from the page cache)"
            print(f"| {slots}/{E} | {src} | {bw / 1e9:.2f} | {r['decode_tok_s']:.2f} | {ms:.0f} | {r['hit_rate']:.1%} | "
                  f"{format_size(r['moved_per_tok'])} | {1e3 * serial:.0f} / {1e3 * overlap:.0f} | "
                  f"{ms / (1e3 * serial):.2f} | {ms / (1e3 * overlap):.2f} | {format_size(r['budget'])} | "
                  f"{format_size(r['peak_rss'])} | "
                  f"{format_size(r['peak_rss'] - r['budget'])} |")
    if args.cleanup and not args.model:
        shutil.rmtree(args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
