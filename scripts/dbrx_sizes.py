#!/usr/bin/env python
"""The size of real DBRX as a dbrxq checkpoint, per recipe, from the dims alone (no download).

    python scripts/dbrx_sizes.py
    python scripts/dbrx_sizes.py --target-size 48GB

Every tensor's bytes come from quantize.specs.quantized_tensor_specs (what `dbrxq quantize` would
write) for scripts/make_checkpoint.py's "dbrx" preset: 40 layers, 16 experts of 10752 x 6144, vocab
100352, embedding and lm_head bf16. With --target-size, the expert budget that `dbrxq quantize
--target-size` computes (calibration.allocation.budget_from_size) and, for scale, how many of the 640
experts could be 3-bit with the rest 2-bit; which experts get which width is the allocator's
choice, from their measured errors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dbrxq.core.units import parse_size  # noqa: E402
from dbrxq.formats.random import preset_config  # noqa: E402
from quantize.config import ModuleQuant, QuantConfig  # noqa: E402
from quantize.specs import quantized_tensor_specs  # noqa: E402

INT8 = ModuleQuant(8, -1, True)


def parts(config, qc: QuantConfig) -> dict[str, int]:
    """Bytes by part: experts, attention, the rest (embedding, head, norms, routers)."""
    out = {"experts": 0, "attention": 0, "other": 0}
    for name, shape, dtype in quantized_tensor_specs(config, qc):
        n = 1
        for d in shape:
            n *= d
        n *= {"torch.uint8": 1, "torch.float16": 2, "torch.bfloat16": 2, "torch.float32": 4}[str(dtype)]
        out["experts" if ".ffn.experts." in name else "attention" if ".attn." in name else "other"] += n
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target-size", default="48GB", help="the size the mixed recipe must fit (e.g. 48GB)")
    a = ap.parse_args()
    config = preset_config("dbrx")
    recipes = [
        ("int8 experts", ModuleQuant(8, -1, True)),
        ("int4 g128 (dbrxq's default)", ModuleQuant(4, 128, True)),
        ("int4 g32", ModuleQuant(4, 32, True)),
        ("int3 g128", ModuleQuant(3, 128, True)),
        ("int3 g64", ModuleQuant(3, 64, True)),
        ("int2 g64", ModuleQuant(2, 64, True)),
        ("int2 g32", ModuleQuant(2, 32, True)),
    ]
    print("| experts (attention int8 per-channel, embedding and head bf16) | experts | attention | other | total |")
    print("|---|---:|---:|---:|---:|")
    per_bits = {}
    for name, mq in recipes:
        p = parts(config, QuantConfig(experts=mq, attn=INT8))
        per_bits[(mq.bits, mq.group_size, mq.symmetric)] = p
        print(f"| {name} | {p['experts'] / 1e9:.1f} GB | {p['attention'] / 1e9:.2f} GB | {p['other'] / 1e9:.2f} GB "
              f"| {sum(p.values()) / 1e9:.1f} GB |")
    import torch

    from calibration.allocation import OPTIONS, budget_from_size, expert_bytes
    target = parse_size(a.target_size, "--target-size")
    n = config.n_layers * config.num_experts
    budget = budget_from_size(config, QuantConfig(attn=INT8), torch.bfloat16, target)  # what --target-size uses
    per = {o.bits: expert_bytes(config, o) for o in OPTIONS}
    k3 = max(0, min(n, (budget - n * per[2]) // (per[3] - per[2])))  # e.g. this many at 3 bits, the rest at 2
    print(f"\n`dbrxq quantize --target-size {a.target_size}` ({target / 1e9:.1f} GB): {budget / 1e9:.2f} GB for the "
          f"{n} experts once attention (int8) and the rest are counted; one expert takes "
          + ", ".join(f"{b}-bit {v / 1e6:.1f} MB" for b, v in per.items())
          + f". Which experts get which width is the allocator's choice from their measured errors (it never "
          f"exceeds the budget); for scale: {k3} experts at 3 bits and {n - k3} at 2 bits -> "
          f"{(target - budget + k3 * per[3] + (n - k3) * per[2]) / 1e9:.2f} GB, fits: "
          f"{k3 * per[3] + (n - k3) * per[2] <= budget}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
