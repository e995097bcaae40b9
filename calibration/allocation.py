"""Bits per expert under a size budget: ``dbrxq quantize --target-bits B`` / ``--target-size SIZE``.

Each expert (its w1, v1, w2 together) gets one recipe from ``OPTIONS`` (2-bit g64 and 3-bit g64, 4-bit
g128, 8-bit per-channel, all symmetric over every level), chosen to minimise the summed predicted output error
under the byte budget (quantize.allocate: exact dynamic program, the convex-hull greedy when the
program would be too large). The predicted error of expert e at a recipe is its RTN output error on
its own calibration tokens, ``sum over its matrices of tr(dW H dW^T)`` with ``H = X^T X`` over the
tokens routed to it (w2's X: the float intermediate ``act(x w1^T) * (x v1^T)``); H sums over tokens,
so an expert's routing share weighs its error. The tokens come from one float pass over the model
(:func:`measure`: each layer's float attention, router and experts, before any is quantized), made
before the quantizing pass so that one budget spans every layer. That pass reads the source once
more: a resumed run repeats it (it is deterministic, so the recipes and the resume hash are the same).

Budgets: ``--target-bits B`` is the expert bytes of the uniform recipe at B bits where one exists in
OPTIONS, interpolated linearly between the two nearest otherwise (2.5 bits: halfway between all
experts at 2 and all at 3); ``--target-size`` is the whole checkpoint, from which the other tensors'
bytes (the recipe's attention, embeddings, norms, router) are taken first.

What it buys on the demo model against uniform widths: ``python scripts/plan_bits.py --eval`` (in-memory
GPTQ at the chosen widths, held-out text) and the mixed rows of docs/benchmarks.md.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from calibration.forward import (
    attention_module,
    attention_pass,
    expert_getter,
    moe_float,
    route_layer,
)
from dbrxq.core.errors import QuantizationError
from dbrxq.core.units import format_size
from dbrxq.core.untrusted import check_finite
from dbrxq.formats.checkpoint import hub_tensor_shapes
from dbrxq.formats.shards import tensor_nbytes
from dbrxq.model.moe import ACTIVATIONS
from quantize.allocate import solve_exact, solve_greedy
from quantize.blocks import PAGE
from quantize.config import ExpertMix, ModuleQuant, QuantConfig
from quantize.primitives import quantize_tensor
from quantize.specs import expert_slot, quantized_tensor_specs, weight_specs

log = logging.getLogger(__name__)

# Symmetric at every width: over all 2**bits levels as accurate as a zero point or more, and smaller.
OPTIONS = (ModuleQuant(2, 64, True), ModuleQuant(3, 64, True), ModuleQuant(4, 128, True), ModuleQuant(8, -1, True))


def expert_bytes(config, mq: ModuleQuant, layout: str = "canonical") -> int:
    """Bytes one expert (w1, v1 [F, D], w2 [D, F]) takes in the checkpoint with recipe ``mq``: the
    tensors quantize.specs gives it (blocks layout: its slot image, whole pages)."""
    if layout == "blocks":
        return expert_slot(config, mq).stride
    F_, D = config.ffn_hidden_size, config.d_model
    return sum(tensor_nbytes(shape, dtype) for k, (n, kk) in (("w1", (F_, D)), ("v1", (F_, D)), ("w2", (D, F_)))
               for _, shape, dtype in weight_specs(k, (), n, kk, mq))


def budget_from_bits(config, avg_bits: float, options=OPTIONS, layout: str = "canonical") -> int:
    """Expert bytes for an average of ``avg_bits``: the uniform recipe's, interpolated between widths."""
    per = {o.bits: expert_bytes(config, o, layout) for o in options}
    if not min(per) <= avg_bits <= max(per):
        raise QuantizationError(f"--target-bits {avg_bits}: expected a number from {min(per)} to {max(per)}")
    lo, hi = max(b for b in per if b <= avg_bits), min(b for b in per if b >= avg_bits)
    each = per[lo] if lo == hi else per[lo] + (per[hi] - per[lo]) * (avg_bits - lo) / (hi - lo)
    return int(each * config.n_layers * config.num_experts)


def files_overhead(config, qconfig: QuantConfig, float_dtypes, options=OPTIONS, copied: int = 0) -> int:
    """A bound on what OUT holds beyond its tensors' bytes: per shard the safetensors header and its
    padding to the data's alignment (a page in the blocks layout), per tensor its header and index
    entries, the config (which lists every expert's recipe), the quantize report (a line per expert),
    and ``copied`` bytes of tokenizer files."""
    specs = [n for n, _, _ in quantized_tensor_specs(config, qconfig, float_dtype=float_dtypes)
             if ".ffn.experts." not in n]
    per_class = 1 if qconfig.layout != "canonical" else 9  # qblocks, or w1/v1/w2 x codes/scales/zeros
    names = specs + [f"transformer.blocks.{config.n_layers}.ffn.experts.mlp.w1.qweight.{j}"
                     for j in range(config.n_layers * len(options) * per_class)]
    align = PAGE if qconfig.layout != "canonical" else 8  # auto: blocks wherever they hold the shapes
    shards = config.n_layers + 2  # at most one per layer, the embedding and the head
    experts = config.n_layers * config.num_experts
    return (sum(2 * len(n) + 256 for n in names)  # header + index entries
            + shards * (8 + 2 * align)  # length prefix, header padding, and the last tensor's end
            + FILES_FIXED + 512 * experts + copied)


FILES_FIXED = 64 << 10  # config.json's fixed fields, the index's, the report's summary


def budget_from_size(config, qconfig: QuantConfig, float_dtypes, size: int, options=OPTIONS, copied: int = 0) -> int:
    """Expert bytes left of a whole-checkpoint ``size`` once the other tensors and the files'
    overhead (:func:`files_overhead`) are counted, so the files written stay within ``size``."""
    other = sum(tensor_nbytes(s, d) for n, s, d in quantized_tensor_specs(config, qconfig, float_dtype=float_dtypes)
                if ".ffn.experts." not in n) + files_overhead(config, qconfig, float_dtypes, options, copied)
    least = config.n_layers * config.num_experts * min(expert_bytes(config, o, qconfig.layout) for o in options)
    if size - other < least:
        raise QuantizationError(f"--target-size {format_size(size)} is too small: the tensors other than the experts "
                                f"take {format_size(other)} and every expert at its smallest recipe "
                                f"{format_size(least)} more")
    return size - other


@torch.no_grad()
def _error(w: torch.Tensor, x: torch.Tensor, h: torch.Tensor | None, mq: ModuleQuant) -> float:
    """tr(dW H dW^T) for RTN at ``mq``: through X when it has fewer rows than H has, else through H."""
    d = w - quantize_tensor(w, mq.bits, mq.group_size, mq.symmetric).dequantize().to(w.device)
    if h is None:
        return float((x @ d.T).double().pow(2).sum())
    return float(((d @ h) * d).double().sum())


@torch.no_grad()
def measure(run, tokens: torch.Tensor, options=OPTIONS) -> tuple[list[list[float]], list[int]]:
    """Per expert (layer-major): the predicted error at each option, and its routed calibration tokens.

    ``run``: the pipeline's run state (config, source, device, chunking)."""

    c = run.config
    act = ACTIVATIONS[c.activation]
    name = "transformer.wte.weight"
    wte = check_finite(run.source.reader.get(name, expected_shape=(c.vocab_size, c.d_model)), name,
                       run.source.reader.file_of(name))
    x = wte[tokens].to(run.device, torch.float32)
    shapes = hub_tensor_shapes(c)
    errors, counts = [], []
    for i in tqdm(range(c.n_layers), desc="measure experts", unit="layer", disable=not run.show):
        run.source.fetch_layer(i)
        raw = {n: check_finite(run.source.reader.get(n, expected_shape=shapes[n]), n, run.source.reader.file_of(n))
               for n in shapes if n.startswith(f"transformer.blocks.{i}.")}
        run.source.reader.close()
        resid, h = attention_pass(attention_module(raw, run, i), x, run, keep=True)
        routing = route_layer(raw, run, i, h)
        expert = expert_getter(raw, run, i)
        for e in range(c.num_experts):
            xe = h[routing.tokens_of(e)]
            w1, v1, w2 = expert(e)
            a = act(xe @ w1.T) * (xe @ v1.T)
            h1 = xe.T @ xe if xe.shape[0] >= c.d_model else None
            h2 = a.T @ a if a.shape[0] >= c.ffn_hidden_size else None
            errors.append([_error(w1, xe, h1, o) + _error(v1, xe, h1, o) + _error(w2, a, h2, o) for o in options])
            counts.append(int(xe.shape[0]))
        x = resid + moe_float(h, routing, expert, run).view_as(resid)
        del raw
    return errors, counts


def allocate(run, tokens: torch.Tensor, budget: int, target: dict[str, Any], options=OPTIONS
             ) -> tuple[ExpertMix, dict[str, Any]]:
    """The recipes of every expert under ``budget`` expert bytes; and what to report about them."""
    t0 = time.perf_counter()
    c = run.config
    errors, counts = measure(run, tokens, options)
    costs = [[expert_bytes(c, o, run.qconfig.layout) for o in options] for _ in errors]
    try:
        best, solver = solve_exact(costs, errors, budget), "exact"
    except QuantizationError as e:
        if "too large" not in str(e):
            raise
        best, solver = solve_greedy(costs, errors, budget), "greedy"
    E = c.num_experts
    choice = tuple(tuple(best.choice[i * E:(i + 1) * E]) for i in range(c.n_layers))
    uniform = {f"{o.bits}-bit": sum(e[j] for e in errors) for j, o in enumerate(options)}
    info = {"target": target, "budget_bytes": budget, "expert_bytes": best.bytes, "solver": solver,
            "predicted_error": best.error, "uniform_predicted_error": uniform,
            "experts_per_recipe": {f"{o.bits}-bit": best.choice.count(j) for j, o in enumerate(options)},
            "predicted": [errors[n][j] for n, j in enumerate(best.choice)], "tokens": counts}
    # (no timing in info: it goes into config.json, which a resumed run must write byte for byte again)
    log.info("expert recipes for %s in %.1f s: %s (predicted error %.4g; uniform %s)", target,
             time.perf_counter() - t0, info["experts_per_recipe"], best.error,
             {k: f"{v:.4g}" for k, v in uniform.items()})
    return ExpertMix(tuple(options), choice), info
