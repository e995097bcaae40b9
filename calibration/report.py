"""What a quantize run did: ``quantize_report.json`` beside the output, and a one-screen summary.

Report layout (JSON)::

    {"src", "out", "method", "quantization_config", "calibration": {...data, tokens, seed, rule},
     "machine", "threads",
     "layers": [{"layer": i, "seconds": {"load", "attn", "experts", "write", "propagate", "total"},
                 "attn": {"Wqkv": stats, "out_proj": stats},
                 "experts": [{"expert": e, "tokens": n, "strategy": "gptq"|"route-all"|"rtn",
                              "w1": stats, "v1": stats, "w2": stats}, ...]}, ...],
     "rare_experts": [{"layer", "expert", "tokens", "strategy"}, ...],
     "errors": {kind: {"mean", "max", "count"}},     # kind: attn.Wqkv, ..., experts.w2
     "totals": {"seconds", "peak_rss_bytes", "bytes_in", "bytes_out", "layers", "experts",
                "experts_gptq", "experts_fallback"}}

``stats`` = {"method", "rel_error", "output_error", "nsamples"}: rel_error is
``||X (W - W_hat)^T||_F / ||X W^T||_F`` on the matrix's calibration inputs (GPTQ's exact
output_error relative to the output's energy), None when no token reached it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dbrxq.core.files import write_json_atomic
from dbrxq.core.units import format_rate, format_size

__all__ = ["error_table", "build_report", "write_report", "format_summary"]

KINDS = ("attn.Wqkv", "attn.out_proj", "experts.w1", "experts.v1", "experts.w2")


def _errors_of(layer: dict[str, Any]):
    for name, st in layer.get("attn", {}).items():
        yield f"attn.{name}", st.get("rel_error")
    for ex in layer.get("experts", []):
        for k in ("w1", "v1", "w2"):
            yield f"experts.{k}", ex[k].get("rel_error")


def error_table(layers: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean / max relative output error per matrix kind over all layers (Nones skipped)."""
    vals: dict[str, list[float]] = {}
    for layer in layers:
        for kind, v in _errors_of(layer):
            if v is not None:
                vals.setdefault(kind, []).append(v)
    return {k: {"mean": sum(v) / len(v), "max": max(v), "count": len(v)}
            for k in KINDS if (v := vals.get(k))}


def build_report(*, src: str, out: str, method: str, quantization_config: dict, calibration: dict,
                 layers: list[dict[str, Any]], seconds: float, peak_rss_bytes: int, bytes_in: int,
                 bytes_out: int, machine: str, threads: int) -> dict[str, Any]:
    rare = [{"layer": L["layer"], "expert": ex["expert"], "tokens": ex["tokens"], "strategy": ex["strategy"]}
            for L in layers for ex in L.get("experts", []) if ex.get("rare")]
    n_exp = sum(len(L.get("experts", [])) for L in layers)
    return {
        "src": src, "out": out, "method": method, "quantization_config": quantization_config,
        "calibration": calibration, "machine": machine, "threads": threads, "layers": layers,
        "rare_experts": rare, "errors": error_table(layers),
        "totals": {"seconds": seconds, "peak_rss_bytes": peak_rss_bytes, "bytes_in": bytes_in,
                   "bytes_out": bytes_out, "layers": len(layers), "experts": n_exp,
                   "experts_gptq": sum(ex["strategy"] == "gptq" for L in layers for ex in L.get("experts", [])),
                   "experts_fallback": len(rare)},
    }


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    return write_json_atomic(report, path)


def format_summary(report: dict[str, Any]) -> str:
    """The one-screen summary the CLI prints."""
    t, cal = report["totals"], report["calibration"]
    lines = [f"quantized {report['src']} -> {report['out']} ({report['method']})",
             f"  calibration  {cal.get('samples')} x {cal.get('seq_len')} tokens of {cal.get('data')} "
             f"(seed {cal.get('seed')})",
             f"  layers       {t['layers']}; experts {t['experts']}: {t['experts_gptq']} calibrated, "
             f"{t['experts_fallback']} rare (< {cal.get('min_expert_tokens')} tokens: "
             f"{cal.get('rare_strategy')})"]
    rare = report["rare_experts"]
    if rare:
        shown = ", ".join(f"L{r['layer']}E{r['expert']}({r['tokens']})" for r in rare[:8])
        lines.append(f"  rare experts {shown}{' ...' if len(rare) > 8 else ''}")
    lines.append("  rel. output error  mean     max      (||X(W-Wq)^T|| / ||XW^T||)")
    for kind, e in report["errors"].items():
        lines.append(f"    {kind:<15} {e['mean']:.5f}  {e['max']:.5f}")
    secs = t["seconds"]
    lines.append(f"  time         {secs:.1f} s ({format_rate(t['bytes_in'], secs)} of source)")
    lines.append(f"  peak RSS     {format_size(t['peak_rss_bytes'])}")
    ratio = t["bytes_in"] / max(t["bytes_out"], 1)
    lines.append(f"  bytes        {format_size(t['bytes_in'])} in, {format_size(t['bytes_out'])} out ({ratio:.2f}x smaller)")
    if not math.isfinite(ratio):
        lines.pop()
    return "\n".join(lines)
