"""Which experts to keep resident: hit rates of eviction policies on the demo model's real routing.

    python scripts/bench_placement.py                   # held-out text, 4 / 8 / 12 of 16 experts resident
    python scripts/bench_placement.py --max-tokens 4000

The trained demo model routes unevenly (random weights would not), so this is where placement
policies can be told apart. The model runs over held-out text (calibration/data/heldout.txt, never
trained or calibrated on) in windows of 512 tokens; every layer's top-4 choices are recorded per
token. Each layer's cache of C slots then sees the tokens one by one, as decoding does, in the
offloading runtime's steps (dbrxq.runtime.expert_cache.simulate, tested equal to the runtime): a token's
hits first, then each miss admitted in place of a resident the token does not use, if the policy
admits it.

Policies (``dbrxq.runtime.expert_cache``):
- LRU, cold;
- LRU starting from the C experts most routed to on the calibration text (calibration/data/calib.txt,
  the same counts `dbrxq quantize` reports per expert);
- decayed LFU (decay 0.995 per use of the layer; a miss replaces a resident only if it scores at
  least as high: dbrxq's runtime default), cold, and seeded with those counts;
- static: the C calibration-hottest experts, never evicted (misses computed elsewhere);
- Belady's optimal (evict the resident used farthest in the future): the upper bound no online
  policy can beat.
Reported: hits / routed experts over all layers, per C.

--runtime also measures the policies in dbrxq's offloading runtime (`--expert-policy`): the demo model
RTN-quantized through the calibration pipeline (so its quantize report has routing counts, 16 x 128
calibration tokens), a CPU budget holding 4 experts per layer, greedy decoding of 24 tokens after a
48-token held-out prompt; decode-phase hit rates per policy (the tokens are the same under all).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dbrxq  # noqa: E402
from dbrxq.core.sysinfo import describe_machine  # noqa: E402
from dbrxq.model.moe import route  # noqa: E402
from dbrxq.runtime.expert_cache import LRU, DecayedLFU, simulate  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "calibration" / "data"


@torch.inference_mode()
def routing_trace(model, ids: list[int], window: int = 512) -> list[list[list[int]]]:
    """Per layer, per token (in text order), the sorted expert ids it routes to."""
    c = model.config
    traces: list[list[list[int]]] = [[] for _ in range(c.n_layers)]
    hooks = []
    for i, block in enumerate(model.transformer.blocks):
        def hook(module, args, out, i=i):
            logits = out if isinstance(out, torch.Tensor) else out[0]
            _, top = route(logits.reshape(-1, c.num_experts), c.top_k, c.ffn_config.moe_normalize_expert_weights)
            traces[i].extend(sorted(row) for row in top.tolist())
        hooks.append(block.ffn.router.register_forward_hook(hook))
    try:
        for start in range(0, len(ids), window):
            model(input_ids=torch.tensor([ids[start:start + window]]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return traces


def belady(trace: list[list[int]], capacity: int) -> tuple[int, int]:
    flat = [e for t in trace for e in t]
    nxt, last = [0] * len(flat), {}
    for j in range(len(flat) - 1, -1, -1):
        nxt[j] = last.get(flat[j], len(flat))
        last[flat[j]] = j
    resident: dict[int, int] = {}  # expert -> its next use
    hits = 0
    for j, e in enumerate(flat):
        if e in resident:
            hits += 1
        elif capacity and len(resident) >= capacity:
            del resident[max(resident, key=resident.get)]
        if capacity:
            resident[e] = nxt[j]
    return hits, len(flat) - hits


def runtime_rates(slots: int = 4, prompt_tokens: int = 48, new_tokens: int = 24) -> dict[str, float]:
    import tempfile

    from calibration.options import CalibrationOptions
    from calibration.pipeline import quantize_with_calibration
    from dbrxq.formats.checkpoint import CheckpointReader, checkpoint_float_dtype
    from dbrxq.model.config import DbrxConfig
    from dbrxq.plan.checkpoint import plan_offload
    from quantize.config import QuantConfig
    rates, seqs = {}, set()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q"
        quantize_with_calibration(dbrxq.default_model_dir(), out, QuantConfig(method="rtn"),
                                  CalibrationOptions(samples=16, seq_len=128), progress=False)
        ctx = prompt_tokens + new_tokens
        with CheckpointReader(out) as r:
            config = DbrxConfig.from_json(out / "config.json")
            plan, layout = plan_offload(r, config, device=torch.device("cpu"), dtype=checkpoint_float_dtype(r),
                                        backend=None, gpu_memory=None, cpu_memory="1GiB", context=ctx,
                                        batch_size=1, kv_cache="bf16")
        budget = plan.device_fixed_bytes + slots * config.n_layers * layout.nbytes
        for policy in ("lru", "lfu", "static"):
            runner = dbrxq.load(out, cpu_memory=budget, context=ctx,
                                offload_options={"cache_dir": tmp, "policy": policy})
            prompt = [runner.tokenizer.encode((DATA / "heldout.txt").read_text()[:2000])[:prompt_tokens]]
            seqs.add(tuple(runner.generate_ids(prompt, max_new_tokens=new_tokens).sequences[0]))
            ph = runner.offload.stats.phases["decode"]
            rates[policy] = ph.hits / (ph.hits + ph.misses)
    assert len(seqs) == 1, "policies must not change the tokens"
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=16000)
    ap.add_argument("--slots", type=int, nargs="+", default=[4, 8, 12])
    ap.add_argument("--runtime", action="store_true", help="also measure the policies in the offloading runtime")
    args = ap.parse_args()
    print(describe_machine())
    runner = dbrxq.load(None, dtype="float32")
    model, tok = runner.model, runner.tokenizer
    c = model.config
    calib = routing_trace(model, tok.encode((DATA / "calib.txt").read_text())[:args.max_tokens])
    held = routing_trace(model, tok.encode((DATA / "heldout.txt").read_text())[:args.max_tokens])
    counts = [torch.bincount(torch.tensor([e for t in layer for e in t]), minlength=c.num_experts).tolist()
              for layer in calib]
    print(f"{len(held[0])} held-out tokens, {len(calib[0])} calibration tokens, {c.n_layers} layers, "
          f"{c.num_experts} experts, top-{c.top_k}")
    for i, cnt in enumerate(counts):
        share = sorted((x / sum(cnt) for x in cnt), reverse=True)
        print(f"  layer {i}: calibration share of the top 4 experts {sum(share[:4]):.0%}, least-routed expert "
              f"{share[-1]:.1%} (uniform {1 / c.num_experts:.1%})")

    def policies(i: int, slots: int):
        hot = sorted(range(c.num_experts), key=lambda e: -counts[i][e])[:slots]
        scale = 20.0 / max(1.0, sum(counts[i]) / c.num_experts)  # prior worth ~20 uses for an average expert
        prior = {e: counts[i][e] * scale for e in range(c.num_experts)}
        return {
            "LRU (cold)": (LRU(), []),
            "LRU from calibration-hot set": (LRU(), hot),
            "decayed LFU (cold)": (DecayedLFU(), []),
            "decayed LFU seeded with calibration counts": (DecayedLFU(prior=prior), hot),
        }, hot

    rows: dict[str, dict[int, float]] = {}
    for slots in args.slots:
        totals: dict[str, list[int]] = {}
        for i, trace in enumerate(held):
            pols, hot = policies(i, slots)
            for name, (pol, initial) in pols.items():
                h, m = simulate(trace, slots, pol, initial)
                totals.setdefault(name, [0, 0])
                totals[name][0] += h
                totals[name][1] += h + m
            h = sum(1 for t in trace for e in t if e in set(hot))
            totals.setdefault("static calibration-hot set", [0, 0])
            totals["static calibration-hot set"][0] += h
            totals["static calibration-hot set"][1] += sum(len(t) for t in trace)
            h, m = belady(trace, slots)
            totals.setdefault("Belady (optimal, offline)", [0, 0])
            totals["Belady (optimal, offline)"][0] += h
            totals["Belady (optimal, offline)"][1] += h + m
        for name, (h, n) in totals.items():
            rows.setdefault(name, {})[slots] = h / n
    print("\n| policy | " + " | ".join(f"{s} of {c.num_experts} resident" for s in args.slots) + " |")
    print("|---|" + "---:|" * len(args.slots))
    for name, by in rows.items():
        print(f"| {name} | " + " | ".join(f"{by[s]:.1%}" for s in args.slots) + " |")
    print(f"\n(uniform routing would give {', '.join(f'{s / c.num_experts:.0%}' for s in args.slots)} for a static set)")
    if args.runtime:
        rates = runtime_rates()
        print("\nruntime, 4 of 16 experts per layer, 24 decoded tokens, decode hit rate: "
              + ", ".join(f"{k} {v:.1%}" for k, v in rates.items()) + " (same tokens under each)")


if __name__ == "__main__":
    main()
