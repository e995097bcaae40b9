"""Prompt processing (prefill) of one real-width DBRX layer: dbrxq beside llama.cpp, same weights, one run.

    python scripts/bench_prefill.py                          # int4 g128 and int8 experts, 32..2048 tokens, 1 and 2 threads
    python scripts/bench_prefill.py --recipes int4 --tokens 512 --threads 1
    python scripts/bench_prefill.py --quick                  # quarter width, for a smoke run

The layer: d_model 6144, 48 heads / 8 kv heads, 16 experts of 10752, top-4, random weights
(std 0.02), a 512-token vocabulary so the embedding and output head stay negligible. dbrxq's
recipe is RTN with int8 per-channel attention and int4 g128 (or int8 per-channel) experts. The
SAME codes and scales are written to a GGUF file that llama.cpp's DBRX loader reads: int4
symmetric codes are Q4_0 exactly (w = (q - 8) * d, one fp16 d per 32 values: a g128 scale
repeated over its four blocks), int8 symmetric codes are Q8_0 exactly (w = (q - 128) * d). So
both engines multiply by identical weights and differ only in how they round activations
(dbrxq: int8 per 128 values for int4 weights, per 32 for int8; llama.cpp: Q8_0, per 32).

llama.cpp is run with logits_all=True, and this matters: with logits for the last token only,
llama.cpp's graph drops every other token right before the LAST layer's feed-forward network
(it keeps only the rows whose outputs are needed), so a one-layer model then skips the experts for
all but one prompt token and looks ~7x faster than any full layer could be (measured at quarter
width, one thread, 512 tokens: 0.17 s with one layer and last-token logits; 1.22 s with
logits_all; 2 layers with last-token logits minus 1 layer: 1.21 s, i.e. the same full layer). With
logits_all both engines compute every token through the whole layer; llama.cpp's extra work is the
output head on every token (512 x 6144 multiply-adds per token, 0.4% of the layer). Reproduce the
check: `python scripts/bench_prefill.py --quick --last-layer-check`.

For each prompt length and thread count the two engines take turns (--turns, median reported),
each processing a fresh random prompt from an empty cache; tokens/s = prompt tokens / time.
--paths times dbrxq on several of its kernel paths (e.g. avx2 avx512) in the same turns.
"GOPS" counts 2 x the multiply-adds of the layer's matmuls (attention projections, the 4 routed
experts per token; not the attention scores), the same work for both. The last-token logits of
the two engines are compared once per recipe (relative L2 difference) as a check that the GGUF
file holds the same model. llama.cpp comes from llama-cpp-python (a wheel for these machines is
in the project's shared folder) and the file is written with the `gguf` package (llama.cpp's own
Python GGUF library, `pip install gguf`); without them only dbrxq runs. Neither is a dependency
of dbrxq. llama.cpp is built for AVX2 (no
AVX-512/AMX paths), whatever the CPU; dbrxq picks its kernel path at run time (printed).

Memory: the float block is built in bf16 (6.5 GB) and quantized in place; then dbrxq holds
~1.7 GB (int4) or ~3.3 GB (int8) of codes and llama.cpp maps its file (same size, written to
--tmp). Peak RSS is printed at the end.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import fill_random  # noqa: E402

from dbrxq.core.sysinfo import describe_machine, peak_rss_bytes  # noqa: E402
from dbrxq.export.gguf_meta import add_hparams  # noqa: E402
from dbrxq.model.config import DbrxConfig  # noqa: E402
from dbrxq.model.dbrx import DbrxForCausalLM  # noqa: E402
from dbrxq.runtime.generate import prefill  # noqa: E402
from dbrxq.text.tokenizer import bytes_to_unicode  # noqa: E402
from quantize import cext, ggml  # noqa: E402
from quantize.config import ModuleQuant, QuantConfig  # noqa: E402
from quantize.modules import quantize_model_rtn  # noqa: E402

VOCAB = 512
REAL = dict(d_model=6144, n_heads=48, n_layers=1, max_seq_len=4096, vocab_size=VOCAB,
            attn_config=dict(kv_n_heads=8, clip_qkv=8, rope_theta=500000),
            ffn_config=dict(ffn_hidden_size=10752, moe_num_experts=16, moe_top_k=4))
RECIPES = {"int4": ModuleQuant(bits=4, group_size=128, symmetric=True),
           "int8": ModuleQuant(bits=8, group_size=-1, symmetric=True)}


def make_model(config: DbrxConfig, recipe: str) -> DbrxForCausalLM:
    with torch.device("meta"):
        model = DbrxForCausalLM(config)
    model = fill_random(model.to_empty(device="cpu").to(torch.bfloat16))
    quantize_model_rtn(model, QuantConfig(experts=RECIPES[recipe]))
    for p in model.parameters():
        p.data = p.data.float()
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- GGUF for llama.cpp

def write_gguf(model: DbrxForCausalLM, path: Path) -> None:
    """The quantized one-layer model as GGUF (llama.cpp's DBRX tensor names and metadata)."""
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "dbrx")
    add_hparams(w, c)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("dbrx")
    byte_tokens = [bytes_to_unicode()[b] for b in range(256)]  # 256 byte tokens, one merge (llama.cpp wants merges), then specials
    toks = byte_tokens + ["\u0120t"] + [f"<|extra_{i}|>" for i in range(VOCAB - 257)]
    w.add_token_list(toks)
    w.add_token_types([1] * 257 + [3] * (VOCAB - 257))
    w.add_token_merges(["\u0120 t"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if model.config.n_layers and
                    model.transformer.blocks[0].ffn.experts.mlp.w1.quantized().bits == 4 else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_bos_token_id(VOCAB - 1)
    w.add_eos_token_id(VOCAB - 1)

    def q(name, qt):
        kind, data = ggml.from_codes(qt)  # int4 sym -> Q4_0, int8 sym -> Q8_0, bit-exact
        w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[kind])

    t = model.transformer
    w.add_tensor("token_embd.weight", t.wte.weight.numpy().astype(np.float32))
    for i, blk in enumerate(t.blocks):
        nan = blk.norm_attn_norm
        w.add_tensor(f"blk.{i}.attn_norm.weight", nan.norm_1.weight.numpy().astype(np.float32))
        q(f"blk.{i}.attn_qkv.weight", nan.attn.Wqkv.quantized())
        q(f"blk.{i}.attn_output.weight", nan.attn.out_proj.quantized())
        w.add_tensor(f"blk.{i}.attn_output_norm.weight", nan.norm_2.weight.numpy().astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", blk.ffn.router.layer.weight.numpy().astype(np.float32))
        mlp = blk.ffn.experts.mlp
        q(f"blk.{i}.ffn_gate_exps.weight", mlp.w1.quantized())
        q(f"blk.{i}.ffn_up_exps.weight", mlp.v1.quantized())
        q(f"blk.{i}.ffn_down_exps.weight", mlp.w2.quantized())
    w.add_tensor("output_norm.weight", t.norm_f.weight.numpy().astype(np.float32))
    head = model.lm_head.weight if model.lm_head is not None else t.wte.weight
    w.add_tensor("output.weight", head.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ----------------------------------------------------------------------------- timing

def layer_macs(c: DbrxConfig) -> int:
    """Multiply-adds per token of the layer's matmuls: Wqkv, out_proj, router, top-k experts."""
    return (c.d_model * (c.qkv_out_features + c.d_model + c.num_experts)
            + c.top_k * 3 * c.d_model * c.ffn_hidden_size)


def set_kernel_path(model, path: str) -> None:
    """Point every cpu_q4/cpu_q8 weight of the model at one SIMD path (the repacked bytes are the
    same for all paths, and so are the results: docs/kernels.md)."""
    from quantize.kernels import CpuQWeight

    seen = set()

    def visit(obj):
        if isinstance(obj, CpuQWeight):
            obj.path = path
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                visit(o)

    for m in model.modules():
        for v in vars(m).values():
            if id(v) not in seen:
                seen.add(id(v))
                visit(v)


def time_dbrxq(model, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    cache = model.new_cache(1, ids.shape[1])
    t0 = time.perf_counter()
    logits = prefill(model, ids, torch.ones_like(ids), cache, chunk_size=512)
    return time.perf_counter() - t0, logits[0]


def time_llama(llm, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    import llama_cpp

    llm.reset()
    llm._ctx.memory_clear(True) if hasattr(llm._ctx, "memory_clear") else None
    t0 = time.perf_counter()
    llm.eval(ids[0].tolist())
    dt = time.perf_counter() - t0
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return dt, torch.tensor(np.ctypeslib.as_array(ptr, shape=(VOCAB,)).copy())


def last_layer_check(d: dict, tokens: int = 512, tmp: str | None = None) -> None:
    """Why llama.cpp must run with logits_all here: time it on 1 and 2 layers, with last-token logits
    and with logits_all, one thread, one turn each after a warm-up. If the last layer's experts were
    computed for every token, 1 layer with last-token logits would cost about half of 2 layers."""
    import llama_cpp

    torch.set_num_threads(1)
    times = {}
    with tempfile.TemporaryDirectory(dir=tmp) as folder:
        for n_layers in (1, 2):
            cfg = DbrxConfig.from_dict(dict(d, n_layers=n_layers, max_seq_len=max(4096, tokens + 16)))
            model = make_model(cfg, "int4")
            path = Path(folder) / f"check-{n_layers}.gguf"
            write_gguf(model, path)
            del model
            gc.collect()
            for logits_all in (False, True):
                llm = llama_cpp.Llama(str(path), n_ctx=tokens + 16, n_batch=512, n_ubatch=512, n_threads=1,
                                      n_threads_batch=1, logits_all=logits_all, verbose=False)
                ids = list(range(min(tokens, 256))) * (tokens // 256 + 1)
                for turn in range(2):
                    llm.reset()
                    t0 = time.perf_counter()
                    llm.eval(ids[:tokens])
                    times[(n_layers, logits_all)] = time.perf_counter() - t0
                del llm
    for (n, la), t in sorted(times.items()):
        print(f"llama.cpp, {n} layer(s), {'logits_all' if la else 'last-token logits'}: {t:.2f} s for {tokens} tokens")
    print(f"2 layers - 1 layer, last-token logits: {times[(2, False)] - times[(1, False)]:.2f} s "
          f"(one full layer); 1 layer with logits_all: {times[(1, True)]:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["int4", "int8"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[32, 128, 512, 2048])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--turns", type=int, default=3, help="alternating turns per cell (median reported)")
    ap.add_argument("--quick", action="store_true", help="quarter-width layer (d_model 1536, ffn 2688)")
    ap.add_argument("--no-llama", action="store_true", help="dbrxq only")
    ap.add_argument("--tmp", default=None, help="folder for the GGUF file (default: a temp folder)")
    ap.add_argument("--last-layer-check", action="store_true",
                    help="only time llama.cpp on 1 and 2 layers with and without logits_all (see above)")
    ap.add_argument("--paths", nargs="+", default=None,
                    help="dbrxq kernel paths to time, each in every turn (default: the one this CPU picks)")
    args = ap.parse_args()
    d = dict(REAL)
    if args.quick:
        d.update(d_model=1536, n_heads=12, attn_config=dict(REAL["attn_config"], kv_n_heads=4),
                 ffn_config=dict(REAL["ffn_config"], ffn_hidden_size=2688))
    if args.last_layer_check:
        print(describe_machine())
        last_layer_check(d, tmp=args.tmp)
        return
    config = DbrxConfig.from_dict(dict(d, max_seq_len=max(4096, max(args.tokens) + 16)))
    llama_cpp = None
    if not args.no_llama:
        try:
            import gguf  # noqa: F401  (writes the GGUF file)
            import llama_cpp  # noqa: F401
        except ImportError as e:
            llama_cpp = None
            print(f"{e.name} is not installed (pip install gguf and the llama-cpp-python wheel): dbrxq only")
    print(describe_machine())
    print(f"dbrxq C kernel path: {cext.cpu_path() if cext.load() else cext.unavailable_reason()}")
    macs = layer_macs(config)
    paths = args.paths or [cext.cpu_path()]
    rows = []
    for recipe in args.recipes:
        model = make_model(config, recipe)
        gc.collect()
        llm = None
        tmpdir = tempfile.TemporaryDirectory(dir=args.tmp)
        if llama_cpp is not None:
            path = Path(tmpdir.name) / f"layer-{recipe}.gguf"
            write_gguf(model, path)
            print(f"{recipe}: wrote {path.stat().st_size / 1e9:.2f} GB GGUF")
        for th in args.threads:
            torch.set_num_threads(th)
            if llama_cpp is not None:
                del llm
                gc.collect()
                llm = llama_cpp.Llama(str(path), n_ctx=max(args.tokens) + 16, n_batch=512, n_ubatch=512,
                                      n_threads=th, n_threads_batch=th, logits_all=True,
                                      verbose=bool(os.environ.get("LLAMA_VERBOSE")))
            for T in args.tokens:
                g = torch.Generator().manual_seed(T)
                ours, theirs, diff = {p: [] for p in paths}, [], None
                for turn in range(args.turns + 1):  # turn 0 warms both up
                    ids = torch.randint(0, 256, (1, T), generator=g)
                    for p in paths:
                        set_kernel_path(model, p)
                        t_ours, lo = time_dbrxq(model, ids)
                        if turn:
                            ours[p].append(t_ours)
                    if llm is not None:
                        t_theirs, lt = time_llama(llm, ids)
                        if turn == 0:
                            diff = float((lo - lt).norm() / lt.norm())
                        if turn:
                            theirs.append(t_theirs)
                for p in paths:
                    to = statistics.median(ours[p])
                    row = dict(recipe=recipe, path=p, threads=th, tokens=T, ours=T / to, gops=2 * macs * T / to / 1e9)
                    if theirs:
                        tt = statistics.median(theirs)
                        row.update(theirs=T / tt, their_gops=2 * macs * T / tt / 1e9, ratio=tt / to, diff=diff)
                    rows.append(row)
                    print(row, flush=True)
        del model, llm
        gc.collect()
        tmpdir.cleanup()
    width = "quarter width" if args.quick else "real width"
    print(f"\nOne DBRX layer ({width}), prompt processing, median of {args.turns} alternating turns\n")
    print("| experts | dbrxq path | threads | prompt tokens | dbrxq tok/s | dbrxq GOPS | llama.cpp tok/s | llama.cpp GOPS "
          "| dbrxq / llama.cpp | logits rel. diff |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        name = "int4 g128 (Q4_0)" if r["recipe"] == "int4" else "int8 per-channel (Q8_0)"
        their = (f"{r['theirs']:.1f} | {r['their_gops']:.0f} | {r['ratio']:.2f}x | {r['diff']:.1e}"
                 if "theirs" in r else "- | - | - | -")
        print(f"| {name} | {r['path']} | {r['threads']} | {r['tokens']} | {r['ours']:.1f} | {r['gops']:.0f} | {their} |")
    print(f"\npeak RSS {peak_rss_bytes() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
