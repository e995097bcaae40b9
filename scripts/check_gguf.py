"""dbrxq export checked in llama.cpp: same logits as dbrxq, and GPTQ in Q4_0 against llama.cpp's own Q4_0 / Q4_K_M.

    python scripts/check_gguf.py                      # demo model, 16k held-out tokens, + the real-width layer
    python scripts/check_gguf.py --max-tokens 4000 --no-real-width   # quicker

Needs llama-cpp-python (a wheel for these machines is in the project's shared folder:
`pip install <shared>/wheels/llama_cpp_python-*.whl`); it is a measuring tool, not a dependency.

Part 1, the demo model (trained; its routing and weights are real): the float model runs in dbrxq
(float32) as the reference. Each dbrxq checkpoint (RTN and GPTQ int4 g32 everywhere, i.e. Q4_0
throughout; RTN and GPTQ int4 g128 experts with int8 attention, dbrxq's default; int8) is exported with `dbrxq export` and run by llama.cpp on the same sliding
windows of held-out text (calibration/data/heldout.txt, never used for training or calibration);
each row reports perplexity, mean KL(float || row) per token and top-1 agreement with the float
model, and, for the exports, KL(dbrxq || llama.cpp) between the two engines on the same file's
weights (they differ only in how activations are rounded: llama.cpp rounds them to Q8_0 blocks of
32 for Q4_0/Q8_0 weights, dbrxq's CPU kernel to int8 per 128 (int4) or 32 (int8) values, and
llama.cpp rounds to BF16 for BF16 weights: expect a few 1e-4 per token, an order of magnitude
below what quantizing the weights costs). llama.cpp's own quantizer (through the
same wheel) makes Q4_0 and Q4_K_M from the float export, with the embedding and output head kept
BF16 as in every dbrxq export, so "dbrxq int4 GPTQ g32, attn int4 g32" and "llama.cpp Q4_0" have
the same tensor types and the same file size.

`--dbrx-sizes` only prints the GGUF file size of real DBRX (config of scripts/make_checkpoint.py's
"dbrx" preset: 40 layers, 16 experts of 10752, vocab 100352) per recipe, from the tensor shapes and
GGML's block sizes, embedding and output head BF16, norms and router F32.

Part 2, a real-width one-layer checkpoint (d_model 6144, 16 experts of 10752, random weights,
scripts/make_checkpoint.py's "dbrx" preset, 6.6 GB bf16): RTN int4 g128 and int8 exports load in
llama.cpp and agree with dbrxq on 512 random tokens (random weights: only agreement is meaningful,
and with a random router a few tokens whose top-4 experts flip under any rounding dominate the mean
KL, so the median is printed too); both
engines are also compared with "exact": the same dequantized weights with float32 activations
(dbrxq's torch backend), which shows how much of their difference each one's activation rounding makes.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import dbrxq
from dbrxq.core.sysinfo import describe_machine, peak_rss_bytes
from dbrxq.export.gguf import export_gguf
from dbrxq.loading.loader import load_model
from dbrxq.runtime.evaluate import windows
from quantize.config import ModuleQuant, QuantConfig
from quantize.writer import quantize_checkpoint

REPO = Path(__file__).resolve().parent.parent
HELDOUT = REPO / "calibration" / "data" / "heldout.txt"
INT8 = ModuleQuant(8, -1, True)
INT4 = ModuleQuant(4, 128, True)
G32 = ModuleQuant(4, 32, True)
RECIPES = [  # (row name, method, recipe)
    # every matrix int4 g32 -> Q4_0 throughout: the same tensor types and bytes as llama.cpp's Q4_0
    ("int4 RTN g32, attn int4 g32", "rtn", QuantConfig(method="rtn", experts=G32, attn=G32)),
    ("int4 GPTQ g32, attn int4 g32", "gptq", QuantConfig(method="gptq", experts=G32, attn=G32)),
    # dbrxq's default recipe: experts Q4_0 (one g128 scale repeated over 4 blocks), attention Q8_0
    ("int4 RTN g128, attn int8", "rtn", QuantConfig(method="rtn", experts=INT4, attn=INT8)),
    ("int4 GPTQ g128, attn int8", "gptq", QuantConfig(method="gptq", experts=INT4, attn=INT8)),
    ("int8 RTN", "rtn", QuantConfig(method="rtn", experts=INT8, attn=INT8)),
]


class Llama:
    """llama.cpp on a GGUF file, logits for every position of a window."""

    def __init__(self, path: Path, n_ctx: int, threads: int) -> None:
        import llama_cpp
        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, logits_all=True, verbose=False)

    def logits(self, ids: list[int]) -> torch.Tensor:
        self.llm.reset()
        if hasattr(self.llm._ctx, "memory_clear"):
            self.llm._ctx.memory_clear(True)
        self.llm.eval(ids)
        return torch.from_numpy(np.array(self.llm.scores[:len(ids)], dtype=np.float32))

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)


def llama_quantize(src: Path, dst: Path, ftype: str, threads: int) -> None:
    """llama.cpp's own quantizer (llama_model_quantize), embedding and output head kept BF16."""
    import gguf
    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    p.nthread = threads
    p.output_tensor_type = int(gguf.GGMLQuantizationType.BF16)
    p.token_embedding_type = int(gguf.GGMLQuantizationType.BF16)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    assert rc == 0, f"llama_model_quantize returned {rc}"


def dbrxq_logits(model):
    @torch.inference_mode()
    def run(ids: list[int]) -> torch.Tensor:
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
    return run


class Scores:
    """Accumulates perplexity, KL to the reference and top-1 agreement over windows."""

    def __init__(self) -> None:
        self.nll = self.kl = self.agree = self.n = 0.0

    def add(self, logp: torch.Tensor, targets: torch.Tensor, ref: torch.Tensor | None) -> None:
        self.nll += float(-logp.gather(1, targets[:, None]).sum())
        if ref is not None:
            self.kl += float((ref.exp() * (ref - logp)).sum())
            self.agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
        self.n += len(targets)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.n)


def demo_part(args, work: Path) -> list[str]:
    runner = dbrxq.load(None, dtype="float32")
    tok, ref_model = runner.tokenizer, runner.model
    ids = tok.encode(HELDOUT.read_text())[: args.max_tokens]
    spans = list(windows(len(ids), args.window, args.stride))
    t = torch.tensor(ids)
    print(f"{HELDOUT.name}: {len(ids)} tokens, {len(spans)} windows of {args.window} (stride {args.stride})", flush=True)

    # the reference: float32 dbrxq log-probs of every scored position, kept for every row
    ref_fn = dbrxq_logits(ref_model)
    ref = [torch.log_softmax(ref_fn(ids[b:e])[f - b:], -1) for b, e, f in spans]
    targets = [t[f + 1:e + 1] for b, e, f in spans]

    def score(fn, against=None) -> tuple[Scores, Scores | None]:
        s, pair = Scores(), (Scores() if against is not None else None)
        for i, (b, e, f) in enumerate(spans):
            lp = torch.log_softmax(fn(ids[b:e])[f - b:], -1)
            s.add(lp, targets[i], ref[i])
            if against is not None:
                pair.add(lp, targets[i], against[i])
        return s, pair

    def logprobs(fn) -> list[torch.Tensor]:
        return [torch.log_softmax(fn(ids[b:e])[f - b:], -1) for b, e, f in spans]

    rows = []  # (name, engine, Scores, bytes, pair Scores | None)
    base = Scores()
    for i in range(len(spans)):
        base.add(ref[i], targets[i], ref[i])
    rows.append(("float (bf16 weights)", "dbrxq, float32", base, None, None))

    f32 = work / "float-f32.gguf"
    export_gguf("demo", f32, type_="f32", overwrite=True)
    llm = Llama(f32, args.window, args.threads)
    assert llm.tokenize(HELDOUT.read_text()[:20000]) == tok.encode(HELDOUT.read_text()[:20000]), "tokenizers differ"
    s, _ = score(llm.logits)
    rows.append(("float, exported F32", "llama.cpp", s, f32.stat().st_size, None))
    del llm
    for ftype in ("Q4_0", "Q4_K_M"):
        path = work / f"llama-{ftype}.gguf"
        llama_quantize(f32, path, ftype, args.threads)
        llm = Llama(path, args.window, args.threads)
        s, _ = score(llm.logits)
        rows.append((f"llama.cpp's own {ftype} (from the F32 export)", "llama.cpp", s, path.stat().st_size, None))
        print(f"  llama.cpp {ftype}: ppl {s.ppl:.4f} KL {s.kl / s.n:.2e}", flush=True)
        del llm

    for name, method, qc in RECIPES:
        folder = work / ("q-" + "".join(c if c.isalnum() else "_" for c in name))
        t0 = time.perf_counter()
        if method == "rtn":
            quantize_checkpoint(dbrxq.default_model_dir(), folder, qc, overwrite=True, progress=False)
        else:
            from calibration.options import CalibrationOptions
            from calibration.pipeline import quantize_with_calibration
            quantize_with_calibration(dbrxq.default_model_dir(), folder, qc,
                                      CalibrationOptions(samples=args.calib_samples, seq_len=args.calib_seq_len),
                                      overwrite=True, progress=False)
        ours = dbrxq_logits(load_model(folder, dtype="float32"))
        ours_lp = logprobs(ours)
        s_ours = Scores()
        for i in range(len(spans)):
            s_ours.add(ours_lp[i], targets[i], ref[i])
        path = work / (folder.name + ".gguf")
        export_gguf(folder, path, overwrite=True)
        llm = Llama(path, args.window, args.threads)
        s, pair = score(llm.logits, against=ours_lp)
        rows.append((f"dbrxq {name}", "dbrxq", s_ours, None, None))
        rows.append((f"dbrxq {name} -> GGUF", "llama.cpp", s, path.stat().st_size, pair))
        print(f"  {name}: dbrxq ppl {s_ours.ppl:.4f} KL {s_ours.kl / s_ours.n:.2e}; llama.cpp ppl {s.ppl:.4f} "
              f"KL {s.kl / s.n:.2e}; dbrxq vs llama.cpp KL {pair.kl / pair.n:.2e} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        del llm

    lines = ["| weights | engine | perplexity | vs float | mean KL to float (nats) | top-1 = float | GGUF bytes "
             "| KL dbrxq vs llama.cpp (same file) | top-1 dbrxq = llama.cpp |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, engine, s, nbytes, pair in rows:
        size = f"{nbytes / 1e6:.2f} MB" if nbytes else "-"
        pr = f"{pair.kl / pair.n:.1e} | {100 * pair.agree / pair.n:.2f}%" if pair else "- | -"
        lines.append(f"| {name} | {engine} | {s.ppl:.3f} | {100 * (s.ppl / base.ppl - 1):+.2f}% | "
                     f"{s.kl / s.n:.2e} | {100 * s.agree / s.n:.2f}% | {size} | {pr} |")
    return lines


def real_width_part(args, work: Path) -> list[str]:
    from dbrxq.formats.random import make_random_checkpoint, preset_config
    src = work / "real-width-1-layer"
    cfg = preset_config("dbrx", n_layers=1, vocab_size=1536, max_seq_len=4096)
    t0 = time.perf_counter()
    make_random_checkpoint(src, cfg, tokenizer_dir=dbrxq.default_model_dir(), progress=False)
    print(f"real-width one-layer checkpoint made ({time.perf_counter() - t0:.0f} s)", flush=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1500, (args.real_width_tokens,), generator=g).tolist()
    lines = ["| real-width layer, recipe | GGUF file type | GGUF bytes | export time | KL exact vs dbrxq | "
             "KL exact vs llama.cpp | KL dbrxq vs llama.cpp | top-1 dbrxq = llama.cpp |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, qc in (("int4 RTN g128 (attn int8)", QuantConfig(experts=INT4, attn=INT8)),
                     ("int8 RTN", QuantConfig(experts=INT8, attn=INT8))):
        folder = work / "rw-q"
        quantize_checkpoint(src, folder, qc, overwrite=True, progress=False)
        path = work / "rw.gguf"
        t0 = time.perf_counter()
        res = export_gguf(folder, path, overwrite=True)
        dt = time.perf_counter() - t0
        # "exact": the same dequantized weights with float32 activations (dbrxq's torch backend)
        logp = {}
        for engine, backend in (("exact", "torch"), ("dbrxq", None)):
            model = load_model(folder, dtype="float32", backend=backend)
            logp[engine] = torch.log_softmax(dbrxq_logits(model)(ids), -1)
            del model
        logp["llama.cpp"] = torch.log_softmax(Llama(path, len(ids), args.threads).logits(ids), -1)

        def kl(a, b):  # mean (median) over tokens: a few routing flips dominate the mean
            v = (logp[a].exp() * (logp[a] - logp[b])).sum(-1)
            return f"{float(v.mean()):.1e} ({float(v.median()):.0e})"
        agree = float((logp["dbrxq"].argmax(-1) == logp["llama.cpp"].argmax(-1)).float().mean())
        lines.append(f"| {name} | {res.file_type} | {res.nbytes / 1e9:.2f} GB | {dt:.0f} s | "
                     f"{kl('exact', 'dbrxq')} | {kl('exact', 'llama.cpp')} | "
                     f"{kl('dbrxq', 'llama.cpp')} | {100 * agree:.1f}% |")
        print(lines[-1], flush=True)
        path.unlink()
    return lines


def dbrx_sizes() -> list[str]:
    """GGUF bytes of real DBRX per recipe (the table in docs/gguf.md), from shapes and block sizes."""
    from dbrxq.formats.checkpoint import hub_tensor_shapes
    from dbrxq.formats.random import preset_config
    from quantize.ggml import row_bytes
    cfg = preset_config("dbrx")
    recipes = [("int4 g32 experts and attention (GPTQ or RTN)", "Q4_0", "Q4_0"),
               ("int4 g128 experts, int8 attention (dbrxq's default)", "Q4_0", "Q8_0"),
               ("int4 asymmetric experts, int8 attention", "Q4_1", "Q8_0"),
               ("int8 experts and attention", "Q8_0", "Q8_0"), ("float", "BF16", "BF16")]
    lines = ["| recipe | GGUF types | file size |", "|---|---|---:|"]
    for name, experts, attn in recipes:
        total = 0
        for t, shape in hub_tensor_shapes(cfg).items():
            kind = ("F32" if len(shape) == 1 or t.endswith("router.layer.weight") else
                    experts if ".experts." in t else attn if ".attn." in t else "BF16")
            total += shape[0] * row_bytes(kind, shape[1]) if len(shape) == 2 else row_bytes(kind, shape[0])
        lines.append(f"| {name} | {' + '.join(dict.fromkeys((experts, attn)))} | {total / 1e9:.1f} GB |")
    from dbrxq.formats.shards import tensor_nbytes
    from quantize.specs import quantized_tensor_specs
    own = sum(tensor_nbytes(shape, dt) for _, shape, dt in quantized_tensor_specs(cfg, QuantConfig()))
    lines.append(f"\n(dbrxq's own folder with its default recipe, int4 g128 experts + int8 attention: {own / 1e9:.1f} GB)")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=16000)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-real-width", action="store_true", help="skip part 2 (needs ~10 GB of disk)")
    ap.add_argument("--only-real-width", action="store_true", help="part 2 only")
    ap.add_argument("--real-width-tokens", type=int, default=512)
    ap.add_argument("--work", type=Path, default=None, help="folder for the checkpoints and GGUF files")
    ap.add_argument("--dbrx-sizes", action="store_true", help="only print real DBRX's GGUF size per recipe")
    args = ap.parse_args()
    if args.dbrx_sizes:
        print("\n".join(dbrx_sizes()))
        return
    torch.set_num_threads(args.threads)
    import llama_cpp
    print(describe_machine())
    print(f"llama-cpp-python {llama_cpp.__version__}, torch {torch.__version__}, {args.threads} threads\n")
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        if not args.only_real_width:
            lines = demo_part(args, Path(tmp))
            print("\n" + "\n".join(lines), flush=True)
        if not args.no_real_width:
            rw = real_width_part(args, Path(tmp))
            print("\n" + "\n".join(rw))
    print(f"\npeak RSS {peak_rss_bytes() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
