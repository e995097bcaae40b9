#!/usr/bin/env python
"""Throughput of `dbrxq serve` with 1, 2, 4, 8, 16 concurrent streaming clients, beside the
single-client figure of the same run, and each decode step against its own read bound.

    python scripts/bench_serve.py                                  # the demo model
    python scripts/bench_serve.py --model /tmp/bs/q --max-tokens 24  # a real-width 1-layer int4 checkpoint
    (make one: python scripts/make_checkpoint.py /tmp/bs/src --preset dbrx --layers 1 --vocab-size 1024
               dbrxq quantize /tmp/bs/src /tmp/bs/q --method rtn)

A server process is started per model (`--max-batch` = the largest client count); for each count,
that many clients (threads, raw HTTP) each stream one completion of ``--max-tokens`` tokens
(``ignore_eos``, so every request has the same length) from a different prompt, all sent at once.
Reported per count:

- aggregate tok/s: completion tokens of all clients / wall time from the first request to the last
  token (prefills included); ``x1``: that over the single-client figure;
- decode tok/s: the server's own decode steps only (tokens / seconds inside decode steps);
- latency: mean time from sending a request to its last token; mean time per output token after
  the first;
- expert MB/token: expert bytes the decode steps read per generated token (the engine counts the
  distinct experts each step's router picks, per layer: each is read once for all its tokens);
- step / bound: decode seconds over (every weight byte the decode steps read / read bandwidth);
  the bytes are the union of experts each step touched plus the non-expert weights (read once
  per row where batch invariance computes them row by row), the bandwidth is measured here.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

PROMPTS = ["The function returns", "A list of", "If the file", "Return the value of the", "This module provides",
           "The default is", "Raise an exception when", "An object that", "The following example",
           "When the argument", "This method is", "Each element of", "The result of the", "In this case",
           "A new instance", "The maximum number of"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", path)
    body = json.loads(c.getresponse().read())
    c.close()
    return body


def one_client(port: int, prompt: str, max_tokens: int, out: dict) -> None:
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/completions", body=json.dumps({
        "model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "ignore_eos": True, "stream_options": {"include_usage": True}}), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    first = None
    tokens = 0
    for line in r:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        ev = json.loads(line[6:])
        if "error" in ev:
            raise RuntimeError(ev["error"]["message"])
        if ev.get("usage"):
            tokens = ev["usage"]["completion_tokens"]
        elif first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    c.close()
    out.update(start=t0, first=first or end, end=end, tokens=tokens)


def ensure_tokenizer(folder: str) -> None:
    """A checkpoint made by make_checkpoint has no tokenizer: give it the demo model's, cut to the
    checkpoint's vocabulary (the first vocab_size - 8 BPE ranks, then the 8 special tokens)."""
    from pathlib import Path

    from dbrxq.formats.hub import default_model_dir
    from dbrxq.text.tokenizer import SIDECAR_FILE, VOCAB_FILE
    d = Path(folder)
    if not d.is_dir() or any((d / n).exists() for n in (VOCAB_FILE, "tokenizer.json", "cl100k_base.tiktoken")):
        return
    vocab = json.loads((d / "config.json").read_text())["vocab_size"]
    demo = default_model_dir()
    lines = (demo / VOCAB_FILE).read_text().splitlines()[: vocab - 8]
    meta = json.loads((demo / SIDECAR_FILE).read_text())
    names = list(meta["special_tokens"])
    meta["special_tokens"] = {n: vocab - 8 + i for i, n in enumerate(names)}
    meta["eos_token_ids"] = [meta["special_tokens"]["<|endoftext|>"], meta["special_tokens"]["<|im_end|>"]]
    meta["pad_token_id"] = meta["special_tokens"]["<|pad|>"]
    meta["provenance"] = f"the dbrxq demo model's BPE, cut to {vocab} tokens by scripts/bench_serve.py"
    (d / VOCAB_FILE).write_text("\n".join(lines) + "\n")
    (d / SIDECAR_FILE).write_text(json.dumps(meta, indent=2))
    print(f"(wrote the demo tokenizer, cut to {vocab} tokens, into {d})")


def run_count(port: int, n: int, max_tokens: int) -> dict:
    before = get(port, "/health")["stats"]
    outs = [{} for _ in range(n)]
    threads = [threading.Thread(target=one_client, args=(port, PROMPTS[i % len(PROMPTS)], max_tokens, outs[i]))
               for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = get(port, "/health")["stats"]
    d = {k: after[k] - before[k] for k in ("decode_steps", "decode_tokens", "decode_s", "expert_bytes", "weight_bytes")}
    tokens = sum(o["tokens"] for o in outs)
    return {"clients": n, "tokens": tokens, "wall_s": wall, "agg_tok_s": tokens / wall,
            "decode_tok_s": d["decode_tokens"] / d["decode_s"] if d["decode_s"] else 0.0,
            "latency_s": sum(o["end"] - o["start"] for o in outs) / n,
            "tpot_ms": 1e3 * sum((o["end"] - o["first"]) / max(o["tokens"] - 1, 1) for o in outs) / n,
            "rows_per_step": d["decode_tokens"] / max(d["decode_steps"], 1),
            "expert_mb_per_tok": d["expert_bytes"] / max(d["decode_tokens"], 1) / 1e6,
            "weight_bytes": d["weight_bytes"], "decode_s": d["decode_s"]}


def bench_model(model: str, counts: list[int], max_tokens: int, threads: int | None, extra: list[str], bw: float) -> None:
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "dbrxq.cli", "serve", model, "--port", str(port), "--model-name", "bench",
           "--max-batch", str(max(counts)), "--context", "256", *extra]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                log.seek(0)
                sys.exit(f"server exited:\n{log.read()}")
            try:
                get(port, "/health")
                break
            except OSError:
                time.sleep(0.5)
        print(f"\n## {model} (loaded in {time.time() - t0:.0f} s; {max_tokens} tokens per request)\n")
        run_count(port, 1, min(4, max_tokens))  # warm-up
        rows = [run_count(port, n, max_tokens) for n in counts]
    finally:
        proc.terminate()
        proc.wait(60)
        os.unlink(log.name)
    base = rows[0]["agg_tok_s"]
    print("| clients | aggregate tok/s | x1 | decode tok/s | latency s | ms/token | rows/step "
          "| expert MB/token | step / read bound |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        bound = r["weight_bytes"] / bw
        print(f"| {r['clients']} | {r['agg_tok_s']:.1f} | {r['agg_tok_s'] / base:.2f} | {r['decode_tok_s']:.1f} "
              f"| {r['latency_s']:.2f} | {r['tpot_ms']:.1f} | {r['rows_per_step']:.1f} | {r['expert_mb_per_tok']:.2f} "
              f"| {r['decode_s'] / bound:.2f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="checkpoint(s) to serve (default: demo); repeatable")
    p.add_argument("--clients", default="1,2,4,8,16", help="comma-separated concurrent client counts")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens per request")
    p.add_argument("--threads", type=int, help="the server's CPU threads")
    p.add_argument("--no-batch-invariant", action="store_true", help="batch float layers too")
    a = p.parse_args()
    import torch

    from dbrxq.core.sysinfo import describe_machine, read_bandwidth
    counts = [int(x) for x in a.clients.split(",")]
    if counts[0] != 1:
        counts = [1] + counts  # the single-client figure of the same run
    bw = read_bandwidth(512 << 20)
    del torch
    print(describe_machine())
    print(f"read bandwidth {bw / 1e9:.1f} GB/s (this process, before the servers start)")
    extra = ["--no-batch-invariant"] if a.no_batch_invariant else []
    for model in a.model or ["demo"]:
        ensure_tokenizer(model)
        bench_model(model, counts, a.max_tokens, a.threads, extra, bw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
