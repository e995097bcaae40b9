#!/usr/bin/env python
"""Make a random, seeded DBRX checkpoint (hub layout) for tests and benchmarks.

    python scripts/make_checkpoint.py OUT --preset tiny
    python scripts/make_checkpoint.py OUT --preset dbrx --layers 2 --vocab-size 1024   # real width, ~13 GB
    python scripts/make_checkpoint.py OUT --preset dbrx --layers 1 --random-codes 4     # quantized directly
    python scripts/make_checkpoint.py OUT --preset dbrx --layers 1 --random-codes 4:4,3:6,2:6   # mixed

A thin CLI over :func:`dbrxq.formats.random.make_random_checkpoint` and, with ``--random-codes``,
:func:`~quantize.random.make_random_quantized_checkpoint` (random codes written straight into
dbrxq's quantized format, for speed benchmarks): ``B`` gives every expert the recipe of B bits of
calibration.allocation.OPTIONS (2 and 3 bits g64 with zero points, 4 bits g128, 8 bits per channel),
``B:N,B:N,...`` the first N experts of every layer B bits, the next N the next width, and so on
(format_version 3). Presets and overrides are :func:`dbrxq.formats.random.preset_config`'s.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

import torch

from dbrxq.core.errors import DbrxqError
from dbrxq.core.untrusted import read_json
from dbrxq.formats.hub import copy_tokenizer_files, default_model_dir
from dbrxq.text.tokenizer import DbrxTokenizer
from dbrxq.formats.random import PRESETS, make_random_checkpoint, preset_config
from dbrxq.formats.shards import DEFAULT_MAX_SHARD_BYTES
from quantize.random import make_random_quantized_checkpoint

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


def random_codes_recipe(spec: str, config):
    """``--random-codes`` -> a QuantConfig: one recipe for every expert, or per-expert recipes in expert order."""
    from calibration.allocation import OPTIONS
    from quantize.config import ExpertMix, QuantConfig
    by_bits = {o.bits: j for j, o in enumerate(OPTIONS)}
    try:
        parts = [(int(b), int(n)) for b, n in (x.split(":") for x in spec.split(","))] if ":" in spec \
            else [(int(spec), config.num_experts)]
    except ValueError:
        raise DbrxqError(f"--random-codes {spec!r}: expected B or B:N,B:N,... with B in {sorted(by_bits)}") from None
    if any(b not in by_bits or n < 0 for b, n in parts) or sum(n for _, n in parts) != config.num_experts:
        raise DbrxqError(f"--random-codes {spec!r}: bits in {sorted(by_bits)}, counts summing to the "
                         f"{config.num_experts} experts of a layer")
    if len(parts) == 1:
        return QuantConfig(experts=OPTIONS[by_bits[parts[0][0]]])
    row = tuple(by_bits[b] for b, n in parts for _ in range(n))
    return QuantConfig(expert_mix=ExpertMix(OPTIONS, (row,) * config.n_layers))


def default_tokenizer(vocab_size: int, need: int) -> Path | None:
    """The demo model's folder (its tokenizer files, ``need`` ids) when they fit ``vocab_size``, else None (said)."""
    if need > vocab_size:
        print(f"note: no tokenizer written: the demo tokenizer's {need} ids do not fit --vocab-size {vocab_size}; "
              f"pass --tokenizer-dir", file=sys.stderr)
        return None
    return default_model_dir()


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
    p.add_argument("--tokenizer-dir", help="copy tokenizer files from this folder (default: the demo model's "
                   "1536-token tokenizer, when --vocab-size holds its ids, so `dbrxq run` works on the result)")
    p.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    p.add_argument("--random-codes", metavar="SPEC", help="write a quantized checkpoint of random codes: B or "
                   "B:N,B:N,... (bits per expert, in expert order; see above)")
    p.add_argument("--router-shares", type=Path, metavar="JSON", help="with --random-codes: skew each layer's "
                   "router towards these per-expert routing shares (a list per layer, reused in turn; "
                   "scripts/routing_stats.py --shares-json measures a trained model's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {k: getattr(args, k) for k in ("n_layers", "vocab_size", "d_model", "n_heads", "kv_n_heads",
                                               "moe_num_experts", "moe_top_k", "ffn_hidden_size", "max_seq_len")}
    t0 = time.perf_counter()
    try:
        config = preset_config(args.preset, **overrides)
        if args.tokenizer_dir is None and not args.no_tokenizer:
            need = DbrxTokenizer.from_pretrained(default_model_dir()).vocab_size
            if args.vocab_size is None and config.vocab_size < need:  # the preset's own: widen it to the tokenizer
                config = preset_config(args.preset, **{**overrides, "vocab_size": need})
            args.tokenizer_dir = default_tokenizer(config.vocab_size, need)
        if args.random_codes:
            shares = (read_json(args.router_shares, 16 << 20, what=f"--router-shares {args.router_shares}",
                                error=DbrxqError) if args.router_shares else None)
            out = make_random_quantized_checkpoint(args.out, config, random_codes_recipe(args.random_codes, config),
                                                   seed=args.seed, dtype=_DTYPES[args.dtype],
                                                   max_shard_bytes=args.max_shard_size, progress=not args.no_progress,
                                                   router_shares=shares)
            if args.tokenizer_dir:
                copy_tokenizer_files(args.tokenizer_dir, out)
        elif args.router_shares:
            raise DbrxqError("--router-shares skews a random-codes checkpoint's router: give --random-codes too")
        else:
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
