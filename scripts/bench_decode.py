"""Decode time per layer at real DBRX width on this machine, next to the memory-bandwidth bound.

One DBRX block (d_model 6144, 48 heads / 8 kv heads, 16 experts of 10752, top-4) with random
weights decodes one token at a time at batch 1 after a prefilled context. Each step feeds a fresh
random hidden state, so the router picks a fresh set of 4 experts, as real tokens do, and the
weights come from DRAM, not cache. The bound is the weight bytes one token must read (Wqkv,
out_proj, router and the 4 chosen experts' w1/v1/w2, plus the KV cache) divided by the read-only
bandwidth measured in the same run; the ratio time / bound says how far from the physical limit
the float path is.

    python scripts/bench_decode.py                       # bf16 and float32, real width
    python scripts/bench_decode.py --dtype bfloat16 --steps 10
    python scripts/bench_decode.py --quick               # quarter width, for a smoke run

With --quant (default on) a third row runs the layer with int4 g128 experts and int8 per-channel
attention (RTN, dbrxq's CPU kernels), whose bound counts codes + scales. llama.cpp on the same layer
(Q4_0 experts): scripts/bench_prefill.py times its prompt processing in turns with dbrxq.

Memory: the float32 block holds 13.0 GB of weights, the bf16 one 6.5 GB (one at a time; the
quantized row builds a bf16 block first, then 1.7 GB of codes).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from dbrxq.core.sysinfo import describe_machine, peak_rss_bytes, read_bandwidth
from dbrxq.model.config import DbrxConfig
from dbrxq.model.dbrx import DbrxBlock, DbrxForCausalLM, rope_cos_sin
from dbrxq.model.kv_cache import StaticKVCache

REAL = dict(d_model=6144, n_heads=48, n_layers=1, max_seq_len=32768, vocab_size=100352,
            attn_config=dict(kv_n_heads=8, clip_qkv=8, rope_theta=500000),
            ffn_config=dict(ffn_hidden_size=10752, moe_num_experts=16, moe_top_k=4))


def fill_random(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded random weights (std 0.02; LayerNorm weights 1), in place, with bounded float32
    temporaries (4096 rows at a time), whatever the model's dtype."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if isinstance(module, torch.nn.LayerNorm):
                    p.fill_(1.0)
                    continue
                for rows in torch.split(p.view(p.shape[0], -1), 4096):
                    rows.copy_(torch.randn(rows.shape, generator=g) * 0.02)
    return model


def make_block(config: DbrxConfig, dtype: torch.dtype, quant: bool, float_kernel: bool = True) -> DbrxBlock:
    """One real-width block with random weights; with ``quant``, int4 g128 experts and int8
    per-channel attention (the product's default recipe) swapped in by RTN. Float experts step through
    the C kernel the loader gives them (quantize.float_experts) unless ``float_kernel`` is off."""
    one_layer = DbrxConfig.from_dict(dict(config.to_dict(), n_layers=1, vocab_size=256))
    with torch.device("meta"):
        model = DbrxForCausalLM(one_layer)
    model = fill_random(model.to_empty(device="cpu").to(torch.bfloat16 if quant else dtype))
    if quant:
        from quantize.config import QuantConfig
        from quantize.modules import quantize_model_rtn
        quantize_model_rtn(model, QuantConfig())
        for p in model.parameters():  # what stays float (norms, router) runs in the activation dtype
            p.data = p.data.to(dtype)
    elif float_kernel:
        from quantize.float_experts import use_float_kernel
        use_float_kernel(model)
    return model.transformer.blocks[0].eval().requires_grad_(False)


def bench(config: DbrxConfig, dtype: torch.dtype, quant: bool, context: int, steps: int,
          bandwidth: float, float_kernel: bool = True) -> dict:
    block = make_block(config, dtype, quant, float_kernel)
    c = config
    cache = StaticKVCache(1, 1, context + 1, c.kv_n_heads, c.head_dim, dtype=dtype)
    cache.k[0].normal_()
    cache.v[0].normal_()
    pos = torch.tensor([[context]])
    cos, sin = rope_cos_sin(pos, c.head_dim, c.attn_config.rope_theta, dtype)
    g = torch.Generator().manual_seed(1)
    item = torch.finfo(dtype).bits // 8
    router_bytes = c.num_experts * c.d_model * item
    if quant:  # bytes of codes + fp16 scales actually read: int8 per-channel attention, int4 g128 experts
        attn_bytes = (c.qkv_out_features + c.d_model) * (c.d_model + 2) + router_bytes
        expert_bytes = 3 * c.ffn_hidden_size * c.d_model * (0.5 + 2 / 128)
    else:
        attn_bytes = (c.qkv_out_features * c.d_model + c.d_model * c.d_model) * item + router_bytes
        expert_bytes = 3 * c.ffn_hidden_size * c.d_model * item
    kv_bytes = 2 * c.kv_n_heads * c.head_dim * (context + 1) * item
    times = []
    with torch.no_grad():
        for step in range(steps + 3):
            x = torch.randn(1, 1, c.d_model, generator=g).to(dtype)
            cache.lengths[0] = context
            t0 = time.perf_counter()
            block(x, cos, sin, None, cache, context)
            if step >= 3:  # warm-up steps excluded
                times.append(time.perf_counter() - t0)
    nbytes = attn_bytes + c.top_k * expert_bytes + kv_bytes
    t = statistics.median(times)
    bound = nbytes / bandwidth
    del block, cache
    gc.collect()
    name = "int4 g128 experts + int8 attention (cpu kernels)" if quant else str(dtype).removeprefix("torch.") + (
        " (float experts' C kernel)" if float_kernel else " (torch's float path)")
    return dict(dtype=name, ms=t * 1e3, mb=nbytes / 1e6, bound_ms=bound * 1e3,
                ratio=t / bound)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["bfloat16", "float32", "both", "none"], default="both",
                    help="float variants to run ('none': only --quant)")
    ap.add_argument("--quant", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the quantized layer (int4 g128 experts, int8 attention, float32 activations)")
    ap.add_argument("--torch-float", action="store_true",
                    help="also run the float rows on torch's float expert path (without the C kernel)")
    ap.add_argument("--context", type=int, default=256, help="tokens already in the KV cache")
    ap.add_argument("--steps", type=int, default=12, help="timed decode steps (median reported)")
    ap.add_argument("--quick", action="store_true", help="quarter-width model (d_model 1536, ffn 2688)")
    args = ap.parse_args()
    d = dict(REAL)
    if args.quick:
        d.update(d_model=1536, n_heads=12, attn_config=dict(REAL["attn_config"], kv_n_heads=4),
                 ffn_config=dict(REAL["ffn_config"], ffn_hidden_size=2688))
    config = DbrxConfig.from_dict(d)
    print(describe_machine())
    bw = read_bandwidth()
    print(f"read-only bandwidth (sum over 1 GiB float32, best of 5): {bw / 1e9:.1f} GB/s")
    named = {"both": [torch.bfloat16, torch.float32], "none": []}
    dtypes = named[args.dtype] if args.dtype in named else [getattr(torch, args.dtype)]  # "none": [] (was a crash)
    runs = [(dt, False, True) for dt in dtypes] + [(dt, False, False) for dt in dtypes if args.torch_float] + (
        [(torch.float32, True, True)] if args.quant else [])
    rows = [bench(config, dt, quant, args.context, args.steps, bw, fk) for dt, quant, fk in runs]
    width = "quarter width" if args.quick else "real width"
    print(f"\nOne DBRX layer ({width}), decode batch 1, context {args.context}, median of {args.steps} steps\n")
    print("| weights | ms / token / layer | MB read / token | bound (ms) | ratio to bound |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['ms']:.1f} | {r['mb']:.0f} | {r['bound_ms']:.1f} | {r['ratio']:.2f}x |")
    print(f"\npeak RSS {peak_rss_bytes() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
