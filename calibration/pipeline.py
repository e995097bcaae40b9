"""``dbrxq quantize`` with calibration: stream a float DBRX checkpoint layer by layer into OUT.

Data flow (one explicit loop, :func:`quantize_with_calibration`)::

    open SRC lazily (calibration.source) -> sample N x L calibration tokens (calibration.data)
    -> x = wte[tokens]  (N, L, D) float32; write the embedding's shard
    -> for each layer i:
         load layer i only (its float tensors, source dtype; a hub SRC downloads its shards now)
         for step in LAYER_STEPS:            # each step sees the earlier steps quantized
             attn.Wqkv, attn.out_proj: run x through the attention, feeding the matrix's inputs
                 into a GPTQ Hessian (capture.feed_inputs); quantize; swap in the quantized matrix
             ffn.experts: run x through the QUANTIZED attention -> h (N*L, D); route with the
                 float router; quantize each expert on the tokens routed to it (calibration.experts;
                 rare experts by the rule there)
         write layer i's shard atomically; record it in the manifest (calibration.progress)
         x = the layer's output computed with the QUANTIZED weights, read from the shard's tensors
         store x (resume point); free the layer
    -> norm_f, lm_head shard; tokenizer files; index; config.json LAST (quantization_config with a
       calibration summary); quantize_report.json; manifest and stored activations removed.

Shards: ``model-00001-of-K`` the embedding, ``model-(i+2)-of-K`` layer i, ``model-K-of-K`` norm_f and
lm_head (K = n_layers + 2). Tensor names, shapes and dtypes are exactly
:func:`quantize.writer.quantized_tensor_specs` (the one definition of the canonical format), so
``dbrxq.load(OUT)`` reads the result like any other quantized checkpoint.

Memory: one source layer in the source dtype (6.3 GB for DBRX in bf16) + its quantized form
(1.7 GB) + activations x, h, out (3 x N*L*D*4 bytes) + one expert's float32 weights and Hessians
(``[D, D]`` and ``[F, F]``), whatever n_layers is.

Propagation uses the reference dequantize-then-float32-matmul numerics (quantize.kernels'
"torch" backend, which every kernel approximates), so the activations and hence the output bytes
do not depend on which kernel this machine would pick. Determinism: the calibration windows
depend only on the data, tokenizer, N, L and seed; everything after is deterministic for a given
torch version, device and thread count (the manifest records the thread count; a resume with
another one warns, since float reductions may round differently). Resume after a crash gives
byte-identical shards, index and config.json (tests/calibration/test_pipeline.py checks it);
quantize_report.json differs in its timings only.

Rare experts (rule in calibration.experts). Measured on the trained demo model (dbrxq/assets/tiny,
d_model 128, 4 layers), int4 per-channel experts, int8 attention, mean KL to the float model over
8K held-out tokens (heldout.txt):

    calibration    RTN      GPTQ, no rule   rare -> RTN   rare -> route-all
    32 x 128       0.00696  0.00443         0.00447       0.00445   (threshold 300: 14 rare)
    8 x 64         0.00696  0.00772         0.00782       0.00773   (default rule: 8 rare)
    8 x 64, every expert treated as rare:   0.00691       0.00595
    4 x 32, every expert treated as rare:   0.00698       0.01034

route-all is as good or better except with 128 tokens in all (where the all-token Hessian itself
has rank < d_model), so it is the default; ``rare_strategy="rtn"`` is the option. Note that GPTQ
needs real calibration data: with <= 512 tokens it is worse than RTN on this model; the default
128 x 512 is far above that.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from calibration.capture import Routing, chunks, feed_inputs
from calibration.data import calibration_tokens
from calibration.experts import (RARE_STRATEGIES, ExpertPolicy, default_min_tokens, expert_strategy,
                                 quantize_expert, quantize_matrix)
from calibration.progress import (MANIFEST_NAME, REPORT_NAME, Progress, check_disk_space, copy_file_atomic, load_activations,
                                  prepare_out, save_activations)
from calibration.report import build_report, format_summary, write_report
from calibration.source import Source, open_source
from dbrxq.checkpoint import INDEX_NAME, hub_tensor_shapes, tokenizer_files
from dbrxq.untrusted import check_finite
from dbrxq.errors import QuantizationError
from dbrxq.loading import parse_device
from dbrxq.model import _ACTIVATIONS, DbrxNormAttentionNorm, rope_cos_sin
from dbrxq.sysinfo import describe_machine, peak_rss_bytes
from dbrxq.tokenizer import DbrxTokenizer
from dbrxq.writer import (TensorSpec, is_write_error, remove_stale_temps, save_file_atomic, tensor_nbytes,
                          write_error, write_json_atomic)
from quantize.config import ModuleQuant, QuantConfig
from quantize.format import FORMAT_VERSION, MIXED_PART, mixed_option
from quantize.gptq import GPTQ
from quantize.primitives import QuantizedTensor, quantize_tensor
from quantize.rtn import EXPERT_KINDS
from quantize.writer import quantized_tensor_specs

log = logging.getLogger(__name__)

__all__ = ["CalibrationOptions", "QuantizeResult", "quantize_with_calibration", "LAYER_STEPS"]

DEFAULT_RARE_STRATEGY = "route-all"
# The order in which a layer's matrices are quantized; each step runs with the earlier ones quantized.
LAYER_STEPS = ("norm_attn_norm.attn.Wqkv", "norm_attn_norm.attn.out_proj", "ffn.experts")


@dataclass(frozen=True)
class CalibrationOptions:
    """Calibration settings (all but device/chunk_tokens/save_activations enter the resume hash)."""

    data: str | None = None  # None: calibration/data/calib.txt; see calibration.data for formats
    text_field: str = "text"  # JSON Lines field holding the text
    samples: int = 64  # N sequences ... (64 x 512 fits the shipped text: 32.8K tokens with DBRX's tokenizer)
    seq_len: int = 512  # ... of L tokens
    seed: int = 0
    rare_strategy: str = DEFAULT_RARE_STRATEGY  # for experts routed < min_expert_tokens tokens
    min_expert_tokens: int | None = None  # None: ceil(d_model / 8)
    damp: float = 0.01  # GPTQ relative dampening
    act_order: bool = False  # GPTQ column order by diag(H) (static groups)
    device: str = "cpu"  # where activations, Hessians and solves live
    chunk_tokens: int = 4096  # tokens per attention batch / Hessian update: bounds temporaries
    save_activations: bool = True  # store the resume point's activations (else recompute at resume)
    target_bits: float | None = None  # per-expert recipes for this average width (calibration.allocation)
    target_size: int | None = None  # ... or for this checkpoint size in bytes


@dataclass
class QuantizeResult:
    out: Path
    report: dict[str, Any]
    summary: str


@dataclass
class _Run:
    """Everything one run's steps share."""

    source: Source
    qconfig: QuantConfig
    opts: CalibrationOptions
    policy: ExpertPolicy
    out: Path
    device: torch.device
    progress: Progress
    specs: dict[str, list[TensorSpec]]  # part ("embed", "layer.i", "head") -> its tensors
    shard: dict[str, str]  # part -> shard file name
    show: bool
    predicted: list[float] | None = None  # per expert (layer-major): its predicted error (calibration.allocation)

    @property
    def config(self):
        return self.source.config


# --------------------------------------------------------------------------------------------
# Parts and their shards
# --------------------------------------------------------------------------------------------
def _part_of(name: str) -> str:
    if name.startswith("transformer.blocks."):
        return f"layer.{int(name.split('.')[2])}"
    return "embed" if name == "transformer.wte.weight" else "head"


def _plan(config, qconfig: QuantConfig, float_dtype) -> tuple[dict, dict]:
    specs: dict[str, list[TensorSpec]] = {}
    for spec in quantized_tensor_specs(config, qconfig, float_dtype=float_dtype):
        specs.setdefault(_part_of(spec[0]), []).append(spec)
    parts = ["embed", *(f"layer.{i}" for i in range(config.n_layers)), "head"]
    k = len(parts)
    return specs, {p: f"model-{j + 1:05d}-of-{k:05d}.safetensors" for j, p in enumerate(parts)}


def _write_part(run: _Run, part: str, produced: dict[str, torch.Tensor], **extra: Any) -> None:
    """Write one part's tensors, in spec order, as its own shard (atomically); record it."""
    tensors = {}
    for name, shape, dtype in run.specs[part]:
        t = produced[name]
        assert tuple(t.shape) == tuple(shape) and t.dtype == dtype, (name, tuple(t.shape), shape, t.dtype, dtype)
        tensors[name] = t.contiguous()
    path = run.out / run.shard[part]
    save_file_atomic(tensors, path, metadata={"format": "pt"})
    run.progress.record(part, path, **extra)


# --------------------------------------------------------------------------------------------
# Modules from a layer's tensors (float source tensors, or the written shard's quantized ones)
# --------------------------------------------------------------------------------------------
def _float(w: dict[str, torch.Tensor], name: str, mq: ModuleQuant, dev) -> torch.Tensor:
    """Tensor ``name`` as float32 on dev: dequantized when ``w`` holds its quantized form."""
    base = name.removesuffix(".weight")
    if f"{base}.qweight" in w:
        return QuantizedTensor.from_tensors(w, base, mq.bits, mq.group_size).dequantize().to(dev)
    return w[name].to(dev, torch.float32)


def _attention(w: dict[str, torch.Tensor], run: _Run, i: int) -> DbrxNormAttentionNorm:
    """norm_1 -> attention -> norm_2 of layer i in float32 (built on meta, then assigned)."""
    with torch.device("meta"):
        m = DbrxNormAttentionNorm(run.config, i)
    p = f"transformer.blocks.{i}.norm_attn_norm."
    for local, _ in list(m.named_parameters()):
        mod_name, _, attr = local.rpartition(".")
        mod = m.get_submodule(mod_name)
        mod._parameters[attr] = torch.nn.Parameter(_float(w, p + local, run.qconfig.attn, run.device),
                                                   requires_grad=False)
    return m.eval()


def _expert_getter(w: dict[str, torch.Tensor], run: _Run, i: int) -> Callable[[int], tuple]:
    """e -> (w1 [F, D], v1 [F, D], w2 [D, F]) float32 on the device, quantized or float."""
    p, Fh, mq = f"transformer.blocks.{i}.ffn.experts.mlp.", run.config.ffn_hidden_size, run.qconfig.experts
    mix = run.qconfig.expert_mix

    def one(qt: QuantizedTensor, e: int) -> torch.Tensor:
        z = None if qt.qzeros is None else qt.qzeros[e]
        return QuantizedTensor(qt.qweight[e], qt.scales[e], z, qt.bits, qt.group_size,
                               qt.shape[1:]).dequantize().to(run.device)
    if f"{p}w1.qweight" in w:
        qts = {k: QuantizedTensor.from_tensors(w, p + k, mq.bits, mq.group_size) for k in EXPERT_KINDS}
        return lambda e: tuple(one(qts[k], e) for k in EXPERT_KINDS)
    if mix is not None and any(mixed_option(n.rsplit(".", 1)[0]) is not None for n in w):  # per-recipe stacks
        stacks = {(k, j): QuantizedTensor.from_tensors(w, f"{p}{k}.{MIXED_PART.format(j)}", o.bits, o.group_size)
                  for k in EXPERT_KINDS for j, o in enumerate(mix.options) if mix.members(i, j)}
        rank = {e: r for j in range(len(mix.options)) for r, e in enumerate(mix.members(i, j))}
        return lambda e: tuple(one(stacks[k, mix.choice[i][e]], rank[e]) for k in EXPERT_KINDS)

    def float_expert(e: int) -> tuple:
        rows = slice(e * Fh, (e + 1) * Fh)  # hub [E*F, D]; canonical w2 is the transpose
        return (w[p + "w1"][rows].to(run.device, torch.float32), w[p + "v1"][rows].to(run.device, torch.float32),
                w[p + "w2"][rows].t().to(run.device, torch.float32))
    return float_expert


# --------------------------------------------------------------------------------------------
# Forward pieces (shared by the run and by the resume recompute: same bytes either way)
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def _attention_pass(m: DbrxNormAttentionNorm, x: torch.Tensor, run: _Run, keep: bool):
    """x (N, L, D) through norm_1/attention/norm_2 in batches of sequences.

    Returns (resid (N, L, D), h (N*L, D)) when ``keep``, else None (a pass for the hooks only).
    """
    N, L, D = x.shape
    pos = torch.arange(L, device=x.device)[None]  # (1, L)
    cos, sin = rope_cos_sin(pos, run.config.head_dim, run.config.attn_config.rope_theta, torch.float32)
    mask = None  # unpadded sequences: causal without a mask (dbrxq.model.causal_attention)
    resid = torch.empty_like(x) if keep else None
    h = torch.empty(N * L, D, device=x.device) if keep else None
    step = max(1, run.opts.chunk_tokens // L)
    for s in range(0, N, step):
        r, hb = m(x[s:s + step], cos, sin, mask, None, 0)
        if keep:
            resid[s:s + step] = r
            h[s * L:(s + r.shape[0]) * L] = hb.reshape(-1, D)
    return (resid, h) if keep else None


@torch.no_grad()
def _route(w: dict[str, torch.Tensor], run: _Run, i: int, h: torch.Tensor) -> Routing:
    wr = w[f"transformer.blocks.{i}.ffn.router.layer.weight"].to(run.device, torch.float32)  # (E, D)
    logits = torch.cat([F.linear(h[s], wr) for s in chunks(h.shape[0], run.opts.chunk_tokens)])  # (N*L, E)
    c = run.config
    return Routing.of(logits, c.top_k, c.ffn_config.moe_normalize_expert_weights, c.num_experts)


@torch.no_grad()
def _moe(h: torch.Tensor, routing: Routing, expert: Callable[[int], tuple], run: _Run) -> torch.Tensor:
    """sum over a token's experts of weight * GLU(h) -> (N*L, D); experts in order 0..E-1."""
    act = _ACTIVATIONS[run.config.activation]
    out = torch.zeros_like(h)
    for e in range(run.config.num_experts):
        tok = routing.tokens_of(e)
        if tok.numel() == 0:
            continue
        w1, v1, w2 = expert(e)
        wt = routing.weights_of(e)
        for sl in chunks(tok.numel(), run.opts.chunk_tokens):
            xe = h[tok[sl]]  # (n, D)
            y = (act(xe @ w1.T) * (xe @ v1.T)) @ w2.T  # (n, D)
            out.index_add_(0, tok[sl], y * wt[sl, None])  # a token visits an expert once: no races
    return out


def _propagate(w: dict[str, torch.Tensor], run: _Run, i: int, x: torch.Tensor) -> torch.Tensor:
    """Layer i's output for input x (N, L, D), from the layer's (quantized) tensors ``w``."""
    resid, h = _attention_pass(_attention(w, run, i), x, run, keep=True)
    out = _moe(h, _route(w, run, i, h), _expert_getter(w, run, i), run)
    return resid + out.view_as(resid)


# --------------------------------------------------------------------------------------------
# One layer
# --------------------------------------------------------------------------------------------
def _quantize_attention(run: _Run, i: int, name: str, raw: dict, produced: dict, x: torch.Tensor) -> dict:
    """One attention matrix: capture its inputs (earlier steps quantized), quantize, record."""
    hub = f"transformer.blocks.{i}.{name}.weight"
    m = _attention({**raw, **produced}, run, i)
    lin = m.get_submodule(name.removeprefix("norm_attn_norm."))
    solver = GPTQ(lin.in_features, device=run.device)
    with feed_inputs({name: (lin, solver)}):
        _attention_pass(m, x, run, keep=False)
    qt, st = quantize_matrix(lin.weight, solver, run.qconfig.attn, run.policy.method == "gptq", run.policy)
    solver.free()
    produced.update(qt.tensors(hub))
    return st


def _quantize_experts(run: _Run, i: int, raw: dict, produced: dict, x: torch.Tensor) -> list[dict]:
    """Every expert of layer i on the tokens routed to it (inputs through the quantized attention)."""
    _, h = _attention_pass(_attention({**raw, **produced}, run, i), x, run, keep=True)
    routing = _route(raw, run, i, h)
    float_expert = _expert_getter(raw, run, i)
    act, E, mix = _ACTIVATIONS[run.config.activation], run.config.num_experts, run.qconfig.expert_mix
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


def _process_layer(run: _Run, i: int, x: torch.Tensor) -> torch.Tensor:
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
            record["attn"][step.rsplit(".", 1)[1]] = _quantize_attention(run, i, step, raw, produced, x)
            t["attn"] = time.perf_counter()
        elif step == "ffn.experts" and run.qconfig.experts.quantized:
            record["experts"] = _quantize_experts(run, i, raw, produced, x)
            t["experts"] = time.perf_counter()
    quantized = {n.rsplit(".", 1)[0] for n in produced if n.endswith(".qweight")}
    quantized |= {b.rsplit(".", 1)[0] for b in quantized if mixed_option(b) is not None}  # a stack's hub name
    for name in raw:  # what is not quantized is copied as stored
        if name.removesuffix(".weight") not in quantized:
            produced[name] = raw[name]
    del raw
    t.setdefault("attn", t["load"])
    t.setdefault("experts", t["attn"])
    x = _propagate(produced, run, i, x)
    t["propagate"] = time.perf_counter()
    keys = ("load", "attn", "experts", "propagate")
    record["seconds"] = {k: t[k] - t[p] for p, k in zip(("start", *keys), keys)}
    record["seconds"]["total"] = time.perf_counter() - t["start"]
    record["peak_rss_bytes"] = peak_rss_bytes()
    _write_part(run, f"layer.{i}", produced, report=record)
    return x


# --------------------------------------------------------------------------------------------
# Start, end
# --------------------------------------------------------------------------------------------
def _embed(run: _Run, tokens: torch.Tensor) -> torch.Tensor:
    c = run.config
    wte = check_finite(run.source.reader.get("transformer.wte.weight", expected_shape=(c.vocab_size, c.d_model)),
                       "transformer.wte.weight", run.source.reader.file_of("transformer.wte.weight"))
    if not run.progress.done("embed"):
        _write_part(run, "embed", {"transformer.wte.weight": wte})
    return wte[tokens].to(run.device, torch.float32)  # (N, L, D)


def _start(run: _Run, tokens: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The first unfinished layer and its input activations (stored, or recomputed from OUT)."""
    done = [i for i in range(run.config.n_layers) if run.progress.done(f"layer.{i}")]
    k = len(done)
    assert done == list(range(k)), done
    x = _embed(run, tokens)
    if k:
        stored = load_activations(run.progress, k)
        if stored is not None:
            log.info("resuming at layer %d from the stored activations", k)
            return k, stored.to(run.device)
        log.info("resuming at layer %d: recomputing the activations through layers 0..%d of %s", k, k - 1, run.out)
        for i in range(k):
            x = _propagate(load_file(str(run.out / run.shard[f"layer.{i}"])), run, i, x)
    return k, x


def _write_head(run: _Run) -> None:
    names = [n for n, _, _ in run.specs["head"]]
    produced = {}
    for name in ("transformer.norm_f.weight", "lm_head.weight"):
        if name not in hub_tensor_shapes(run.config):
            continue
        w = check_finite(run.source.reader.get(name, expected_shape=hub_tensor_shapes(run.config)[name]), name,
                         run.source.reader.file_of(name))
        mq = run.qconfig.lm_head
        if name == "lm_head.weight" and mq.quantized:  # RTN: no calibration for the head
            produced.update(quantize_tensor(w.float(), mq.bits, mq.group_size, mq.symmetric).tensors(name))
        else:
            produced[name] = w
    assert set(produced) == set(names), (sorted(produced), names)
    _write_part(run, "head", produced)


def _finish(run: _Run, calib: dict) -> dict:
    """Tokenizer files, index, config.json LAST. Returns the quantization_config written."""
    for p in tokenizer_files(run.source.folder):
        copy_file_atomic(p, run.out / p.name)
    # Parts are in hub order (embedding, blocks, norm_f/lm_head), and so is each part's spec list.
    weight_map = {name: run.shard[part] for part in run.shard for name, _, _ in run.specs[part]}
    total = sum(tensor_nbytes(s, d) for specs in run.specs.values() for _, s, d in specs)
    write_json_atomic({"metadata": {"total_size": total}, "weight_map": weight_map}, run.out / INDEX_NAME)
    qc = dataclasses.replace(run.qconfig, calibration=calib).to_dict()
    d = run.source.config.to_dict()
    d["quantization_config"] = qc
    write_json_atomic(d, run.out / "config.json")
    return qc


def _target(opts: CalibrationOptions, qconfig: QuantConfig, config, source) -> tuple[dict, int] | None:
    """(what was asked, the expert byte budget) for --target-bits / --target-size, else None."""
    from calibration.allocation import OPTIONS, budget_from_bits, budget_from_size, expert_bytes
    if opts.target_bits is None and opts.target_size is None:
        return None
    if opts.target_bits is not None and opts.target_size is not None:
        raise QuantizationError("--target-bits and --target-size both set: give one budget")
    if not qconfig.experts.quantized:
        raise QuantizationError("--target-bits/--target-size choose recipes for the experts, which this recipe "
                                "keeps in 16 bits")
    for o in OPTIONS:
        try:
            expert_bytes(config, o)
        except QuantizationError as e:
            raise QuantizationError(f"--target-bits/--target-size choose among {len(OPTIONS)} recipes; the one of "
                                    f"{o.bits} bits with group size {o.group_size} does not fit this model's "
                                    f"experts (d_model {config.d_model}, ffn {config.ffn_hidden_size}): {e}") from None
    if opts.target_bits is not None:
        return {"bits": opts.target_bits}, budget_from_bits(config, opts.target_bits)
    return {"size_bytes": opts.target_size}, budget_from_size(config, qconfig, source.float_dtypes(), opts.target_size)


def _check_options(opts: CalibrationOptions, qconfig: QuantConfig, config) -> None:
    if opts.rare_strategy not in RARE_STRATEGIES:
        raise QuantizationError(f"rare expert strategy {opts.rare_strategy!r} is not one of {RARE_STRATEGIES}")
    if opts.seq_len > config.max_seq_len:
        raise QuantizationError(f"--calib-seq-len {opts.seq_len} exceeds the model's max_seq_len {config.max_seq_len}")
    if opts.min_expert_tokens is not None and opts.min_expert_tokens < 1:
        raise QuantizationError(f"min_expert_tokens must be >= 1, got {opts.min_expert_tokens}")
    if opts.chunk_tokens < 1:
        raise QuantizationError(f"chunk_tokens must be >= 1, got {opts.chunk_tokens}")


def quantize_with_calibration(src: str | Path, out: str | Path, qconfig: QuantConfig,
                              options: CalibrationOptions | None = None, *, overwrite: bool = False,
                              resume: bool = False, revision: str | None = None,
                              progress: bool = True) -> QuantizeResult:
    """Quantize the float DBRX checkpoint ``src`` into ``out``, layer by layer, with calibration.

    Args:
        src: a local folder or a hub repo id (shards fetched as the loop reaches them).
        out: output folder; complete only once its config.json exists.
        qconfig: the recipe; ``method`` "gptq" or "rtn" (rtn is measured on the same calibration
            data, so the reports of the two are comparable).
        options: calibration settings (:class:`CalibrationOptions`).
        overwrite: replace what a non-empty ``out`` holds (config.json removed first).
        resume: continue the unfinished run in ``out`` (same settings only).
        progress: tqdm bars per layer and per expert.
    Returns:
        :class:`QuantizeResult` (folder, report dict, one-screen summary).
    Raises:
        DbrxqError subclasses with one line: bad SRC, bad options or data, OUT conflicts, disk space.
    """
    t0 = time.perf_counter()
    opts = options or CalibrationOptions()
    out = Path(out)
    source = open_source(str(src), revision=revision)
    try:
        config = source.config
        _check_options(opts, qconfig, config)
        device = parse_device(opts.device)
        torch.manual_seed(opts.seed)
        tokenizer = DbrxTokenizer.from_pretrained(source.folder)
        tokens, data_info = calibration_tokens(opts.data, tokenizer, samples=opts.samples, seq_len=opts.seq_len,
                                               seed=opts.seed, text_field=opts.text_field,
                                               vocab_size=config.vocab_size)
        min_tokens = opts.min_expert_tokens or default_min_tokens(config.d_model)
        calib = {"method": qconfig.method, **data_info, "tokens": opts.samples * opts.seq_len,
                 "rare_strategy": opts.rare_strategy, "min_expert_tokens": min_tokens, "damp": opts.damp,
                 "act_order": opts.act_order}
        target = _target(opts, qconfig, config, source)
        if target is not None:
            calib["target"] = target[0]
        qdict = {k: v for k, v in qconfig.to_dict().items() if k != "calibration"}
        settings = {"format_version": FORMAT_VERSION, "quantization": qdict, "calibration": dict(calib),
                    "source": source.identity}
        remove_stale_temps(out)  # shards and manifests of killed runs, before OUT's contents are judged
        prepare_out(out, source.folder, settings, resume=resume, overwrite=overwrite, dry_run=True)
        _plan(config, qconfig, source.float_dtypes())  # recipe errors before the (long) allocation pass
        policy = ExpertPolicy(qconfig.method, opts.rare_strategy, min_tokens, opts.damp, opts.act_order,
                              opts.chunk_tokens)
        predicted = None
        if target is not None:  # one float pass measures every expert, then the recipes are chosen
            from calibration.allocation import allocate
            probe = _Run(source, qconfig, opts, policy, out, device, None, {}, {}, progress)
            mix, info = allocate(probe, tokens, target[1], target[0])
            qconfig = dataclasses.replace(qconfig, expert_mix=mix)
            predicted = info.pop("predicted")
            info.pop("tokens")
            calib["allocation"] = info
        specs, shard = _plan(config, qconfig, source.float_dtypes())
        created = not out.exists()
        had_manifest = (out / MANIFEST_NAME).is_file()
        try:
            prog = prepare_out(out, source.folder, settings, resume=resume, overwrite=overwrite)
        except OSError as e:
            if is_write_error(e):
                raise write_error(e, out) from None
            raise
        if prog is None:
            return _already_complete(out)
        run = _Run(source, qconfig, opts, policy, out, device, prog, specs, shard, progress, predicted)
        remaining = sum(tensor_nbytes(s, d) for part, sp in specs.items() if not prog.done(part) for _, s, d in sp)
        need = remaining + 2 * tokens.numel() * config.d_model * 4 * opts.save_activations
        try:
            check_disk_space(out, need)
        except QuantizationError:
            if not had_manifest:  # a failed up-front check leaves nothing that changes the next run
                prog.remove()
                if created:
                    shutil.rmtree(out, ignore_errors=True)
            raise
        try:
            report, calib = _run_layers(run, tokens, calib, src, out, t0)
        except OSError as e:
            if is_write_error(e):
                raise write_error(e, out, need) from None
            raise
    finally:
        source.close()
    summary = format_summary(report)
    log.info("%s", summary)
    return QuantizeResult(out, report, summary)


def _run_layers(run: _Run, tokens: torch.Tensor, calib: dict, src, out: Path, t0: float) -> tuple[dict, dict]:
    """The layer loop, the head and the finishing files of a prepared run; returns (report, calib)."""
    config, prog, opts, qconfig, source = run.config, run.progress, run.opts, run.qconfig, run.source
    k, x = _start(run, tokens)
    with tqdm(total=config.n_layers, initial=k, desc="layers", unit="layer", disable=not run.show) as bar:
        for i in range(k, config.n_layers):
            x = _process_layer(run, i, x)
            if opts.save_activations and i + 1 < config.n_layers:
                save_activations(prog, x, i + 1)
            bar.update(1)
    del x
    if not prog.done("head"):
        _write_head(run)
    layers = [prog.entry(f"layer.{i}")["report"] for i in range(config.n_layers)]
    calib["rare_experts"] = sum(ex["rare"] for L in layers for ex in L["experts"])
    calib["settings_sha256"] = prog.data["settings_sha256"]
    qc = _finish(run, calib)
    dtypes = source.float_dtypes()
    bytes_in = sum(tensor_nbytes(s, dtypes[n]) for n, s in hub_tensor_shapes(config).items())
    bytes_out = sum(e["bytes"] for e in prog.data["parts"].values())
    report = build_report(src=str(src), out=str(out), method=qconfig.method, quantization_config=qc,
                          calibration=calib, layers=layers, seconds=time.perf_counter() - t0,
                          peak_rss_bytes=peak_rss_bytes(), bytes_in=bytes_in, bytes_out=bytes_out,
                          machine=describe_machine(), threads=torch.get_num_threads())
    write_report(report, out / REPORT_NAME)
    prog.remove()
    return report, calib


def _already_complete(out: Path) -> QuantizeResult:
    path = out / REPORT_NAME
    report = json.loads(path.read_text()) if path.is_file() else {}
    return QuantizeResult(out, report, format_summary(report) if report else f"{out} is already complete")
