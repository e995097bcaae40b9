"""Quality of quantization on the trained demo model: the table in docs/benchmarks.md, one command.

    python scripts/eval_quality.py                       # embedded model, calibration/data/heldout.txt
    python scripts/eval_quality.py --max-tokens 8000     # quicker, noisier

Every row is compared with the float model (the shipped bf16 weights, run in float32) on the same
sliding windows of held-out text (never used for training or calibration): perplexity, its relative
change, mean KL(float || row) in nats per token, top-1 agreement, and the checkpoint's bytes on
disk. Rows:

- bf16: the reference itself (KL 0 by construction: a check of the harness).
- int8 RTN: experts and attention int8 per-channel.
- int4 RTN / GPTQ, g128 and g32: experts int4 (symmetric), attention int8 per-channel.
- int3 RTN / GPTQ (g128, g64) and int2 RTN / GPTQ (g64, g32), symmetric over all 2**bits levels, and
  GPTQ g64 with zero points (asym) beside them: experts at 3 and 2 bits, attention int8 per-channel.
- mixed GPTQ at an average of 3.0 and 2.5 bits: each expert's width chosen by `dbrxq quantize
  --target-bits` (calibration.allocation) under the byte budget of that average; attention int8.
- int4 RTN / GPTQ g128 with int4 attention as well: the harder setting,
  where methods separate more. (Per-channel experts would repeat the g128 rows: every input
  dimension of the demo model is 128, so there g128 *is* per-channel.)
- bnb NF4: experts quantized by bitsandbytes' own NF4 (blocksize 64, from the float weights,
  ``bitsandbytes.functional.quantize_4bit``) and dequantized the way its matmul does; attention
  int8 per-channel. Bytes: 4 bits + one float32 absmax per 64 weights for the experts.
- int8 KV cache: the float model whose attention reads every K/V through the int8 cache
  (per-token, per-head scales), so each window's keys and values are quantized.

GPTQ calibrates on calibration/data/calib.txt (disjoint from heldout.txt), 64 x 256 tokens.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import dbrxq
from dbrxq.core.sysinfo import describe_machine
from dbrxq.loading.loader import load_model
from dbrxq.model.kv_cache import make_kv_cache
from dbrxq.runtime.evaluate import compare
from quantize.config import ModuleQuant, QuantConfig
from quantize.writer import quantize_checkpoint

REPO = Path(__file__).resolve().parent.parent
HELDOUT = REPO / "calibration" / "data" / "heldout.txt"
INT8 = ModuleQuant(8, -1, True)


def recipes() -> list[tuple]:
    """(row name, method, recipe[, --target-bits]) of every checkpoint-based row."""
    def int4(g):
        return ModuleQuant(4, g, True)
    return [
        ("int8 RTN", "rtn", QuantConfig(method="rtn", experts=INT8, attn=INT8)),
        ("int4 RTN g128", "rtn", QuantConfig(method="rtn", experts=int4(128), attn=INT8)),
        ("int4 GPTQ g128", "gptq", QuantConfig(method="gptq", experts=int4(128), attn=INT8)),
        ("int4 GPTQ g32", "gptq", QuantConfig(method="gptq", experts=int4(32), attn=INT8)),
        ("int4 RTN g128, int4 attention", "rtn", QuantConfig(method="rtn", experts=int4(128), attn=int4(128))),
        ("int4 GPTQ g128, int4 attention", "gptq", QuantConfig(method="gptq", experts=int4(128), attn=int4(128))),
        # format_version 2 (5: symmetric over all 2**bits levels): 3- and 2-bit experts, symmetric unless
        # "asym", smaller groups as llama.cpp's low-bit types use
        ("int3 RTN g128", "rtn", QuantConfig(method="rtn", experts=ModuleQuant(3, 128, True), attn=INT8)),
        ("int3 GPTQ g128", "gptq", QuantConfig(method="gptq", experts=ModuleQuant(3, 128, True), attn=INT8)),
        ("int3 GPTQ g64", "gptq", QuantConfig(method="gptq", experts=ModuleQuant(3, 64, True), attn=INT8)),
        ("int3 GPTQ g64 asym", "gptq", QuantConfig(method="gptq", experts=ModuleQuant(3, 64, False), attn=INT8)),
        ("int2 RTN g64", "rtn", QuantConfig(method="rtn", experts=ModuleQuant(2, 64, True), attn=INT8)),
        ("int2 GPTQ g64", "gptq", QuantConfig(method="gptq", experts=ModuleQuant(2, 64, True), attn=INT8)),
        ("int2 GPTQ g64 asym", "gptq", QuantConfig(method="gptq", experts=ModuleQuant(2, 64, False), attn=INT8)),
        ("int2 GPTQ g32", "gptq", QuantConfig(method="gptq", experts=ModuleQuant(2, 32, True), attn=INT8)),
        # format_version 3: each expert's recipe (2/3 bits g64, 4 bits g128, 8 bits per channel) chosen by
        # `dbrxq quantize --target-bits B` to minimise the predicted error at an average of B bits
        ("mixed GPTQ, average 3.0 bits", "gptq", QuantConfig(method="gptq", attn=INT8), 3.0),
        ("mixed GPTQ, average 2.5 bits", "gptq", QuantConfig(method="gptq", attn=INT8), 2.5),
    ]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def quantize(src: Path, out: Path, method: str, qc: QuantConfig, samples: int, seq_len: int,
             target_bits: float | None = None) -> None:
    if method == "rtn" and target_bits is None:
        quantize_checkpoint(src, out, qc, overwrite=True, progress=False)
        return
    from calibration.options import CalibrationOptions
    from calibration.pipeline import quantize_with_calibration
    quantize_with_calibration(src, out, qc, CalibrationOptions(samples=samples, seq_len=seq_len, target_bits=target_bits),
                              overwrite=True, progress=False)


@torch.no_grad()
def nf4_experts(model: nn.Module) -> int:
    """Replace every expert matrix by its bitsandbytes NF4 round trip; returns NF4 bytes of the experts."""
    import bitsandbytes.functional as bf
    nbytes = 0
    for block in model.transformer.blocks:
        mlp = block.ffn.experts.mlp
        for name in ("w1", "v1", "w2"):
            w = getattr(mlp, name)
            q, state = bf.quantize_4bit(w.data.float(), blocksize=64, quant_type="nf4", compress_statistics=False)
            w.data.copy_(bf.dequantize_4bit(q, state).to(w.dtype))
            nbytes += q.numel() * q.element_size() + state.absmax.numel() * 4
    return nbytes


class Int8KV(nn.Module):
    """The model, reading every key and value of a window through an int8 KV cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config, self.device, self.dtype = model.config, model.device, model.dtype

    def forward(self, input_ids, **kw):
        kw.pop("use_cache", None)
        cache = make_kv_cache(self.model.config, input_ids.shape[0], input_ids.shape[1], flavour="int8",
                              dtype=self.model.dtype, device=self.model.device)
        return self.model(input_ids, past_key_values=cache, use_cache=True, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=dbrxq.default_model_dir())
    ap.add_argument("--data", type=Path, default=HELDOUT)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=None, help="evaluate on the first N tokens only")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--work", type=Path, default=None, help="folder for the quantized checkpoints")
    ap.add_argument("--only", default=None, help="comma-separated row-name prefixes to run (e.g. int3,int2)")
    args = ap.parse_args()

    print(describe_machine())
    runner = dbrxq.load(args.model, dtype="float32")
    ref = runner.model
    ids = runner.tokenizer.encode(args.data.read_text())
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    src_bytes = folder_bytes(args.model)
    print(f"{args.data.name}: {len(ids)} tokens, window {args.window}, stride {args.stride}; "
          f"model {args.model} ({src_bytes / 1e6:.2f} MB bf16)\n")

    rows = []

    def row(name, model, nbytes):
        t0 = time.perf_counter()
        r = compare(ref, model, ids, window=args.window, stride=args.stride)
        rows.append((name, r["ppl_b"], r["mean_kl"], r["top1_agreement"], nbytes))
        print(f"  {name}: ppl {r['ppl_b']:.4f}, KL {r['mean_kl']:.2e} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return r["ppl_a"]

    base_ppl = row("bf16", ref, src_bytes)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for name, method, qc, *target in recipes():
            if args.only and not any(name.startswith(p) for p in args.only.split(",")):
                continue
            out = Path(tmp) / name.replace(" ", "_").replace(",", "")
            quantize(args.model, out, method, qc, args.calib_samples, args.calib_seq_len, *target)
            row(name, load_model(out, dtype="float32"), folder_bytes(out))
    if args.only:
        return _print(rows, base_ppl)
    nf4 = load_model(args.model, dtype="float32")
    expert_float = sum(p.numel() * 2 for b in nf4.transformer.blocks for p in b.ffn.experts.parameters())
    nf4_bytes = nf4_experts(nf4)
    from quantize.modules import quantize_model_rtn
    quantize_model_rtn(nf4, QuantConfig(method="rtn", experts=ModuleQuant(None), attn=INT8))
    row("bnb NF4 (experts)", nf4, src_bytes - expert_float + nf4_bytes - _attn_savings(ref))
    row("int8 KV cache", Int8KV(load_model(args.model, dtype="float32")), src_bytes)
    _print(rows, base_ppl)


def _print(rows, base_ppl) -> None:
    print("\n| weights | perplexity | vs bf16 | mean KL (nats) | top-1 agreement | checkpoint bytes |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, ppl, kl, top1, nbytes in rows:
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / base_ppl - 1):+.2f}% | {kl:.2e} | {100 * top1:.2f}% | "
              f"{nbytes / 1e6:.2f} MB |")


def _attn_savings(model: nn.Module) -> int:
    """bf16 bytes minus int8-per-channel bytes of the attention matrices (for the NF4 row's size)."""
    saved = 0
    for b in model.transformer.blocks:
        for lin in (b.norm_attn_norm.attn.Wqkv, b.norm_attn_norm.attn.out_proj):
            n, k = lin.weight.shape
            saved += n * k * 2 - (n * k + n * 2)
    return saved


if __name__ == "__main__":
    main()
