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
the first N tokens of TEXT, in windows of 256 tokens.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

import numpy as np

from calibration.options import CalibrationOptions
from dbrxq.export.gguf import export_gguf
from dbrxq.text.tokenizer import DbrxTokenizer
from quantize.recipes import FILE_TYPES, RECIPES

WINDOW = 256


def tensors(path: Path) -> dict:
    import gguf
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def llama_quantize(src: Path, dst: Path, recipe: str) -> None:
    import gguf
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[FILE_TYPES[recipe]])
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed for {recipe}")


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


def mean_kl(ref: np.ndarray, other: np.ndarray) -> float:
    def logp(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    a, b = logp(ref.astype(np.float64)), logp(other.astype(np.float64))
    return float((np.exp(a) * (a - b)).sum(-1).mean())


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
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    f32 = export_gguf(args.model, args.workdir / "f32.gguf", type_="f32", overwrite=True).path
    ref = tensors(f32)
    ids = ref_logits = None
    if args.kl_data:
        ids = DbrxTokenizer.from_pretrained(args.model).encode(args.kl_data.read_text())[:args.kl_tokens]
        ref_logits = llama_logits(f32, ids)
    print("| mix | file | types differing from llama.cpp's | bytes | rel. weight error | KL | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for recipe in args.mixes.split(","):
        theirs = args.workdir / f"llama-{recipe}.gguf"
        t0 = time.perf_counter()
        llama_quantize(f32, theirs, recipe)
        files = [("llama.cpp", theirs, time.perf_counter() - t0)]
        t0 = time.perf_counter()
        ours = export_gguf(args.model, args.workdir / f"dbrxq-{recipe}.gguf", type_=recipe, overwrite=True).path
        files.append(("dbrxq", ours, time.perf_counter() - t0))
        if args.calibrate:
            t0 = time.perf_counter()
            opts = CalibrationOptions(samples=args.calibrate[0], seq_len=args.calibrate[1])
            cal = export_gguf(args.model, args.workdir / f"dbrxq-cal-{recipe}.gguf", type_=recipe, overwrite=True,
                              calibrate=opts).path
            files.append(("dbrxq --calibrate", cal, time.perf_counter() - t0))
        b = tensors(theirs)
        for label, path, seconds in files:
            a = tensors(path)
            differing = sum(1 for n in a if a[n].tensor_type != b[n].tensor_type)
            kl = f"{mean_kl(ref_logits, llama_logits(path, ids)):.3e}" if ids is not None else "-"
            print(f"| {recipe} | {label} | {differing} | {path.stat().st_size} | {weight_error(path, ref):.4e} | "
                  f"{kl} | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
