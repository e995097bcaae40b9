#!/usr/bin/env python
"""Bits per expert for the demo model under a size budget: the allocator on measured errors.

    python scripts/plan_bits.py                      # average 3.0 and 2.5 bits
    python scripts/plan_bits.py --avg-bits 2.75
    python scripts/plan_bits.py --eval               # + the quality of each allocation on held-out text

The float demo model runs over calibration/data/calib.txt (64 x 256 tokens); each layer's router
sends each expert its tokens. Per expert and per option (2-bit g64, 3-bit g64, 4-bit g128,
8-bit per-channel) the predicted error is the RTN output error of its three matrices on its own
tokens, tr(E H E^T) with H = X^T X summed over the routed tokens (so an expert's routing share
weighs its error; w2's X are the float intermediate activations). The option costs are the bytes
`dbrxq quantize` writes. quantize.allocate then picks one option per expert at the budget of an
average of B bits (B x 3 F D / 8 bytes plus each option's scales, i.e. the byte cost of a uniform
recipe at B bits where one exists, interpolated between 2 and 3 bits otherwise): exactly (dynamic
program) and greedily; both totals and their ratio are printed, with the bit histogram per layer.

``--eval`` then quantizes the demo model's experts with GPTQ at the widths chosen (each expert on its
own routed calibration tokens from the float model, the rare-expert rule of `dbrxq quantize`:
experts with fewer than d_model / 8 tokens calibrate on all tokens), attention int8 RTN as in the
quality table's rows (docs/benchmarks.md), and compares it with the float model on the held-out windows of
scripts/eval_quality.py; next to it, the uniform recipe of the same byte cost made the same way
(so the two differ only in the allocation). The weights are dequantized in memory: the checkpoint
format has no per-expert widths yet.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dbrxq  # noqa: E402
from dbrxq.model.moe import route  # noqa: E402
from quantize.allocate import solve_exact, solve_greedy  # noqa: E402
from quantize.primitives import quantize_tensor  # noqa: E402
from quantize.rtn import experts_to_canonical  # noqa: E402

CALIB = Path(__file__).resolve().parents[1] / "calibration" / "data" / "calib.txt"
OPTIONS = [(2, 64, False), (3, 64, False), (4, 128, True), (8, -1, True)]


def nbytes(qt) -> int:
    return sum(t.numel() * t.element_size() for t in (qt.qweight, qt.scales, qt.qzeros) if t is not None)


@torch.no_grad()
def moe_inputs(model, ids: list[int], seq: int, samples: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: the MoE input (norm_2 output) of every calibration token, and its top-k experts."""
    c = model.config
    inputs = [[] for _ in range(c.n_layers)]
    hooks = [b.ffn.register_forward_pre_hook(lambda m, a, i=i: inputs[i].append(a[0].reshape(-1, c.d_model)))
             for i, b in enumerate(model.transformer.blocks)]
    for s in range(samples):
        chunk = ids[s * seq:(s + 1) * seq]
        if len(chunk) < seq:
            break
        model(torch.tensor([chunk]), use_cache=False)
    for h in hooks:
        h.remove()
    out = []
    for i, block in enumerate(model.transformer.blocks):
        x = torch.cat(inputs[i]).float()
        out.append((x, route(block.ffn.router(x), c.top_k, c.ffn_config.moe_normalize_expert_weights)[1]))
    return out


@torch.no_grad()
def expert_errors(model, routed: list[tuple[torch.Tensor, torch.Tensor]]):
    """Per expert (layer-major): (costs per option, predicted errors per option, routed tokens)."""
    c = model.config
    costs, errors, shares = [], [], []
    for i, block in enumerate(model.transformer.blocks):
        x, top = routed[i]
        mlp = block.ffn.experts.mlp
        E = c.num_experts
        w = {k: experts_to_canonical(getattr(mlp, k).data.float(), k, E) for k in ("w1", "v1", "w2")}
        for e in range(E):
            xe = x[(top == e).any(-1)]
            shares.append(xe.shape[0])
            h1 = xe.T @ xe
            a = torch.nn.functional.silu(xe @ w["w1"][e].T) * (xe @ w["v1"][e].T)
            h2 = a.T @ a
            cost, err = [], []
            for bits, g, sym in OPTIONS:
                total_b, total_e = 0, 0.0
                for k, h in (("w1", h1), ("v1", h1), ("w2", h2)):
                    qt = quantize_tensor(w[k][e], bits, g, sym)
                    d = w[k][e] - qt.dequantize()
                    total_e += float(torch.einsum("nk,kl,nl->", d, h, d))
                    total_b += nbytes(qt)
                cost.append(total_b)
                err.append(total_e)
            costs.append(cost)
            errors.append(err)
    return costs, errors, shares


@torch.no_grad()
def gptq_model(choice: list[int], routed: list[tuple[torch.Tensor, torch.Tensor]]):
    """The float demo model with expert n quantized by GPTQ at OPTIONS[choice[n]] (dequantized in
    place), attention int8 RTN."""
    from eval_quality import INT8

    from calibration.experts import (
        ExpertPolicy,
        default_min_tokens,
        expert_strategy,
        quantize_expert,
    )
    from dbrxq.loading.loader import load_model
    from quantize.config import ModuleQuant, QuantConfig
    from quantize.modules import quantize_model_rtn
    from quantize.rtn import experts_to_hub

    model = load_model(dbrxq.default_model_dir(), dtype="float32")
    c = model.config
    policy = ExpertPolicy(min_tokens=default_min_tokens(c.d_model))
    for i, block in enumerate(model.transformer.blocks):
        x, top = routed[i]
        mlp, E = block.ffn.experts.mlp, c.num_experts
        w = {k: experts_to_canonical(getattr(mlp, k).data.float(), k, E) for k in ("w1", "v1", "w2")}
        for e in range(E):
            xe = x[(top == e).any(-1)]
            strategy = expert_strategy(xe.shape[0], policy)
            bits, g, sym = OPTIONS[choice[i * E + e]]
            q, _ = quantize_expert(w["w1"][e], w["v1"][e], w["w2"][e], x if strategy == "route-all" else xe,
                                   ModuleQuant(bits, g, sym), strategy, policy, block.ffn.experts.act)
            for k in w:
                w[k][e] = q[k].dequantize()
        for k in w:
            getattr(mlp, k).data.copy_(experts_to_hub(w[k], k))
    return quantize_model_rtn(model, QuantConfig(method="rtn", experts=ModuleQuant(None), attn=INT8))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--avg-bits", default="3.0,2.5")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval", action="store_true", help="measure each allocation's quality (see above)")
    a = ap.parse_args()
    runner = dbrxq.load(dtype="float32")
    ids = runner.tokenizer.encode(CALIB.read_text())
    t0 = time.perf_counter()
    routed = moe_inputs(runner.model, ids, a.seq_len, a.samples)
    costs, errors, shares = expert_errors(runner.model, routed)
    evals = []
    n, L = len(costs), runner.config.n_layers
    print(f"{n} experts, predicted errors in {time.perf_counter() - t0:.1f} s; option bytes per expert "
          f"{dict(zip(['2b g64a', '3b g64a', '4b g128', '8b pc'], costs[0]))}")
    uniform = {b: sum(c[j] for c in costs) for j, (b, _, _) in enumerate(OPTIONS)}
    for avg in (float(x) for x in a.avg_bits.split(",")):
        lo, hi = max(b for b in uniform if b <= avg), min(b for b in uniform if b >= avg)
        budget = uniform[lo] if lo == hi else int(uniform[lo] + (uniform[hi] - uniform[lo]) * (avg - lo) / (hi - lo))
        t0 = time.perf_counter()
        exact = solve_exact(costs, errors, budget)
        t_exact = time.perf_counter() - t0
        greedy = solve_greedy(costs, errors, budget)
        uni = [j for j, (b, _, _) in enumerate(OPTIONS) if b == lo][0]
        uni_err = sum(e[uni] for e in errors)
        print(f"\naverage {avg} bits: budget {budget} bytes; exact {exact.bytes} bytes, error {exact.error:.4g} "
              f"({t_exact * 1e3:.0f} ms); greedy {greedy.bytes} bytes, error {greedy.error:.4g} "
              f"(x{greedy.error / exact.error:.4f} of exact); uniform {lo}-bit error {uni_err:.4g}")
        for layer in range(L):
            got = exact.choice[layer * n // L:(layer + 1) * n // L]
            hist = {OPTIONS[j][0]: got.count(j) for j in range(len(OPTIONS)) if got.count(j)}
            tok = shares[layer * n // L:(layer + 1) * n // L]
            print(f"  layer {layer}: bits {hist}; the most-routed expert ({max(tok)} tokens) gets "
                  f"{OPTIONS[got[tok.index(max(tok))]][0]} bits, the least ({min(tok)}) "
                  f"{OPTIONS[got[tok.index(min(tok))]][0]}")
        if a.eval:
            evals += [(f"uniform int{lo} GPTQ g64", [uni] * n, sum(c[uni] for c in costs)),
                      (f"mixed, average {avg} bits", exact.choice, exact.bytes)]
    if evals:
        evaluate(runner.model, evals, routed)
    return 0


def evaluate(ref, rows: list[tuple[str, list[int], int]], routed) -> None:
    """Each (name, choice, expert bytes) against the float model on eval_quality.py's held-out windows."""
    from eval_quality import HELDOUT

    from dbrxq.runtime.evaluate import compare

    ids = dbrxq.load(dtype="float32").tokenizer.encode(HELDOUT.read_text())
    base = None
    print("\n| experts | expert bytes | perplexity | vs bf16 | mean KL (nats) | top-1 agreement |")
    print("|---|---:|---:|---:|---:|---:|")
    seen = set()
    for name, choice, nbytes in rows:
        if name in seen:
            continue
        seen.add(name)
        r = compare(ref, gptq_model(choice, routed), ids, window=512, stride=256)
        base = r["ppl_a"]
        print(f"| {name} | {nbytes / 1e6:.3f} MB | {r['ppl_b']:.3f} | {r['ppl_b'] / base - 1:+.2%} | "
              f"{r['mean_kl']:.2e} | {r['top1_agreement']:.2%} |", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
