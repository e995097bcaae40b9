"""dbrxq's K-quant export against llama.cpp's own quantizer, on the same float checkpoint.

For each mix (q2_k, q3_k_m, q4_k_m, q5_k_m, q6_k): `dbrxq export --type MIX` and llama.cpp's
``llama_model_quantize`` of dbrxq's F32 export (llama-cpp-python, a measuring tool, not a
dependency); then per file the tensor types that differ, the file sizes, and the relative weight
error ||W_hat - W|| / ||W|| over every quantized tensor, both dequantized by the `gguf` package's port
of llama.cpp's reference. Neither side has calibration data here: this compares the two roundings.

    python scripts/compare_kquants.py FLOAT_CHECKPOINT WORKDIR [--mixes q2_k,q4_k_m]
        [--calibrate SAMPLES SEQ_LEN] [--kl-data TEXT --kl-tokens N]

``--calibrate`` adds dbrxq's GPTQ-solved export of each mix (on the packaged calibration text);
``--kl-data`` adds, per file, the mean KL to the F32 file's next-token distribution in llama.cpp over
the first N tokens of TEXT, in windows of 256 tokens, the perplexity of TEXT and the top-1 agreement
with the F32 file. ``--llama-bin DIR`` (llama.cpp's tools built from source: docs/benchmarks.md) adds
llama.cpp's quant of each mix made with an importance matrix that ``llama-imatrix`` computes on the
same calibration text and token count as ``--calibrate`` (SAMPLES chunks of SEQ_LEN tokens), and
``--llama-only TYPES`` llama.cpp types dbrxq does not write (e.g. iq4_xs), with and without it.
``--sized`` adds, beside each llama.cpp file made with the importance matrix, dbrxq's
``export --target-size`` of that file's size (each tensor's type allocated by dbrxq.export.fisher),
rounded to nearest and solved by GPTQ (``--calibrate``).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from calibration.options import CalibrationOptions
from calibration.tokens import DEFAULT_CALIB_FILE
from dbrxq.export.gguf import export_gguf
from dbrxq.text.tokenizer import DbrxTokenizer
from quantize.recipes import FILE_TYPES, RECIPES

WINDOW = 256


def tensors(path: Path) -> dict:
    import gguf
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def file_type(recipe: str) -> str:
    """llama.cpp's file type name (MOSTLY_Q4_K_M) of a dbrxq mix or a llama.cpp type (iq4_xs)."""
    return FILE_TYPES.get(recipe, f"MOSTLY_{recipe.upper()}")


def llama_quantize(src: Path, dst: Path, recipe: str, bin_dir: Path | None = None,
                   imatrix: Path | None = None) -> None:
    """llama.cpp's quantizer: the wheel's ``llama_model_quantize``, or with an importance matrix the built
    ``llama-quantize`` tool."""
    if imatrix is not None:
        ftype = file_type(recipe).removeprefix("MOSTLY_")
        run([bin_dir / "llama-quantize", "--imatrix", imatrix, src, dst, ftype, str(os.cpu_count() or 1)])
        return
    import gguf
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[file_type(recipe)])
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed for {recipe}")


def run(cmd: list) -> None:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({r.returncode}): {r.stderr[-2000:]}")


def llama_imatrix(bin_dir: Path, f32: Path, out: Path, samples: int, seq_len: int) -> None:
    """llama.cpp's importance matrix of ``f32`` over the calibration text dbrxq calibrates on: ``samples``
    chunks of ``seq_len`` tokens."""
    run([bin_dir / "llama-imatrix", "-m", f32, "-f", DEFAULT_CALIB_FILE, "-o", out, "-c", str(seq_len),
         "--chunks", str(samples), "-b", str(seq_len), "-t", str(os.cpu_count() or 1)])


def llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for ``ids``, window by window (each window starts a fresh context)."""
    import llama_cpp
    m = llama_cpp.Llama(model_path=str(path), n_ctx=WINDOW, n_batch=WINDOW, logits_all=True, verbose=False,
                        n_threads=os.cpu_count() or 1)
    out = []
    for s in range(0, len(ids), WINDOW):
        m.reset()
        m.eval(ids[s:s + WINDOW])
        out.append(np.array(m.scores[:len(ids[s:s + WINDOW])]))
    return np.concatenate(out)


def logp(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def mean_kl(ref: np.ndarray, other: np.ndarray) -> float:
    a, b = logp(ref), logp(other)
    return float((np.exp(a) * (a - b)).sum(-1).mean())


def quality(ref: np.ndarray, other: np.ndarray, ids: list[int]) -> tuple[float, float, float]:
    """(mean KL(ref || other), perplexity of ``ids`` under ``other``, top-1 agreement with ``ref``), over
    the positions that predict a token of the same window."""
    keep = [i for i in range(len(ids) - 1) if (i + 1) % WINDOW]  # the last position of a window predicts
    b = logp(other[keep])                                          # the next window's first token, unseen
    nll = -b[np.arange(len(keep)), [ids[i + 1] for i in keep]].mean()
    top1 = float((ref[keep].argmax(-1) == other[keep].argmax(-1)).mean())
    return mean_kl(ref[keep], other[keep]), float(np.exp(nll)), top1


def weight_error(path: Path, ref: dict) -> float:
    from gguf.quants import dequantize
    err = norm = 0.0
    for n, t in tensors(path).items():
        if t.tensor_type.name == "F32":
            continue
        w = np.asarray(ref[n].data, dtype=np.float32).reshape(-1)
        err += float(((dequantize(t.data, t.tensor_type).reshape(-1) - w) ** 2).sum())
        norm += float((w ** 2).sum())
    return float(np.sqrt(err / norm))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a float DBRX checkpoint whose rows are whole 256-value blocks")
    p.add_argument("workdir", type=Path)
    p.add_argument("--mixes", default=",".join(RECIPES), help="comma-separated mixes [default: all]")
    p.add_argument("--calibrate", nargs=2, type=int, metavar=("SAMPLES", "SEQ_LEN"))
    p.add_argument("--kl-data", type=Path, help="text for the KL in llama.cpp")
    p.add_argument("--kl-tokens", type=int, default=1024)
    p.add_argument("--llama-bin", type=Path, help="folder of llama.cpp's llama-imatrix and llama-quantize")
    p.add_argument("--llama-only", default="", help="comma-separated llama.cpp types to add (e.g. iq4_xs)")
    p.add_argument("--sized", action="store_true", help="dbrxq --target-size files of the imatrix files' sizes")
    args = p.parse_args(argv)
    if args.llama_bin and not args.calibrate:
        p.error("--llama-bin computes the importance matrix on the --calibrate SAMPLES SEQ_LEN tokens")
    if args.sized and not args.llama_bin:
        p.error("--sized matches the sizes of the --llama-bin importance-matrix files")
    args.workdir.mkdir(parents=True, exist_ok=True)
    f32 = export_gguf(args.model, args.workdir / "f32.gguf", type_="f32", overwrite=True).path
    ref = tensors(f32)
    ids = ref_logits = None
    if args.kl_data:
        ids = DbrxTokenizer.from_pretrained(args.model).encode(args.kl_data.read_text())[:args.kl_tokens]
        ref_logits = llama_logits(f32, ids)
        print(f"F32 in llama.cpp: perplexity {quality(ref_logits, ref_logits, ids)[1]:.3f} over {len(ids)} tokens")
    imatrix = None
    if args.llama_bin:
        imatrix = args.workdir / "imatrix.gguf"
        t0 = time.perf_counter()
        llama_imatrix(args.llama_bin, f32, imatrix, *args.calibrate)
        print(f"llama-imatrix: {args.calibrate[0]} chunks of {args.calibrate[1]} tokens of {DEFAULT_CALIB_FILE.name}, "
              f"{time.perf_counter() - t0:.1f} s")
    print("| mix | file | types differing from llama.cpp's | bytes | rel. weight error | KL | perplexity | top-1 "
          "| seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    only = [t for t in args.llama_only.split(",") if t]
    for recipe in args.mixes.split(",") + only:
        theirs = args.workdir / f"llama-{recipe}.gguf"
        t0 = time.perf_counter()
        llama_quantize(f32, theirs, recipe)
        files = [("llama.cpp", theirs, time.perf_counter() - t0)]
        if imatrix is not None:
            t0 = time.perf_counter()
            llama_quantize(f32, args.workdir / f"llama-imatrix-{recipe}.gguf", recipe, args.llama_bin, imatrix)
            files.append(("llama.cpp + imatrix", args.workdir / f"llama-imatrix-{recipe}.gguf",
                          time.perf_counter() - t0))
        if recipe not in only:
            t0 = time.perf_counter()
            ours = export_gguf(args.model, args.workdir / f"dbrxq-{recipe}.gguf", type_=recipe, overwrite=True).path
            files.append(("dbrxq", ours, time.perf_counter() - t0))
        opts = CalibrationOptions(samples=args.calibrate[0], seq_len=args.calibrate[1]) if args.calibrate else None
        if args.calibrate and recipe not in only:
            t0 = time.perf_counter()
            cal = export_gguf(args.model, args.workdir / f"dbrxq-cal-{recipe}.gguf", type_=recipe, overwrite=True,
                              calibrate=opts).path
            files.append(("dbrxq --calibrate", cal, time.perf_counter() - t0))
        if args.sized:
            size = (args.workdir / f"llama-imatrix-{recipe}.gguf").stat().st_size
            for label, cal in (("dbrxq --target-size", None), ("dbrxq --target-size --calibrate", opts)):
                t0 = time.perf_counter()
                path = args.workdir / f"dbrxq-sized{'-cal' if cal else ''}-{recipe}.gguf"
                export_gguf(args.model, path, overwrite=True, calibrate=cal, target_size=size)
                files.append((label, path, time.perf_counter() - t0))
        b = tensors(theirs)
        for label, path, seconds in files:
            a = tensors(path)
            differing = sum(1 for n in a if a[n].tensor_type != b[n].tensor_type)
            q = ("-", "-", "-")
            if ids is not None:
                kl, ppl, top1 = quality(ref_logits, llama_logits(path, ids), ids)
                q = (f"{kl:.3e}", f"{ppl:.3f}", f"{top1:.4f}")
            print(f"| {recipe} | {label} | {differing} | {path.stat().st_size} | {weight_error(path, ref):.4e} | "
                  f"{' | '.join(q)} | {seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
