"""dbrxq's K-quant export against llama.cpp's own quantizer, on the same float checkpoint.

For each mix (q2_k, q3_k_m, q4_k_m, q5_k_m, q6_k): `dbrxq export --type MIX` and llama.cpp's
``llama_model_quantize`` of dbrxq's F32 export (llama-cpp-python, a measuring tool, not a
dependency); then per file the tensor types that differ, the file sizes, and the relative weight
error ||W_hat - W|| / ||W|| over every quantized tensor, both dequantized by the `gguf` package's port
of llama.cpp's reference. Neither side has calibration data here: this compares the two roundings.

    python scripts/compare_kquants.py FLOAT_CHECKPOINT WORKDIR
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from pathlib import Path

import numpy as np

from dbrxq.export.gguf import export_gguf
from quantize.recipes import FILE_TYPES, RECIPES


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


def main(argv=None) -> int:
    from gguf.quants import dequantize
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a float DBRX checkpoint whose rows are whole 256-value blocks")
    p.add_argument("workdir", type=Path)
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    f32 = export_gguf(args.model, args.workdir / "f32.gguf", type_="f32", overwrite=True).path
    ref = tensors(f32)
    print("| mix | types differing | size dbrxq | size llama.cpp | rel. error dbrxq | rel. error llama.cpp |")
    print("|---|---:|---:|---:|---:|---:|")
    for recipe in RECIPES:
        ours = export_gguf(args.model, args.workdir / f"dbrxq-{recipe}.gguf", type_=recipe, overwrite=True).path
        theirs = args.workdir / f"llama-{recipe}.gguf"
        llama_quantize(f32, theirs, recipe)
        a, b = tensors(ours), tensors(theirs)
        differing = sum(1 for n in a if a[n].tensor_type != b[n].tensor_type)
        err_a = err_b = norm = 0.0
        for n, t in a.items():
            if t.tensor_type.name == "F32":
                continue
            w = np.asarray(ref[n].data, dtype=np.float32).reshape(-1)
            err_a += float(((dequantize(t.data, t.tensor_type).reshape(-1) - w) ** 2).sum())
            err_b += float(((dequantize(b[n].data, b[n].tensor_type).reshape(-1) - w) ** 2).sum())
            norm += float((w ** 2).sum())
        print(f"| {recipe} | {differing} | {ours.stat().st_size} | {theirs.stat().st_size} | "
              f"{np.sqrt(err_a / norm):.4e} | {np.sqrt(err_b / norm):.4e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
