"""Each engine on its own files at the same bytes: dbrxq's runtime on dbrxq checkpoints beside llama.cpp on GGUF files.

For every file: the mean KL of its next-token distribution to its engine's own float reference (dbrxq's
float checkpoint in dbrxq; the F32 GGUF export of the same checkpoint in llama.cpp), the perplexity
and the top-1 agreement, all on the same disjoint windows of 256 held-out tokens (compare_kquants.py's
windows and measures), the file's bytes, and the decode speed: tokens/s of greedy decoding after a
short prompt, best of ``--repeats``, both engines on ``--threads`` threads of the same machine, one after
the other. dbrxq reads a checkpoint folder (its safetensors files are its bytes) or a GGUF file, llama.cpp a
GGUF file (through llama-cpp-python, a measuring tool, not a dependency).

    python scripts/compare_runtimes.py FLOAT --f32-gguf F32.gguf \\
        --gguf q4_k_m+imatrix=llama-imatrix-q4_k_m.gguf --dbrxq q4_k_m-size=CHECKPOINT \\
        --kl-data calibration/data/heldout.txt --kl-tokens 8192 --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from compare_kquants import WINDOW, llama_logits, quality  # noqa: E402
from dbrxq.core.sysinfo import describe_machine  # noqa: E402
from dbrxq.core.units import format_size  # noqa: E402

PROMPT = "The function returns a list of the values in the order they were given"


def labelled(items: list[str]) -> list[tuple[str, Path]]:
    out = []
    for item in items:
        label, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"{item!r}: expected LABEL=PATH")
        out.append((label, Path(path)))
    return out


def dbrxq_logits(path: Path | str, ids: list[int]) -> np.ndarray:
    """dbrxq's float32 logits for ``ids``, window by window (each window a fresh forward, as llama_logits)."""
    import dbrxq
    model = dbrxq.load(path).model
    out = []
    with torch.inference_mode():
        for s in range(0, len(ids), WINDOW):
            out.append(model(torch.tensor([ids[s:s + WINDOW]])).logits[0].float().numpy())
    return np.concatenate(out)


def dbrxq_speed(path: Path | str, prompt: list[int], tokens: int, repeats: int, threads: int) -> float:
    import dbrxq
    r = dbrxq.load(path, threads=threads)
    best = 0.0
    for _ in range(repeats):
        st = r.generate_ids([prompt], max_new_tokens=tokens + 1, stop_tokens=[]).stats
        best = max(best, st.decode_steps / st.decode_s)
    return best


def llama_speed(path: Path, prompt: list[int], tokens: int, repeats: int, threads: int) -> float:
    import llama_cpp
    m = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + tokens + 8, n_threads=threads,
                        n_threads_batch=threads, verbose=False)
    best = 0.0
    for _ in range(repeats):
        m.reset()
        m.eval(prompt)
        tok = int(np.argmax(m.scores[m.n_tokens - 1]))
        t0 = time.perf_counter()
        for _ in range(tokens):
            m.eval([tok])
            tok = int(np.argmax(m.scores[m.n_tokens - 1]))
        best = max(best, tokens / (time.perf_counter() - t0))
    return best


def folder_bytes(path: Path) -> int:
    """A checkpoint's bytes: a GGUF file's size, or a folder's safetensors files."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="the float checkpoint (dbrxq's reference)")
    p.add_argument("--f32-gguf", type=Path, required=True, help="its F32 GGUF export (llama.cpp's reference)")
    p.add_argument("--gguf", action="append", default=[], metavar="LABEL=FILE", help="a GGUF file llama.cpp runs")
    p.add_argument("--dbrxq", action="append", default=[], metavar="LABEL=PATH",
                   help="a checkpoint dbrxq runs: a dbrxq folder, or a GGUF file (the same file may be given to --gguf)")
    p.add_argument("--kl-data", type=Path, required=True)
    p.add_argument("--kl-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64, help="decoded tokens per speed run")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from dbrxq.text.tokenizer import DbrxTokenizer
    tok = DbrxTokenizer.from_pretrained(args.model)
    ids = tok.encode(args.kl_data.read_text())[: args.kl_tokens]
    prompt = tok.encode(PROMPT)
    rows = []
    ref = dbrxq_logits(args.model, ids)
    rows.append(("dbrxq", "float (reference)", folder_bytes(Path(args.model)), (0.0, *quality(ref, ref, ids)[1:]),
                 dbrxq_speed(args.model, prompt, args.tokens, args.repeats, args.threads)))
    for label, path in labelled(args.dbrxq):
        rows.append(("dbrxq", label, folder_bytes(path), quality(ref, dbrxq_logits(path, ids), ids),
                     dbrxq_speed(path, prompt, args.tokens, args.repeats, args.threads)))
    ref = llama_logits(args.f32_gguf, ids)
    rows.append(("llama.cpp", "F32 (reference)", args.f32_gguf.stat().st_size, (0.0, *quality(ref, ref, ids)[1:]),
                 llama_speed(args.f32_gguf, prompt, args.tokens, args.repeats, args.threads)))
    for label, path in labelled(args.gguf):
        rows.append(("llama.cpp", label, path.stat().st_size, quality(ref, llama_logits(path, ids), ids),
                     llama_speed(path, prompt, args.tokens, args.repeats, args.threads)))
    print(f"# {describe_machine()}; {args.threads} threads; {len(ids)} held-out tokens of {args.kl_data.name} in "
          f"windows of {WINDOW}; decode: {args.tokens} tokens after a {len(prompt)}-token prompt, best of {args.repeats}")
    print("| engine | file | bytes | KL to its float reference | perplexity | top-1 agreement | decode tok/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for engine, label, nbytes, (kl, ppl, top1), speed in rows:
        print(f"| {engine} | {label} | {nbytes:,} ({format_size(nbytes)}) | {kl:.3e} | {ppl:.3f} | {top1:.1%} | "
              f"{speed:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
