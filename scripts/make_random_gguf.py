"""A DBRX GGUF file of llama.cpp's K-quant mix with random codes, at any width: full-size files for start-up,
memory and speed measurements without quantizing anything.

The metadata (hyperparameters, tokenizer) and the F32 tensors (norms, router) come from SRC, any DBRX GGUF of
the wanted shape (e.g. `dbrxq export` of a random real-width checkpoint, scripts/make_checkpoint.py --preset
dbrx); every other tensor gets the type ``--mix`` gives it (quantize/recipes.py: llama-quantize's choices) and
random block bytes whose fp16 super-scales are small and finite, so both engines compute finite numbers.
The file is written tensor by tensor (never held whole) to OUT.tmp, then renamed.

    python scripts/make_random_gguf.py /work/bench/q4.gguf /work/bench/q4km.gguf --mix q4_k_m
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quantize.kquants import BLOCK_BYTES  # noqa: E402
from quantize.recipes import RECIPES, fit_type, tensor_type  # noqa: E402

# where each type's fp16 d (and dmin) sit in its block
HALVES = {"Q8_0": [0], "Q6_K": [208], "Q3_K": [108], "Q2_K": [80, 82], "Q4_K": [0, 2], "Q5_K": [0, 2]}
VALUES = {"Q8_0": 32}  # values per block (K-quants: 256)


def random_blocks(rng: np.random.Generator, ggml_type: str, rows: int, k: int) -> np.ndarray:
    per, vals = BLOCK_BYTES[ggml_type], VALUES.get(ggml_type, 256)
    out = rng.integers(0, 256, size=(rows * (k // vals), per), dtype=np.uint8)
    for col in HALVES[ggml_type]:
        out[:, col:col + 2] = rng.uniform(1e-4, 3e-4, size=(out.shape[0], 1)).astype(np.float16).view(np.uint8)
    return out.reshape(rows, -1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help="a DBRX GGUF file of the wanted shape (metadata and F32 tensors)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--mix", choices=sorted(RECIPES), default="q4_k_m")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import gguf

    r = gguf.GGUFReader(str(args.src))
    n_layers = int(r.fields["dbrx.block_count"].contents())
    gqa = int(r.fields["dbrx.attention.head_count"].contents()) // int(r.fields["dbrx.attention.head_count_kv"].contents())
    w = gguf.GGUFWriter(None, "dbrx")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        if f.name == "general.file_type":
            w.add_file_type(gguf.LlamaFileType[f"MOSTLY_{args.mix.upper()}"])
            continue
        sub = f.types[-1] if f.types and f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), f.types[0], sub)
    plan = []
    for t in r.tensors:
        shape = tuple(int(n) for n in reversed([int(v) for v in t.shape]))
        if len(shape) == 1 or t.name.endswith("ffn_gate_inp.weight"):  # norms and the router stay F32
            plan.append((t, "F32", shape))
            continue
        plan.append((t, fit_type(tensor_type(args.mix, t.name, n_layers, gqa), shape[-1]), shape))
    for t, kind, shape in plan:
        if kind == "F32":
            w.add_tensor_info(t.name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
            continue
        rows = int(np.prod(shape[:-1]))
        nb = rows * (shape[-1] // VALUES.get(kind, 256)) * BLOCK_BYTES[kind]
        w.add_tensor_info(t.name, (*shape[:-1], nb // rows), np.dtype(np.uint8), nb,
                          raw_dtype=gguf.GGMLQuantizationType[kind])
    tmp = args.out.with_name(args.out.name + ".tmp")
    rng = np.random.default_rng(args.seed)
    w.write_header_to_file(path=tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    for t, kind, shape in plan:
        w.write_padding(fout, fout.tell())
        rows = int(np.prod(shape[:-1]))
        if kind == "F32":
            data = np.asarray(t.data, dtype=np.float32)
            fout.write(memoryview(np.ascontiguousarray(data)).cast("B"))
            w.write_padding(fout, data.nbytes)
            continue
        written = 0
        step = max(1, (64 << 20) // (shape[-1] // VALUES.get(kind, 256) * BLOCK_BYTES[kind]))
        for r0 in range(0, rows, step):
            blk = random_blocks(rng, kind, min(step, rows - r0), shape[-1])
            fout.write(memoryview(blk).cast("B"))
            written += blk.nbytes
        w.write_padding(fout, written)
    fout.flush()
    os.fsync(fout.fileno())
    w.close()
    os.replace(tmp, args.out)
    print(f"{args.out}: {args.out.stat().st_size:,} bytes, {args.mix} mix, {n_layers} layers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
