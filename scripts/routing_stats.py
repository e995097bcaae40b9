"""Expert routing statistics of a DBRX checkpoint on held-out text, as markdown tables.

Per layer, over every token of the text (read in disjoint windows, so each token is routed once):

- load: each expert's share of the N*k routing slots; max and min share, normalised entropy
  (1 = uniform over the E experts) and coefficient of variation (std/mean of the counts);
- repeat: the fraction of token t+1's k experts that token t also used (uniform random routing
  gives k/E = 0.25 for DBRX's 4 of 16);
- LRU: the hit rate of a per-layer cache of C experts, simulated on the routing trace in token
  order (a token's k experts are requested together; hits are refreshed first so a token never
  evicts its own experts; the cold start counts as misses). Uniform routing would hit C/E.

    python scripts/routing_stats.py [MODEL] [--data calibration/data/heldout.txt] [--window 512]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import OrderedDict
from pathlib import Path

import torch

import dbrxq
from dbrxq.model.moe import route

REPO = Path(__file__).resolve().parent.parent
CACHE_SIZES = (4, 8, 12)


@torch.inference_mode()
def routing_trace(runner, ids: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Per layer, the (N, k) expert ids of every token, windows in order."""
    model, c = runner.model, runner.model.config
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(c.n_layers)]
    for begin in range(0, ids.numel(), window):
        x = ids[begin:begin + window].to(model.device)[None]  # (1, T)
        out = model(input_ids=x, use_cache=False, output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):  # (T, E)
            _, experts = route(logits, c.top_k, c.ffn_config.moe_normalize_expert_weights)
            per_layer[layer].append(experts.cpu())
    return [torch.cat(chunks) for chunks in per_layer]


def load_stats(experts: torch.Tensor, num_experts: int) -> dict:
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts).double()
    share = counts / counts.sum()
    nz = share[share > 0]
    return {"max": share.max().item(), "min": share.min().item(),
            "entropy": (-(nz * nz.log()).sum() / math.log(num_experts)).item(),
            "cv": (counts.std(unbiased=False) / counts.mean()).item()}


def repeat_fraction(experts: torch.Tensor) -> float:
    """Mean over t of |experts(t) & experts(t+1)| / k."""
    a, b = experts[:-1], experts[1:]  # (N-1, k)
    shared = (a[:, :, None] == b[:, None, :]).any(dim=1).sum(dim=1)  # (N-1,)
    return (shared.double() / experts.shape[1]).mean().item()


def lru_hit_rate(experts: torch.Tensor, capacity: int) -> float:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for row in experts.tolist():
        wanted = sorted(set(row))
        for e in wanted:
            if e in cache:
                hits += 1
                cache.move_to_end(e)
        for e in wanted:
            if e not in cache:
                cache[e] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
    return hits / experts.numel()


def table(trace: list[torch.Tensor], num_experts: int, top_k: int) -> str:
    head = ("| layer | max share | min share | entropy | CV | repeat t->t+1 | "
            + " | ".join(f"LRU C={c}" for c in CACHE_SIZES) + " |")
    rows = [head, "|" + "---:|" * (6 + len(CACHE_SIZES))]
    for layer, experts in enumerate(trace):
        s = load_stats(experts, num_experts)
        lru = [lru_hit_rate(experts, c) for c in CACHE_SIZES]
        rows.append(f"| {layer} | {s['max']:.3f} | {s['min']:.3f} | {s['entropy']:.3f} | {s['cv']:.3f} | "
                    f"{repeat_fraction(experts):.3f} | " + " | ".join(f"{h:.3f}" for h in lru) + " |")
    rows.append(f"| uniform | {1 / num_experts:.3f} | {1 / num_experts:.3f} | 1.000 | 0.000 | "
                f"{top_k / num_experts:.3f} | " + " | ".join(f"{c / num_experts:.3f}" for c in CACHE_SIZES) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="checkpoint folder (default: the embedded model)")
    ap.add_argument("--data", type=Path, default=REPO / "calibration" / "data" / "heldout.txt")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shares-json", type=Path, help="also write each layer's per-expert routing shares here "
                    "(what scripts/make_checkpoint.py --router-shares skews a random router towards)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runner = dbrxq.load(args.model, dtype="float32")
    ids = torch.tensor(runner.tokenizer.encode(args.data.read_text())[: args.max_tokens])
    c = runner.model.config
    trace = routing_trace(runner, ids, args.window)
    print(f"Routing of {ids.numel()} tokens of {args.data.name} ({c.n_layers} layers, "
          f"{c.num_experts} experts, top-{c.top_k}; shares are of the N*k routing slots)\n")
    print(table(trace, c.num_experts, c.top_k))
    if args.shares_json:
        shares = [(torch.bincount(t.reshape(-1), minlength=c.num_experts).double() / t.numel()).tolist() for t in trace]
        args.shares_json.write_text(json.dumps(shares) + "\n")


if __name__ == "__main__":
    main()
