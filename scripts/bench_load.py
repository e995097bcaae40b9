"""Load time of checkpoints, several dbrxq source trees taking turns in one run (e.g. before/after a change).

    python scripts/bench_load.py demo /path/to/ckpt --repo . --repo /tmp/worktree-before --turns 3

Each turn runs `dbrxq.load(MODEL)` (with --tokenizer: `DbrxTokenizer.from_pretrained(MODEL)`) (float32 for a float checkpoint's activations, as `dbrxq run`
picks by default: the checkpoint's dtype) in a fresh Python process with the given source tree first
on sys.path, and reports the seconds inside load() (imports excluded) and the process's peak RSS;
the median over turns is printed per (model, repo). The files are read once before the first turn
so every turn finds them in the page cache: this measures dbrxq's work, not the disk.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dbrxq.core.sysinfo import describe_machine  # noqa: E402

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
import dbrxq
from dbrxq.text.tokenizer import DbrxTokenizer
t0 = time.perf_counter()
if {tokenizer!r}:
    DbrxTokenizer.from_pretrained(dbrxq.default_model_dir() if {model!r} == "demo" else {model!r})
else:
    dbrxq.load(None if {model!r} == "demo" else {model!r})
dt = time.perf_counter() - t0
print(json.dumps({{"seconds": dt, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "file": dbrxq.__file__}}))
"""


def warm(model: str) -> None:
    if model == "demo":
        return
    for p in sorted(Path(model).glob("*.safetensors")):
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--repo", action="append", required=True, help="a dbrxq source tree (repeat)")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--tokenizer", action="store_true",
                    help="time DbrxTokenizer.from_pretrained(MODEL) instead (MODEL may hold only tokenizer files)")
    args = ap.parse_args()
    print(describe_machine())
    rows = []
    for model in args.models:
        warm(model)
        times = {r: [] for r in args.repo}
        rss = {}
        for turn in range(args.turns):
            for repo in args.repo:
                code = CHILD.format(repo=str(Path(repo).resolve()), model=model, tokenizer=args.tokenizer)
                out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                assert res["file"].startswith(str(Path(repo).resolve())), res["file"]
                times[repo].append(res["seconds"])
                rss[repo] = res["rss"]
        for repo in args.repo:
            rows.append((model, repo, statistics.median(times[repo]), min(times[repo]), rss[repo]))
            print(rows[-1], flush=True)
    print("\n| model | source tree | load s (median) | min | peak RSS |\n|---|---|---:|---:|---:|")
    for model, repo, med, lo, r in rows:
        print(f"| {model} | {repo} | {med:.3f} | {lo:.3f} | {r / 2**20:.0f} MiB |")


if __name__ == "__main__":
    main()
