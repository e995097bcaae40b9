#!/usr/bin/env python
"""Make a random, seeded DBRX checkpoint (hub layout) for tests and benchmarks.

    python scripts/make_checkpoint.py OUT --preset tiny
    python scripts/make_checkpoint.py OUT --preset dbrx --layers 2 --vocab-size 1024   # real width, ~13 GB

A thin CLI over :func:`dbrxq.make_checkpoint.make_random_checkpoint`; presets and overrides are
:func:`dbrxq.make_checkpoint.preset_config`'s.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time

import torch

from dbrxq.errors import DbrxqError
from dbrxq.make_checkpoint import PRESETS, make_random_checkpoint, preset_config
from dbrxq.writer import DEFAULT_MAX_SHARD_BYTES

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def parse_size(text: str) -> int:
    """'5GiB', '512MB', '1000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GiB, 512MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output folder")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="base shape (default: tiny)")
    p.add_argument("--layers", type=int, dest="n_layers", help="override n_layers")
    p.add_argument("--vocab-size", type=int, help="override vocab_size")
    p.add_argument("--d-model", type=int, help="override d_model")
    p.add_argument("--n-heads", type=int, help="override n_heads")
    p.add_argument("--kv-heads", type=int, dest="kv_n_heads", help="override attn_config.kv_n_heads")
    p.add_argument("--experts", type=int, dest="moe_num_experts", help="override ffn_config.moe_num_experts")
    p.add_argument("--top-k", type=int, dest="moe_top_k", help="override ffn_config.moe_top_k")
    p.add_argument("--ffn-hidden-size", type=int, help="override ffn_config.ffn_hidden_size")
    p.add_argument("--max-seq-len", type=int, help="override max_seq_len")
    p.add_argument("--seed", type=int, default=0, help="values depend on the seed only (default: 0)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="stored dtype (default: bf16)")
    p.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES,
                   help="shard size limit, e.g. 5GiB (default: 5GiB)")
    p.add_argument("--tokenizer-dir", help="copy tokenizer files from this folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {k: getattr(args, k) for k in ("n_layers", "vocab_size", "d_model", "n_heads", "kv_n_heads",
                                               "moe_num_experts", "moe_top_k", "ffn_hidden_size", "max_seq_len")}
    t0 = time.perf_counter()
    try:
        config = preset_config(args.preset, **overrides)
        out = make_random_checkpoint(args.out, config, seed=args.seed, dtype=_DTYPES[args.dtype],
                                     max_shard_bytes=args.max_shard_size, tokenizer_dir=args.tokenizer_dir,
                                     progress=not args.no_progress)
    except DbrxqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
