"""A layer's forward from its tensors (float source, or the written shard's quantized ones), in
float32: the reference numerics the calibration pipeline and the allocation pass both use, so the
activations and hence the output bytes do not depend on the kernel this machine would pick.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from calibration.capture import Routing, chunks
from calibration.options import Run
from dbrxq.model.dbrx import DbrxNormAttentionNorm, rope_cos_sin
from dbrxq.model.moe import ACTIVATIONS
from quantize.config import ModuleQuant
from quantize.format import MIXED_PART, mixed_option
from quantize.primitives import QuantizedTensor
from quantize.rtn import EXPERT_KINDS


def float_weight(w: dict[str, torch.Tensor], name: str, mq: ModuleQuant, dev) -> torch.Tensor:
    """Tensor ``name`` as float32 on dev: dequantized when ``w`` holds its quantized form."""
    base = name.removesuffix(".weight")
    if f"{base}.qweight" in w:
        return QuantizedTensor.from_tensors(w, base, mq.bits, mq.group_size).dequantize().to(dev)
    return w[name].to(dev, torch.float32)


def attention_module(w: dict[str, torch.Tensor], run: Run, i: int) -> DbrxNormAttentionNorm:
    """norm_1 -> attention -> norm_2 of layer i in float32 (built on meta, then assigned)."""
    with torch.device("meta"):
        m = DbrxNormAttentionNorm(run.config, i)
    p = f"transformer.blocks.{i}.norm_attn_norm."
    for local, _ in list(m.named_parameters()):
        mod_name, _, attr = local.rpartition(".")
        mod = m.get_submodule(mod_name)
        mod._parameters[attr] = torch.nn.Parameter(float_weight(w, p + local, run.qconfig.attn, run.device),
                                                   requires_grad=False)
    return m.eval()


def expert_getter(w: dict[str, torch.Tensor], run: Run, i: int) -> Callable[[int], tuple]:
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


@torch.no_grad()
def attention_pass(m: DbrxNormAttentionNorm, x: torch.Tensor, run: Run, keep: bool):
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
def route_layer(w: dict[str, torch.Tensor], run: Run, i: int, h: torch.Tensor) -> Routing:
    wr = w[f"transformer.blocks.{i}.ffn.router.layer.weight"].to(run.device, torch.float32)  # (E, D)
    logits = torch.cat([F.linear(h[s], wr) for s in chunks(h.shape[0], run.opts.chunk_tokens)])  # (N*L, E)
    c = run.config
    return Routing.of(logits, c.top_k, c.ffn_config.moe_normalize_expert_weights, c.num_experts)


@torch.no_grad()
def moe_float(h: torch.Tensor, routing: Routing, expert: Callable[[int], tuple], run: Run) -> torch.Tensor:
    """sum over a token's experts of weight * GLU(h) -> (N*L, D); experts in order 0..E-1."""
    act = ACTIVATIONS[run.config.activation]
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


def propagate(w: dict[str, torch.Tensor], run: Run, i: int, x: torch.Tensor) -> torch.Tensor:
    """Layer i's output for input x (N, L, D), from the layer's (quantized) tensors ``w``."""
    resid, h = attention_pass(attention_module(w, run, i), x, run, keep=True)
    out = moe_float(h, route_layer(w, run, i, h), expert_getter(w, run, i), run)
    return resid + out.view_as(resid)
