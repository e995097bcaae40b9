"""The fixed cost of a layer: decode time that has nothing to do with reading weights.

At the demo's width (d_model 128, 16 experts of 128) a layer's weights are read in microseconds, so a
decode step's time is the runtime's own: Python, tensor dispatch, kernel calls. Measured here as
the slope of ms/token between random int4 models of 2 and 8 layers of that width (the head,
sampling and the generation loop cancel out), and as the demo model's tokens/s (float bf16, 4
layers). One thread; every (source tree, model) pair runs in its own process, in turns, and the
median over turns is reported. ``--tree`` adds another source tree (e.g. a checkout of an older
commit) to run in the same turns; a tree that cannot read the blocks layout gets canonical
checkpoints of the same codes.

    python scripts/bench_layer_cost.py --turns 5 [--tree /path/to/older/checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dbrxq.core.sysinfo import describe_machine  # noqa: E402

CHILD = """
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
import dbrxq
torch.set_num_threads(1)
m = dbrxq.load(None if sys.argv[2] == "demo" else sys.argv[2])
ids = [m.tokenizer.encode("The function returns")]
m.generate_ids(ids, max_new_tokens=8)
best = 0.0
for _ in range(3):
    t = time.perf_counter()
    out = m.generate_ids(ids, max_new_tokens=int(sys.argv[3]))
    best = max(best, out.stats.decode_steps / out.stats.decode_s)
print(json.dumps({"tok_s": best}))
"""


def make_models(folder: Path, layout: str) -> dict[str, Path]:
    """Random int4 checkpoints of the demo's width with 2 and 8 layers, in ``layout``."""
    from dbrxq.formats.hub import copy_tokenizer_files, default_model_dir
    from dbrxq.formats.random import preset_config
    from quantize.config import QuantConfig
    from quantize.random import make_random_quantized_checkpoint
    out = {}
    for layers in (2, 8):
        path = folder / f"{layout}-{layers}"
        if not (path / "config.json").exists():
            config = preset_config("tiny", d_model=128, n_heads=4, kv_n_heads=2, ffn_hidden_size=128,
                                   n_layers=layers, vocab_size=1536)
            make_random_quantized_checkpoint(path, config, QuantConfig(layout=layout), progress=False)
            copy_tokenizer_files(default_model_dir(), path)
        out[f"int4 x{layers}"] = path
    return out


def reads_blocks(tree: Path) -> bool:
    return (tree / "quantize" / "blocks.py").exists()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", type=Path, default=[], help="another source tree to time")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "dbrxq-bench-layer-cost")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    trees = [ROOT, *[t.resolve() for t in args.tree]]
    models = {tree: {"demo (float)": "demo", **make_models(args.workdir, "blocks" if reads_blocks(tree) else "canonical")}
              for tree in trees}
    runs: dict[tuple, list[float]] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for turn in range(args.turns):
        for tree in trees:
            for name, path in models[tree].items():
                r = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(path), str(args.tokens)],
                                   capture_output=True, text=True, env=env, cwd=tree)
                if r.returncode != 0:
                    raise SystemExit(f"{tree} {name}: {r.stderr[-2000:]}")
                runs.setdefault((tree, name), []).append(json.loads(r.stdout.strip().splitlines()[-1])["tok_s"])
        print(f"turn {turn + 1}/{args.turns} done", file=sys.stderr)
    print(f"# {describe_machine()}; 1 thread; decode of {args.tokens} tokens, best of 3 per process, "
          f"median over {args.turns} turns")
    print("| source tree | model | tok/s | ms/token | ms per layer (slope 2 -> 8 layers) |")
    print("|---|---|---:|---:|---:|")
    for tree in trees:
        med = {name: statistics.median(runs[(tree, name)]) for name in models[tree]}
        slope = (1e3 / med["int4 x8"] - 1e3 / med["int4 x2"]) / 6
        for name, v in med.items():
            per = f"{slope:.3f}" if name.startswith("int4") else "-"
            print(f"| {tree if tree != ROOT else 'this checkout'} | {name} | {v:.1f} | {1e3 / v:.2f} | {per} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
