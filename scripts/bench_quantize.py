"""Quantize throughput and peak memory on a synthetic real-width DBRX checkpoint (2 layers).

    python scripts/bench_quantize.py [--src DIR] [--keep] [--samples 16] [--seq-len 128] [--threads 2]

Without --src it writes ``scripts/make_checkpoint.py OUT --preset dbrx --layers 2`` (d_model 6144,
48/8 heads, 16 experts of 10752, bf16, ~13 GB) into a temp folder, with the demo model's tokenizer
and vocab_size 1536 (its ids run to 1535, so 1024 would not hold the calibration tokens; the
embedding is 19 MB either way), and deletes it at the end unless --keep.

Each method runs in its own child process, so ``getrusage(RUSAGE_SELF).ru_maxrss`` is that
method's peak RSS alone:

- rtn:  ``quantize.writer.quantize_checkpoint`` (the CLI's --method rtn: one streaming pass);
- gptq: ``calibration.pipeline.quantize_with_calibration`` (the CLI's default), with a small
  calibration set (16 x 128 tokens by default) to bound the time on a 2-core box.

Printed: the machine, source GB per minute (its own figure), seconds per layer, peak RSS against the one-layer
budget (it must stay near ONE source layer, not two), and the projection to DBRX's 40 layers on
this machine, plus a stated estimate for one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GB = 1e9


def child(method: str, src: str, out: str, samples: int, seq_len: int, threads: int) -> None:
    """Run one method in this (child) process; print one JSON line of measurements."""
    import torch
    torch.set_num_threads(threads)
    from quantize.config import QuantConfig
    t0 = time.perf_counter()
    result: dict = {"method": method}
    if method == "rtn":
        from quantize.writer import quantize_checkpoint
        quantize_checkpoint(src, out, QuantConfig(method="rtn"), overwrite=True, progress=False)
    else:
        from calibration.options import CalibrationOptions
        from calibration.pipeline import quantize_with_calibration
        r = quantize_with_calibration(src, out, QuantConfig(method="gptq"),
                                      CalibrationOptions(samples=samples, seq_len=seq_len), overwrite=True,
                                      progress=False)
        result["layers"] = [L["seconds"] for L in r.report["layers"]]
        result["errors"] = r.report["errors"]
        result["rare"] = r.report["totals"]["experts_fallback"]
    result["seconds"] = time.perf_counter() - t0
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(result), flush=True)


def run_child(method: str, src: Path, out: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--src", str(src), "--out", str(out),
           "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        sys.exit(f"{method} failed:\n{p.stderr[-3000:]}")
    return json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])


def layer_budget(config, samples: int, seq_len: int) -> tuple[float, float]:
    """(one source layer in bf16, the one-layer peak budget) in bytes."""
    d, f, e = config.d_model, config.ffn_hidden_size, config.num_experts
    layer = 2 * (3 * e * f * d + config.qkv_out_features * d + d * d)
    quantized = layer / 4 * 1.07  # int4 g128 experts (+fp16 scales), int8 attention: ~a quarter
    acts = 3 * samples * seq_len * d * 4  # x, h, out in float32
    work = 4 * (3 * f * d + 3 * f * f + 2 * d * d)  # one expert in fp32 + its two Hessians, copies
    return layer, layer + quantized + acts + work + 1.0 * GB  # + interpreter, torch, allocator slack


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", help="reuse this synthetic checkpoint instead of writing one")
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--child", choices=["rtn", "gptq"], help=argparse.SUPPRESS)
    p.add_argument("--keep", action="store_true", help="keep the checkpoint written")
    p.add_argument("--samples", type=int, default=16, help="calibration sequences (default 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--methods", default="rtn,gptq", help="comma-separated (default rtn,gptq)")
    p.add_argument("--workdir", default=tempfile.gettempdir(), help="where temp folders go")
    args = p.parse_args()
    if args.child:
        child(args.child, args.src, args.out, args.samples, args.seq_len, args.threads)
        return 0

    import torch
    torch.set_num_threads(args.threads)
    from dbrxq.core.sysinfo import describe_machine, read_bandwidth
    from dbrxq.formats.checkpoint import read_config
    from quantize.writer import checkpoint_size
    print(describe_machine())
    print(f"read bandwidth {read_bandwidth(1 << 29) / GB:.1f} GB/s ({args.threads} threads)")
    work = Path(tempfile.mkdtemp(prefix="bench_quantize_", dir=args.workdir))
    made = args.src is None
    src = Path(args.src) if args.src else work / "src"
    try:
        if made:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, str(REPO / "scripts" / "make_checkpoint.py"), str(src), "--preset", "dbrx",
                            "--layers", "2", "--vocab-size", "1536", "--tokenizer-dir",
                            str(REPO / "dbrxq" / "assets" / "tiny"), "--no-progress"], check=True)
            shutil.copy(REPO / "dbrxq" / "assets" / "tiny" / "tokenizer.tiktoken.json", src)
            print(f"wrote {src} in {time.perf_counter() - t0:.0f} s")
        config = read_config(src)
        _, bytes_in = checkpoint_size(src)
        layer, budget = layer_budget(config, args.samples, args.seq_len)
        print(f"source {bytes_in / GB:.2f} GB, {config.n_layers} layers of d_model {config.d_model}, "
              f"{config.num_experts} experts x {config.ffn_hidden_size}; one layer {layer / GB:.2f} GB bf16")
        print(f"calibration {args.samples} x {args.seq_len} tokens (gptq)")
        for method in args.methods.split(","):
            out = work / f"out_{method}"
            r = run_child(method, src, out, args)
            rate = bytes_in / GB / (r["seconds"] / 60)
            ok = r["peak_rss"] <= budget
            print(f"\n[{method}] {r['seconds']:.0f} s, {rate:.2f} GB of source per minute, "
                  f"out {checkpoint_size(out)[1] / GB:.2f} GB")
            print(f"  peak RSS {r['peak_rss'] / 2**30:.2f} GiB; one-layer budget {budget / 2**30:.2f} GiB, "
                  f"two source layers alone {2 * layer / 2**30:.2f} GiB -> {'OK' if ok else 'OVER BUDGET'}")
            per_layer = r["seconds"] / config.n_layers
            if "layers" in r:
                for i, s in enumerate(r["layers"]):
                    print(f"  layer {i}: " + ", ".join(f"{k} {v:.0f} s" for k, v in s.items()))
                per_layer = sum(s["total"] for s in r["layers"]) / len(r["layers"])
                print("  rel. output error: " + ", ".join(f"{k} {v['mean']:.4f}" for k, v in r["errors"].items())
                      + f"; rare experts {r['rare']}")
            print(f"  projected DBRX (40 layers, 263 GB) on this machine: {40 * per_layer / 3600:.1f} h "
                  f"at this calibration size")
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if made and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif made:
            print(f"kept {src}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
