"""One layer of the calibration pipeline: each attention matrix and then every expert quantized on
the activations of the earlier steps (quantized), the layer's output propagated, its part written.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from calibration.capture import feed_inputs
from calibration.experts import expert_strategy, quantize_expert, quantize_matrix
from calibration.forward import (
    attention_module,
    attention_pass,
    expert_getter,
    propagate,
    route_layer,
)
from calibration.options import LAYER_STEPS, Run
from calibration.parts import write_part
from dbrxq.core.sysinfo import peak_rss_bytes
from dbrxq.core.untrusted import check_finite
from dbrxq.formats.checkpoint import hub_tensor_shapes
from dbrxq.model.moe import ACTIVATIONS
from quantize.format import MIXED_PART, mixed_option
from quantize.gptq import GPTQ
from quantize.rtn import EXPERT_KINDS


def quantize_attention(run: Run, i: int, name: str, raw: dict, produced: dict, x: torch.Tensor) -> dict:
    """One attention matrix: capture its inputs (earlier steps quantized), quantize, record."""
    hub = f"transformer.blocks.{i}.{name}.weight"
    m = attention_module({**raw, **produced}, run, i)
    lin = m.get_submodule(name.removeprefix("norm_attn_norm."))
    solver = GPTQ(lin.in_features, device=run.device)
    with feed_inputs({name: (lin, solver)}):
        attention_pass(m, x, run, keep=False)
    qt, st = quantize_matrix(lin.weight, solver, run.qconfig.attn, run.policy.method == "gptq", run.policy)
    solver.free()
    produced.update(qt.tensors(hub))
    return st


def quantize_experts(run: Run, i: int, raw: dict, produced: dict, x: torch.Tensor) -> list[dict]:
    """Every expert of layer i on the tokens routed to it (inputs through the quantized attention)."""
    _, h = attention_pass(attention_module({**raw, **produced}, run, i), x, run, keep=True)
    routing = route_layer(raw, run, i, h)
    float_expert = expert_getter(raw, run, i)
    act, E, mix = ACTIVATIONS[run.config.activation], run.config.num_experts, run.qconfig.expert_mix
    base = f"transformer.blocks.{i}.ffn.experts.mlp."
    records = []
    for e in tqdm(range(E), desc=f"layer {i} experts", leave=False, disable=not run.show):
        tok = routing.tokens_of(e)
        strategy = expert_strategy(tok.numel(), run.policy)
        xin = h if strategy == "route-all" else h[tok]
        mq = run.qconfig.expert_recipe(i, e)
        qts, st = quantize_expert(*float_expert(e), xin, mq, strategy, run.policy, act)
        # into the stacked [E, out, in] tensors of the canonical layout; with per-expert recipes, into
        # the stack of the expert's recipe, at its rank there (quantize.format.MIXED_PART)
        if mix is None:
            stack, at, size = "", e, E
        else:
            j = mix.choice[i][e]
            members = mix.members(i, j)
            stack, at, size = "." + MIXED_PART.format(j), members.index(e), len(members)
        for k, qt in qts.items():
            for name, t in qt.tensors(base + k + stack).items():
                if name not in produced:
                    produced[name] = torch.empty((size, *t.shape), dtype=t.dtype)
                produced[name][at] = t
        record = {"expert": e, "tokens": tok.numel(), "strategy": strategy,
                  "rare": tok.numel() < run.policy.min_tokens, **st}
        if mix is not None:  # its recipe, the error predicted when choosing it, the one achieved (summed)
            record.update(recipe=mq.to_dict(), predicted_error=run.predicted[i * E + e],
                          achieved_error=sum(st[k]["output_error"] or 0.0 for k in EXPERT_KINDS))
        records.append(record)
    return records


def process_layer(run: Run, i: int, x: torch.Tensor) -> torch.Tensor:
    t = {"start": time.perf_counter()}
    run.source.fetch_layer(i)
    shapes = hub_tensor_shapes(run.config)
    raw = {n: check_finite(run.source.reader.get(n, expected_shape=shapes[n]), n, run.source.reader.file_of(n))
           for n in shapes if n.startswith(f"transformer.blocks.{i}.")}  # the float layer, in the source dtype
    # Unmap the shards: their touched pages would otherwise stay in RSS as later layers are read.
    run.source.reader.close()
    t["load"] = time.perf_counter()
    produced: dict[str, torch.Tensor] = {}
    record: dict[str, Any] = {"layer": i, "attn": {}, "experts": []}
    for step in LAYER_STEPS:
        if step.startswith("norm_attn_norm.") and run.qconfig.attn.quantized:
            record["attn"][step.rsplit(".", 1)[1]] = quantize_attention(run, i, step, raw, produced, x)
            t["attn"] = time.perf_counter()
        elif step == "ffn.experts" and run.qconfig.experts.quantized:
            record["experts"] = quantize_experts(run, i, raw, produced, x)
            t["experts"] = time.perf_counter()
    quantized = {n.rsplit(".", 1)[0] for n in produced if n.endswith(".qweight")}
    quantized |= {b.rsplit(".", 1)[0] for b in quantized if mixed_option(b) is not None}  # a stack's hub name
    for name in raw:  # what is not quantized is copied as stored
        if name.removesuffix(".weight") not in quantized:
            produced[name] = raw[name]
    del raw
    t.setdefault("attn", t["load"])
    t.setdefault("experts", t["attn"])
    x = propagate(produced, run, i, x)
    t["propagate"] = time.perf_counter()
    keys = ("load", "attn", "experts", "propagate")
    record["seconds"] = {k: t[k] - t[p] for p, k in zip(("start", *keys), keys)}
    record["seconds"]["total"] = time.perf_counter() - t["start"]
    record["peak_rss_bytes"] = peak_rss_bytes()
    write_part(run, f"layer.{i}", produced, report=record)
    return x
