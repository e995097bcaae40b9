"""DBRX's mixture of experts: the router, top-k routing, the grouped dispatch and the float experts.

``route`` (softmax in float32 -> top-k -> divide by the p-norm) and ``moe_dispatch`` (one batched
call per active expert, summed in expert order) are shared by every expert implementation: the
float :class:`DbrxExperts` here, quantize.modules.QExperts and the offloading runtime
(dbrxq.runtime.offload), which only replace the per-expert function.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dbrxq.model.batch import apply, by_rows, invariant
from dbrxq.model.config import DbrxConfig

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class DbrxRouter(nn.Module):
    def __init__(self, config: DbrxConfig):
        super().__init__()
        self.layer = nn.Linear(config.d_model, config.num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)  # (N, E) raw logits


def route(router_logits: torch.Tensor, top_k: int, norm_p: float | None):
    """Softmax (float32) -> top-k -> divide the kept weights by their p-norm.

    router_logits (N, E) -> weights (N, k) float32, expert ids (N, k) int64.
    """
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if norm_p is not None:
        # torch.norm's own call (what HF's route writes), without its Python wrapper: the same kernel
        weights = weights / torch.linalg.vector_norm(weights, norm_p, dim=-1, keepdim=True)
    return weights, ids


def group_by_expert(expert_ids: torch.Tensor, num_experts: int):
    """Sort the (token, slot) pairs of a routing decision by expert, once per layer.

    expert_ids (N, k) -> (order (N*k,) indices into the flattened (token, slot) pairs grouped by
    expert, token_of (N*k,) the token of each sorted pair, counts list[int] of length E).
    """
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order, order // expert_ids.shape[1], counts


def moe_dispatch(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, num_experts: int,
                 expert_fn: Callable[[int, torch.Tensor], torch.Tensor], independent: bool = False,
                 order: list[int] | None = None) -> torch.Tensor:
    """sum_k weights[n, k] * expert_{ids[n, k]}(x[n]) with one batched call per active expert.

    x (N, D); expert_ids, weights (N, k); expert_fn(e, x_e (n_e, D)) -> (n_e, D), in any float dtype:
    the weighted sum is taken in float32 (each y * w rounded, then added, in expert-id order) and cast
    to x's dtype once, so an implementation that runs a layer's experts in one call (quantize.kernels.moe)
    gives the same bits.
    Under :func:`batch_invariant`, ``independent`` says whether expert_fn is row-independent;
    when not, it sees one token at a time. ``order``: the order the active experts are computed in
    (an offloading runtime computes resident experts while others are still being read); the sum
    is still taken in expert-id order, so the result does not depend on it, bit for bit.
    """
    if invariant() and not independent:
        fn = expert_fn
        expert_fn = lambda e, xe: by_rows(lambda r: fn(e, r), xe, False)  # noqa: E731
    order_, token_of, counts = group_by_expert(expert_ids, num_experts)
    flat_w = weights.reshape(-1)
    starts = [0] * num_experts
    for e in range(1, num_experts):
        starts[e] = starts[e - 1] + counts[e - 1]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    ys: dict[int, torch.Tensor] = {}
    for e in order if order is not None else range(num_experts):
        if counts[e] == 0:
            continue
        tok = token_of[starts[e]:starts[e] + counts[e]]
        y = expert_fn(e, x[tok])  # (n_e, D)
        if order is not None:
            ys[e] = y
        else:
            out.index_add_(0, tok, y.float() * flat_w[order_[starts[e]:starts[e] + counts[e]], None].float())
    for e in sorted(ys):
        s, n = starts[e], counts[e]
        out.index_add_(0, token_of[s:s + n], ys[e].float() * flat_w[order_[s:s + n], None].float())
    return out.to(x.dtype)


def down_proj(h: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """h (n, F) @ w2 (F, D) with w2 in the hub's (in, out) orientation.

    Same value as ``h @ w2``, but a 16-bit ``h @ w2`` on a CPU without native bf16 takes a path
    ~40x slower than reading the weights (0.5 s for one DBRX expert at n = 1, 8.7 s at n = 16,
    torch 2.13, AVX2). A matrix-vector product reads w2 once; for several rows, upcasting beats it.
    """
    if h.device.type != "cpu" or h.dtype == torch.float32:
        return h @ w2
    if h.shape[0] == 1:
        return torch.mv(w2.t(), h[0])[None]
    return (h.float() @ w2.float()).to(h.dtype)


class DbrxExpertGLU(nn.Module):
    """Holds the fused expert tensors exactly as the hub stores them: w1, v1, w2 each (E*F, D)."""

    def __init__(self, config: DbrxConfig):
        super().__init__()
        E, Fh, D = config.num_experts, config.ffn_hidden_size, config.d_model
        self.w1 = nn.Parameter(torch.empty(E * Fh, D))
        self.v1 = nn.Parameter(torch.empty(E * Fh, D))
        self.w2 = nn.Parameter(torch.empty(E * Fh, D))


class DbrxExperts(nn.Module):
    """Float experts. Replacements (quantized, offloaded) keep ``forward(x, expert_ids, weights)``."""

    # A step whose routed experts' weights take at most this many bytes gathers them and runs every
    # (token, expert) pair in three batched matmuls (:meth:`gathered`) instead of a dispatch per expert:
    # on the demo model (4 layers of width 128) decoding one token took ~1.1 ms per layer in the
    # per-expert path, ~0.15 in this one. Larger ones (a real float DBRX expert is 400 MB) would copy
    # what they read, so they keep the per-expert path.
    GATHER_BYTES = 8 << 20

    def __init__(self, config: DbrxConfig):
        super().__init__()
        self.num_experts, self.ffn_hidden_size = config.num_experts, config.ffn_hidden_size
        self.act = ACTIVATIONS[config.activation]
        self.mlp = DbrxExpertGLU(config)
        # A layer's step in one call (x, expert_ids, weights) -> out or None, given by the loader on a CPU
        # (quantize.float_experts): the same float32 arithmetic without the dispatch of gathered()'s ops.
        # Used where gathered() would be, and for one token (a decode step reads each routed expert once).
        self.fused: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        Fh = self.ffn_hidden_size
        rows = slice(e * Fh, (e + 1) * Fh)
        w1, v1, w2 = self.mlp.w1[rows], self.mlp.v1[rows], self.mlp.w2[rows]  # (F, D) each
        return down_proj(self.act(x @ w1.T) * (x @ v1.T), w2)  # (n, D)

    def gathered(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The MoE of x (N, D) with the routed experts' weights gathered: (N*k, F, D) each, matmuls in
        float32, each token's k outputs summed in float32 in increasing expert id (moe_dispatch's order).
        Rows are independent (a batch of matrix products per (token, expert) pair)."""
        n, k = expert_ids.shape
        E, Fh, D = self.num_experts, self.ffn_hidden_size, x.shape[-1]
        order = expert_ids.argsort(dim=1)  # each token's experts in increasing id
        ids = expert_ids.gather(1, order).reshape(-1)  # (N*k,)
        w = weights.gather(1, order).reshape(-1, 1).float()  # (N*k, 1)
        w1, v1, w2 = (p.view(E, Fh, D)[ids].float() for p in (self.mlp.w1, self.mlp.v1, self.mlp.w2))  # (N*k, F, D)
        xs = x.float().repeat_interleave(k, dim=0)[:, None, :]  # (N*k, 1, D)
        h = self.act(xs @ w1.transpose(1, 2)) * (xs @ v1.transpose(1, 2))  # (N*k, 1, F)
        y = ((h @ w2)[:, 0, :] * w).view(n, k, D)  # (N, k, D); w2 is (F, D) per expert in the hub layout
        out = y[:, 0]
        for j in range(1, k):
            out = out + y[:, j]
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n, k = expert_ids.shape
        small = n * k * 3 * self.ffn_hidden_size * x.shape[-1] * 4 <= self.GATHER_BYTES
        if self.fused is not None and (small or n == 1):
            out = self.fused(x, expert_ids, weights)
            if out is not None:
                return out
        if small:
            if invariant() and n > 1:  # each row alone, as a batch of one computes it
                return torch.cat([self.gathered(x[i:i + 1], expert_ids[i:i + 1], weights[i:i + 1]) for i in range(n)])
            return self.gathered(x, expert_ids, weights)
        return moe_dispatch(x, expert_ids, weights, self.num_experts, self.expert)  # float: not row-independent


class DbrxFFN(nn.Module):
    def __init__(self, config: DbrxConfig):
        super().__init__()
        self.top_k = config.top_k
        self.norm_p = config.ffn_config.moe_normalize_expert_weights
        self.router = DbrxRouter(config)
        self.experts = DbrxExperts(config)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> (out (B, T, D), router_logits (B*T, E))."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        logits = apply(self.router, flat)
        weights, ids = route(logits, self.top_k, self.norm_p)
        return self.experts(flat, ids, weights).view(B, T, D), logits


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int,
                        attention_mask: torch.Tensor | None) -> torch.Tensor:
    """transformers' load_balancing_loss_func: E * sum_e (fraction of top-k slots routed to e) *
    (mean router probability of e), both averaged over all layers' (unpadded) tokens."""
    tokens = torch.zeros(num_experts, dtype=torch.float32, device=router_logits[0].device)
    probs_sum = torch.zeros_like(tokens)
    rows = 0.0
    mask = None
    if attention_mask is not None:
        mask = attention_mask.reshape(-1).to(tokens)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        _, sel = torch.topk(probs, top_k, dim=-1)
        m = torch.ones(probs.shape[0], device=probs.device) if mask is None else mask
        tokens = tokens.scatter_add(0, sel.reshape(-1), m.repeat_interleave(top_k))
        probs_sum = probs_sum + (probs * m[:, None]).sum(0)
        rows = rows + m.sum()
    return num_experts * torch.sum((tokens / rows) * (probs_sum / rows))
