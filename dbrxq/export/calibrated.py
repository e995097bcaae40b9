"""``dbrxq export FLOAT OUT.gguf --type MIX --calibrate``: GPTQ onto llama.cpp's K-quant grids, with
dbrxq's calibration, for the mix llama-quantize would choose (quantize.recipes).

Layer by layer, as the calibration pipeline does (calibration.layer): the attention matrices are
solved on their inputs with the earlier ones already quantized, every expert on the tokens the float
router sends it (w1 and v1 on their inputs, w2 on the intermediate of the quantized w1/v1; an expert
routed fewer than ``min_expert_tokens`` tokens on every token: the rare-expert rule), and the layer's
output is propagated through the quantized weights. Each matrix is solved by
:meth:`quantize.gptq.GPTQ.quantize_grid` onto its type's grid, so the bytes written are what GPTQ
chose; the output head last, on the final norm of the quantized model's last hidden states. The
embedding has no calibration here (a lookup: rounded to nearest on its grid, as the plain mix does),
and a matrix whose rows are not whole blocks takes the plain mix's fallback.

The GGUF bytes of each solved tensor go to a temporary folder beside OUT (one file per tensor, read
back by the exporter), so memory holds one layer's float weights and the activations, not the file.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from calibration.capture import chunks, feed_inputs
from calibration.experts import ExpertPolicy, default_min_tokens, expert_strategy
from calibration.forward import attention_module, attention_pass, expert_getter, propagate, route_layer
from calibration.options import CalibrationOptions, Run
from calibration.source import open_source
from calibration.tokens import calibration_tokens
from dbrxq.core.sysinfo import parse_device
from dbrxq.core.untrusted import check_finite
from dbrxq.formats.checkpoint import hub_tensor_shapes
from dbrxq.model.moe import ACTIVATIONS
from dbrxq.text.tokenizer import DbrxTokenizer
from quantize import kquants
from quantize.config import QuantConfig
from quantize.gptq import GPTQ, quadratic_energy
from quantize.recipes import RECIPES, fit_type, tensor_type

ATTENTION = (("norm_attn_norm.attn.Wqkv", "attn_qkv"), ("norm_attn_norm.attn.out_proj", "attn_output"))
EXPERTS = (("w1", "ffn_gate_exps"), ("v1", "ffn_up_exps"), ("w2", "ffn_down_exps"))


@dataclasses.dataclass
class Solved:
    """What the calibration produced: per GGUF tensor name, its GGML type and the file of its bytes
    (``uint8 [..., N, row bytes]``), and the summed output errors tr(E H E^T) of GPTQ and of round to
    nearest on the same grids and inputs (the measure of what calibration bought)."""

    tensors: dict[str, tuple[str, Path]]
    gptq_error: float = 0.0
    rtn_error: float = 0.0
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


def _solve(w: torch.Tensor, solver: GPTQ, ggml_type: str, policy: ExpertPolicy, use_gptq: bool, out: Solved
           ) -> kquants.KQuantized:
    rtn = kquants.quantize(w.float().cpu(), ggml_type)
    rtn_error = (quadratic_energy(w.to(solver.device).float() - kquants.dequantize(rtn).to(solver.device), solver.H)
                 if solver.nsamples else 0.0)
    out.rtn_error += rtn_error
    if not use_gptq or not solver.nsamples:
        out.gptq_error += rtn_error  # this matrix is rounded to nearest either way
        return rtn
    kq, st = solver.quantize_grid(w, ggml_type, damp=policy.damp)
    out.gptq_error += st["output_error"]
    return kq


def _solve_head(source, config, x: torch.Tensor, ggml_type: str | None, policy: ExpertPolicy, workdir: Path,
                out: Solved) -> None:
    """The output head on its input, the final norm of the quantized model's last hidden states."""
    shapes = hub_tensor_shapes(config)
    if "lm_head.weight" not in shapes or ggml_type not in kquants.GRIDS:
        return  # tied to the embedding, or a float type: nothing to solve
    get = lambda n: check_finite(source.reader.get(n, expected_shape=shapes[n]), n, source.reader.file_of(n))  # noqa: E731
    norm, w = get("transformer.norm_f.weight"), get("lm_head.weight")
    solver = GPTQ(config.d_model, device=x.device)
    x = x.reshape(-1, config.d_model)
    for sl in chunks(x.shape[0], policy.chunk):
        solver.add_batch(torch.nn.functional.layer_norm(x[sl], (config.d_model,), norm.to(x), None, 1e-5))
    kq = _solve(w, solver, ggml_type, policy, True, out)
    solver.free()
    path = workdir / "output.weight.npy"
    np.save(path, kquants.to_bytes(kq))
    out.tensors["output.weight"] = (ggml_type, path)


def calibrate_kquants(src: str, recipe: str, workdir: Path, opts: CalibrationOptions | None = None, *,
                      types: dict[str, str] | None = None, revision: str | None = None,
                      progress: bool = False) -> Solved:
    """Solve every attention, expert and output matrix of the float checkpoint ``src`` onto the grids of
    ``recipe``'s types, or of ``types`` (GGUF name -> type) where it names one (see the module docstring);
    the bytes go to files under ``workdir``."""
    opts = opts or CalibrationOptions()
    t0 = time.perf_counter()
    source = open_source(str(src), revision=revision)
    config = source.config
    device = parse_device(opts.device)
    torch.manual_seed(opts.seed)
    tokenizer = DbrxTokenizer.from_pretrained(source.folder)
    tokens, data_info = calibration_tokens(opts.data, tokenizer, samples=opts.samples, seq_len=opts.seq_len,
                                           seed=opts.seed, text_field=opts.text_field, vocab_size=config.vocab_size)
    min_tokens = opts.min_expert_tokens or default_min_tokens(config.d_model)
    policy = ExpertPolicy("gptq", opts.rare_strategy, min_tokens, opts.damp, False, opts.chunk_tokens)
    run = Run(source, QuantConfig(), opts, policy, workdir, device, None, {}, {}, progress)
    out = Solved({}, info={**data_info, "min_expert_tokens": min_tokens, "rare_strategy": opts.rare_strategy})
    gqa = config.n_heads // config.kv_n_heads
    types = types or {}

    def kind(name: str, k: int) -> str | None:
        if name in types or recipe not in RECIPES:
            return types.get(name)
        return fit_type(tensor_type(recipe, name, config.n_layers, gqa), k)
    wte = source.reader.get("transformer.wte.weight", expected_shape=(config.vocab_size, config.d_model))
    x = check_finite(wte, "transformer.wte.weight", source.reader.file_of("transformer.wte.weight"))[tokens]
    x = x.to(device, torch.float32)
    shapes = hub_tensor_shapes(config)
    act, E, Fh = ACTIVATIONS[config.activation], config.num_experts, config.ffn_hidden_size
    try:
        for i in tqdm(range(config.n_layers), desc="calibrated layers", disable=not progress):
            source.fetch_layer(i)
            raw = {n: check_finite(source.reader.get(n, expected_shape=shapes[n]), n, source.reader.file_of(n))
                   for n in shapes if n.startswith(f"transformer.blocks.{i}.")}
            source.reader.close()
            deq: dict[str, torch.Tensor] = {}  # the solved weights, dequantized, under their hub names
            for step, short in ATTENTION:
                hub = f"transformer.blocks.{i}.{step}.weight"
                name = f"blk.{i}.{short}.weight"
                ggml_type = kind(name, raw[hub].shape[-1])
                if ggml_type not in kquants.GRIDS:
                    continue  # the plain mix's float fallback: nothing to solve
                m = attention_module({**raw, **deq}, run, i)
                lin = m.get_submodule(step.removeprefix("norm_attn_norm."))
                solver = GPTQ(lin.in_features, device=device)
                with feed_inputs({step: (lin, solver)}):
                    attention_pass(m, x, run, keep=False)
                kq = _solve(lin.weight, solver, ggml_type, policy, True, out)
                solver.free()
                deq[hub] = kquants.dequantize(kq)
                path = workdir / f"{name}.npy"
                np.save(path, kquants.to_bytes(kq))
                out.tensors[name] = (ggml_type, path)
            _, h = attention_pass(attention_module({**raw, **deq}, run, i), x, run, keep=True)
            routing = route_layer(raw, run, i, h)
            float_expert = expert_getter(raw, run, i)
            types = {k: kind(f"blk.{i}.{short}.weight", Fh if k == "w2" else config.d_model) for k, short in EXPERTS}
            if all(t in kquants.GRIDS for t in types.values()):
                stacks = {k: [] for k in types}
                hubs = {k: torch.empty(E * Fh, config.d_model) for k in types}
                for e in range(E):
                    tok = routing.tokens_of(e)
                    strategy = expert_strategy(tok.numel(), policy)
                    xin = h if strategy == "route-all" else h[tok]
                    w1, v1, w2 = float_expert(e)
                    s1 = GPTQ(config.d_model, device=device)
                    for sl in chunks(xin.shape[0], policy.chunk):
                        s1.add_batch(xin[sl])
                    q1 = _solve(w1, s1, types["w1"], policy, strategy != "rtn", out)
                    qv = _solve(v1, s1, types["v1"], policy, strategy != "rtn", out)
                    s1.free()
                    w1q, v1q = kquants.dequantize(q1).to(device), kquants.dequantize(qv).to(device)
                    s2 = GPTQ(Fh, device=device)
                    for sl in chunks(xin.shape[0], policy.chunk):
                        s2.add_batch(act(xin[sl] @ w1q.T) * (xin[sl] @ v1q.T))
                    q2 = _solve(w2, s2, types["w2"], policy, strategy != "rtn", out)
                    s2.free()
                    rows = slice(e * Fh, (e + 1) * Fh)
                    for k, kq in (("w1", q1), ("v1", qv), ("w2", q2)):
                        stacks[k].append(kquants.to_bytes(kq))
                        d = kquants.dequantize(kq)
                        hubs[k][rows] = d.t() if k == "w2" else d  # hub w2 rows are the transpose
                for k, short in EXPERTS:
                    name = f"blk.{i}.{short}.weight"
                    path = workdir / f"{name}.npy"
                    np.save(path, np.stack(stacks[k]))
                    out.tensors[name] = (types[k], path)
                    deq[f"transformer.blocks.{i}.ffn.experts.mlp.{k}"] = hubs[k]
            x = propagate({**raw, **deq}, run, i, x)
            del raw, deq
        _solve_head(source, config, x, kind("output.weight", config.d_model), policy, workdir, out)
    finally:
        source.close()
    out.info["seconds"] = time.perf_counter() - t0
    return out
