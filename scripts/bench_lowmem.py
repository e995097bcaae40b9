"""dbrxq and llama.cpp side by side in the same memory: each engine in a fresh memory cgroup of the same size.

The same weights in both (dbrxq's int4 g128 / int8 checkpoint and its bit-exact GGUF export: Q4_0 and
Q8_0), a real-width DBRX of a few layers whose router is skewed like a trained model's
(``--router-shares``, from scripts/routing_stats.py --shares-json), at memory = given fractions of the
model's bytes. Per run: the page cache is dropped, a memory cgroup (v1 or v2) is created with the limit,
and the engine runs in a child process put into it:

- dbrxq: ``dbrxq.load(MODEL, cpu_memory="auto")`` (the cgroup's limit, less the margin), the prompt,
  then decoding; experts it does not hold are read from the checkpoint (blocks layout). Each run gets
  an empty cache folder, so it starts with no routing observed by earlier runs (a first run);
  ``--routing-history DIR`` shares one folder between runs instead (a user's later runs).
- dbrxq-gguf: ``dbrxq.load(GGUF)``, the very file llama.cpp runs, loaded whole into dbrxq's kernels (its
  K-quant blocks converted at load; no offloading), for start-up and speed on the same bytes.
- llama.cpp (llama-cpp-python): ``Llama(GGUF, use_mmap=True)`` with ``use_extra_bufts`` off, so the
  mapped file is what it computes from (nothing repacked into anonymous memory), ``logits_all=True`` so
  that every prompt token goes through every layer's experts (without it the last layer's feed-forward
  runs for the last token only, a discount a 4-layer model would magnify); greedy decoding.

Reported: start-up (from spawning the process to the first generated token), prompt and decode tokens/s,
bytes read from storage per decoded token (``/proc/PID/io`` read_bytes), dbrxq's expert-cache hit rate,
the cgroup's peak usage, and whether the kernel killed the engine (OOM). Engines take turns. Needs root
(cgroups, dropping the page cache); says why and exits otherwise.

    python scripts/bench_lowmem.py --model /work/bench/q4 --make --layers 4 --router-shares shares.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dbrxq.core.sysinfo import describe_machine  # noqa: E402
from dbrxq.core.units import format_size  # noqa: E402

COMMON = """
import json, os, sys, time
def read_bytes():
    with open("/proc/self/io") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("read_bytes:"))
def peak_rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
args = json.loads(sys.argv[1])
"""

DBRXQ_CHILD = COMMON + """
import torch
import dbrxq
torch.set_num_threads(args["threads"])
if args["engine"] == "dbrxq-gguf":  # the GGUF file llama.cpp runs, loaded whole into dbrxq's kernels
    r = dbrxq.load(args["gguf"], threads=args["threads"])
else:
    r = dbrxq.load(args["model"], cpu_memory="auto", context=args["context"], threads=args["threads"],
                   offload_options={"cache_dir": args["cache_dir"], **args["options"]})
marks = {}
def on_token(tok):
    if "first" not in marks:
        marks["first"] = time.time()
        marks["read0"] = read_bytes()
out = r.generate_ids([args["prompt"]], max_new_tokens=args["tokens"] + 1, on_token=on_token, stop_tokens=[])
st = out.stats
ph = r.offload.stats.phases["decode"] if r.offload is not None else None
print(json.dumps({"first_token": marks["first"], "prompt_tok_s": len(args["prompt"]) / st.prefill_s,
                  "decode_tok_s": st.decode_steps / st.decode_s, "steps": st.decode_steps,
                  "read_per_token": (read_bytes() - marks["read0"]) / max(1, st.decode_steps),
                  "hit_rate": None if ph is None else ph.hit_rate, "peak_rss": peak_rss(),
                  "slots": None if r.offload is None else sum(r.offload.plan.slots_per_layer),
                  "reads": None if r.offload is None or r.offload.file.choice is None else r.offload.file.choice.summary()}))
"""

LLAMA_CHILD = COMMON + """
import numpy as np
import llama_cpp
from llama_cpp import llama as llama_module
default = llama_module.llama_cpp.llama_model_default_params
def params():  # no CPU_REPACK buffers: compute from the mapped file itself
    p = default()
    p.use_extra_bufts = False
    return p
llama_module.llama_cpp.llama_model_default_params = params
llm = llama_cpp.Llama(args["gguf"], n_ctx=args["context"], n_batch=512, n_ubatch=512, n_threads=args["threads"],
                      n_threads_batch=args["threads"], logits_all=True, use_mmap=True, use_mlock=False, verbose=False)
t0 = time.perf_counter()
llm.eval(args["prompt"])
prompt_s = time.perf_counter() - t0
tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
first = time.time()
read0 = read_bytes()
t0 = time.perf_counter()
for _ in range(args["tokens"]):
    llm.eval([tok])
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
decode_s = time.perf_counter() - t0
print(json.dumps({"first_token": first, "prompt_tok_s": len(args["prompt"]) / prompt_s,
                  "decode_tok_s": args["tokens"] / decode_s, "steps": args["tokens"],
                  "read_per_token": (read_bytes() - read0) / args["tokens"], "hit_rate": None,
                  "peak_rss": peak_rss(), "slots": None}))
"""


class Cgroup:
    """A memory cgroup of ``limit`` bytes (v2 if the unified hierarchy has the memory controller, else v1)."""

    def __init__(self, limit: int):
        name = f"dbrxq-lowmem-{uuid.uuid4().hex[:8]}"
        v2 = Path("/sys/fs/cgroup")
        if (v2 / "cgroup.controllers").exists() and "memory" in (v2 / "cgroup.controllers").read_text():
            self.path, self.v2 = v2 / name, True
            self.path.mkdir()
            (self.path / "memory.max").write_text(str(limit))
            (self.path / "memory.swap.max").write_text("0")
        else:
            self.path, self.v2 = Path("/sys/fs/cgroup/memory") / name, False
            self.path.mkdir()
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
            if (self.path / "memory.memsw.limit_in_bytes").exists():
                (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))

    def peak(self) -> int:
        return int((self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")).read_text())

    def oom_kills(self) -> int:
        text = (self.path / ("memory.events" if self.v2 else "memory.oom_control")).read_text()
        fields = dict(line.split() for line in text.splitlines())
        return int(fields.get("oom_kill", 0))

    def remove(self) -> None:
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run(engine: str, limit: int, child_args: dict) -> dict:
    drop_page_cache()
    cg = Cgroup(limit)
    try:
        code = DBRXQ_CHILD if engine.startswith("dbrxq") else LLAMA_CHILD
        procs = cg.path / "cgroup.procs"
        spawn = time.time()
        r = subprocess.run(["sh", "-c", f'echo $$ > {procs} && exec "$0" -c "$1" "$2"', sys.executable, code,
                            json.dumps(child_args)], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": str(child_args["threads"])})
        out = {"engine": engine, "limit": limit, "peak_cgroup": cg.peak(), "oom_kills": cg.oom_kills(),
               "returncode": r.returncode}
        if r.returncode == 0:
            res = json.loads(r.stdout.strip().splitlines()[-1])
            res["startup_s"] = res.pop("first_token") - spawn
            out.update(res)
        else:
            out["error"] = r.stderr.strip().splitlines()[-1:] if r.stderr.strip() else [f"exit {r.returncode}"]
        return out
    finally:
        cg.remove()


def prepare(args) -> int:
    """The checkpoint (made when --make), its GGUF export, and the model's bytes (the GGUF file's when only
    GGUF engines run)."""
    if "dbrxq" not in args.engines and args.gguf is not None:
        return args.gguf.stat().st_size
    if args.make and not (args.model / "config.json").exists():
        cmd = [sys.executable, str(ROOT / "scripts" / "make_checkpoint.py"), str(args.model), "--preset", "dbrx",
               "--layers", str(args.layers), "--vocab-size", "1536", "--random-codes", "4",
               "--tokenizer-dir", str(ROOT / "dbrxq" / "assets" / "tiny"), "--no-progress"]
        if args.router_shares:
            cmd += ["--router-shares", str(args.router_shares)]
        subprocess.run(cmd, check=True)
    gguf = args.gguf or args.model.with_suffix(".gguf")
    if not gguf.exists():
        subprocess.run([sys.executable, "-m", "dbrxq.cli", "export", str(args.model), str(gguf)], check=True, cwd=ROOT)
    args.gguf = gguf
    return sum(p.stat().st_size for p in args.model.glob("*.safetensors"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="an int4 g128 (Q4_0-exact) dbrxq checkpoint (engine dbrxq)")
    ap.add_argument("--gguf", type=Path, help="its GGUF export [default: MODEL.gguf, exported when absent], or any DBRX "
                    "GGUF file (e.g. scripts/make_random_gguf.py's K-quant mixes) for the GGUF engines alone")
    ap.add_argument("--make", action="store_true", help="make MODEL (random codes, real width) when absent")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--router-shares", type=Path, help="per-layer routing shares to skew the router towards")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--engines", nargs="+", default=["dbrxq", "llama.cpp"], choices=["dbrxq", "dbrxq-gguf", "llama.cpp"],
                    help="dbrxq: MODEL with --cpu-memory auto; dbrxq-gguf: the GGUF file in dbrxq, loaded whole; "
                    "llama.cpp: the GGUF file, mapped")
    ap.add_argument("--tokens", type=int, default=24, help="decoded tokens")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--routing-history", type=Path, help="dbrxq's cache folder, shared by its runs [default: a "
                    "fresh one per run]")
    ap.add_argument("--dbrxq-options", type=json.loads, default={}, help='more offload_options for dbrxq, as JSON '
                    '(e.g. \'{"direct": true}\')')
    ap.add_argument("--json", type=Path, help="also write every run's figures here")
    args = ap.parse_args()
    if args.model is None and ("dbrxq" in args.engines or args.gguf is None):
        ap.error("--model is needed for the dbrxq engine, or when --gguf is not given")
    if os.geteuid() != 0:
        print("bench_lowmem needs root: it makes memory cgroups and drops the page cache", file=sys.stderr)
        return 2
    if not (Path("/sys/fs/cgroup/memory").is_dir() or Path("/sys/fs/cgroup/cgroup.controllers").exists()):
        print("bench_lowmem needs a memory cgroup controller (v1 or v2)", file=sys.stderr)
        return 2
    model_bytes = prepare(args)
    import random
    rng = random.Random(0)
    prompt = [rng.randrange(3, 1500) for _ in range(args.prompt_tokens)]
    results = []
    for frac in args.fractions:
        limit = int(model_bytes * frac)
        for engine in args.engines:
            with tempfile.TemporaryDirectory(prefix="dbrxq-lowmem-") as fresh:
                child = {"engine": engine, "model": str(args.model), "gguf": str(args.gguf), "prompt": prompt,
                         "tokens": args.tokens,
                         "threads": args.threads, "context": args.prompt_tokens + args.tokens + 8,
                         "cache_dir": str(args.routing_history or fresh), "options": args.dbrxq_options}
                res = run(engine, limit, child)
            res["fraction"] = frac
            results.append(res)
            print(json.dumps(res), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(f"# {describe_machine()}; engines on {args.threads} threads; model {args.model or args.gguf} ({format_size(model_bytes)}, "
          f"{args.layers} layers); prompt {args.prompt_tokens} tokens, {args.tokens} decoded; page cache dropped "
          f"before each run; dbrxq's routing history: {args.routing_history or 'none (a fresh cache folder per run)'}")
    print("| memory | engine | start-up s | prompt tok/s | decode tok/s | read/token | hit rate | peak cgroup | OOM kills "
          "| decode dbrxq / llama.cpp | prompt dbrxq / llama.cpp | start-up dbrxq / llama.cpp |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for frac in args.fractions:
        rows = {r["engine"]: r for r in results if r["fraction"] == frac}
        ll = rows.get("llama.cpp")
        for r in rows.values():
            d = r if r["engine"].startswith("dbrxq") else None
            both = d and ll and "decode_tok_s" in d and "decode_tok_s" in ll
            if "decode_tok_s" not in r:
                print(f"| {frac:g} x model = {format_size(r['limit'])} | {r['engine']} | failed: {r.get('error')} "
                      f"| | | | | {format_size(r['peak_cgroup'])} | {r['oom_kills']} | | | |")
                continue
            ratio = (f"{d['decode_tok_s'] / ll['decode_tok_s']:.2f} | {d['prompt_tok_s'] / ll['prompt_tok_s']:.2f} | "
                     f"{d['startup_s'] / ll['startup_s']:.2f}") if both and r is d else " | | "
            hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.1%}"
            print(f"| {frac:g} x model = {format_size(r['limit'])} | {r['engine']} | {r['startup_s']:.1f} | "
                  f"{r['prompt_tok_s']:.1f} | {r['decode_tok_s']:.2f} | {format_size(r['read_per_token'])} | {hit} | "
                  f"{format_size(r['peak_cgroup'])} | {r['oom_kills']} | {ratio} |")
    for r in results:  # how dbrxq read its misses (measured per source unless --dbrxq-options forced a way)
        if r["engine"] == "dbrxq" and r.get("reads"):
            print(f"- {r['fraction']:g} x model: dbrxq's {r['reads']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
