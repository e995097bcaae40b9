"""The DBRX architecture, and nothing else.

Module and parameter names are the hub's (``transformer.blocks.N.norm_attn_norm.attn.Wqkv.weight``,
``transformer.blocks.N.ffn.experts.mlp.w1`` ...), so a real checkpoint loads strictly without
conversion. Numerics follow transformers' ``modeling_dbrx.py`` (5.23, the version the tests
install): LayerNorm without bias, fused Wqkv clamped to +-clip_qkv before the q/k/v split and
before RoPE (NeoX rotate-half form, inv_freq in float32), GQA, router softmax then top-k then
division by the p-norm of the kept weights, GLU experts ``(silu(x w1^T) * (x v1^T)) w2``.
Two deliberate differences, both numerically neutral in float32: the router softmax always runs
in float32 (transformers runs it in the activation dtype), and tokens are grouped by expert with
one sort instead of a one-hot mask.

The experts and the two attention projections are the swappable parts: quantized or offloaded
modules replace ``DbrxExperts`` / ``nn.Linear`` (see quantize.modules); they only have to keep the
forward signatures. Loading lives in dbrxq.loading; this file imports nothing from quantization.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import DbrxConfig
from .kv_cache import KVCache, StaticKVCache

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------
@dataclass
class DbrxOutput:
    """transformers' MoeCausalLMOutputWithPast, field for field (attentions is always None)."""

    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None)

    def __getitem__(self, i):
        return self.to_tuple()[i]


# --------------------------------------------------------------------------------------------
# Batch invariance
# --------------------------------------------------------------------------------------------
class _Mode(threading.local):
    invariant = False


_MODE = _Mode()


@contextlib.contextmanager
def batch_invariant(on: bool = True):
    """Within this block (on this thread), every row of a batch is computed bit for bit as it would
    be alone: a weight whose kernel is not row-independent (:func:`row_independent`) is applied
    to one row at a time, the same call a batch of one makes. Float matmuls are not
    row-independent (torch picks gemv or differently blocked gemm kernels by the number of rows,
    so a row's rounding depends on how many rows came with it); dbrxq's C kernels are (exact
    integer dot products per row; quantize.kernels.CpuQWeight), and keep one pass over the weights
    for the whole batch. Used by the server's batched decode step (dbrxq.engine), where the rows
    are different requests."""
    old, _MODE.invariant = _MODE.invariant, on
    try:
        yield
    finally:
        _MODE.invariant = old


def row_independent(module) -> bool:
    """Whether ``module``'s output row i is a function of its input row i alone, bit for bit, for
    any number of rows (a ``row_independent`` attribute; False when absent, e.g. nn.Linear)."""
    return bool(getattr(module, "row_independent", False))


def by_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, independent: bool) -> torch.Tensor:
    """fn(x), or, under :func:`batch_invariant` when fn is not row-independent, fn of each row of
    x (its first dimension) concatenated."""
    if not _MODE.invariant or independent or x.shape[0] <= 1:
        return fn(x)
    return torch.cat([fn(x[i:i + 1]) for i in range(x.shape[0])])


def apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) under the batch-invariance rule of :func:`by_rows`."""
    return by_rows(module, x, row_independent(module))


# --------------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------------
def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, T, head_dim) for integer positions (B, T); computed in float32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                              device=position_ids.device) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd); cos/sin (B, T, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
# CUDA: every SDPA backend but cuDNN's, which builds an execution plan for each new key length (30-40
# ms a plan on an H200, torch 2.11: scripts/bench_gpu.py --profile), and decoding makes a new length
# every token (measured: 60 ms per token for 2 real-width layers instead of a few).
_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw) -> torch.Tensor:
    """F.scaled_dot_product_attention; on CUDA without the cuDNN backend (_NO_CUDNN)."""
    if q.device.type != "cuda":
        return F.scaled_dot_product_attention(q, k, v, **kw)
    with sdpa_kernel(_NO_CUDNN):
        return F.scaled_dot_product_attention(q, k, v, **kw)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, gqa: bool) -> torch.Tensor:
    """Causal attention of T queries at positions past..past+T-1 over S = past + T keys, without a mask.

    past == 0: SDPA's own causal path. past > 0 (a later prefill chunk): SDPA's causal flag aligns
    the diagonal top-left, which is wrong when S > T, and a (T, S) mask costs memory per chunk. On
    CPU the keys split in two exact parts: the past (every query sees all of it) and the chunk
    itself (causal, T == T); torch's CPU flash-attention kernel returns each part's log-sum-exp,
    and the two softmax-weighted outputs merge exactly (up to float rounding):
    out = (e^{l1-m} o1 + e^{l2-m} o2) / (e^{l1-m} + e^{l2-m}), m = max(l1, l2). Elsewhere (CUDA,
    or a torch without that kernel) a boolean mask is built as before.
    """
    S = k.shape[2]
    if past == 0:
        return sdpa(q, k, v, is_causal=True, enable_gqa=gqa)
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if q.device.type != "cpu" or flash is None:
        allowed = torch.arange(S, device=q.device)[None, :] <= torch.arange(past, S, device=q.device)[:, None]
        return sdpa(q, k, v, attn_mask=allowed, enable_gqa=gqa)
    o1, l1 = flash(q, k[:, :, :past], v[:, :, :past], 0.0, False)
    o2, l2 = flash(q, k[:, :, past:], v[:, :, past:], 0.0, True)
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m)[..., None], torch.exp(l2 - m)[..., None]
    return ((o1.float() * w1 + o2.float() * w2) / (w1 + w2)).to(q.dtype)


class DbrxAttention(nn.Module):
    def __init__(self, config: DbrxConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.kv_heads, self.head_dim = config.n_heads, config.kv_n_heads, config.head_dim
        self.d_model = config.d_model
        self.clip_qkv = config.attn_config.clip_qkv
        self.Wqkv = nn.Linear(config.d_model, config.qkv_out_features, bias=False)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None, cache_position: int) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = apply(self.Wqkv, x)  # (B, T, d + 2*kv*hd)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        kv_dim = self.kv_heads * self.head_dim
        q, k, v = qkv.split([self.d_model, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, kvH, T, hd)
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.kv_heads != self.n_heads
        if getattr(cache, "per_row", False):
            y = self._per_row(q, k, v, cache, gqa)
        else:
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx, cache_position)  # (B, kvH, S, hd)
            if mask is None and T > 1:  # unpadded prefill: causal, no (T, S) mask built
                y = causal_attention(q, k, v, k.shape[2] - T, gqa)
            else:
                y = sdpa(q, k, v, attn_mask=mask, enable_gqa=gqa)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.d_model)
        return apply(self.out_proj, y)

    def _per_row(self, q, k, v, cache, gqa: bool) -> torch.Tensor:
        """Rows that are separate sequences, each with its own cached length (a slotted cache,
        dbrxq.kv_cache.SlotView): each row attends over its own keys exactly as it would alone."""
        T, ys = q.shape[2], []
        for i in range(q.shape[0]):
            ki, vi = cache.update_row(i, k[i:i + 1], v[i:i + 1], self.layer_idx)  # (1, kvH, S_i, hd)
            qi = q[i:i + 1]
            if T > 1:
                ys.append(causal_attention(qi, ki, vi, ki.shape[2] - T, gqa))
            else:
                ys.append(sdpa(qi, ki, vi, enable_gqa=gqa))
        return torch.cat(ys)


class DbrxNormAttentionNorm(nn.Module):
    """norm_1 -> attention -> residual add -> norm_2; returns (residual, normed) like the hub module."""

    def __init__(self, config: DbrxConfig, layer_idx: int):
        super().__init__()
        self.norm_1 = nn.LayerNorm(config.d_model, bias=False)
        self.attn = DbrxAttention(config, layer_idx)
        self.norm_2 = nn.LayerNorm(config.d_model, bias=False)

    def forward(self, x, cos, sin, mask, cache, cache_position):
        x = x + self.attn(self.norm_1(x), cos, sin, mask, cache, cache_position)
        return x, self.norm_2(x)


# --------------------------------------------------------------------------------------------
# Mixture of experts
# --------------------------------------------------------------------------------------------
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
        weights = weights / torch.norm(weights, p=norm_p, dim=-1, keepdim=True)
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

    x (N, D); expert_ids, weights (N, k); expert_fn(e, x_e (n_e, D)) -> (n_e, D).
    Under :func:`batch_invariant`, ``independent`` says whether expert_fn is row-independent;
    when not, it sees one token at a time. ``order``: the order the active experts are computed in
    (an offloading runtime computes resident experts while others are still being read); the sum
    is still taken in expert-id order, so the result does not depend on it, bit for bit.
    """
    if _MODE.invariant and not independent:
        fn = expert_fn
        expert_fn = lambda e, xe: by_rows(lambda r: fn(e, r), xe, False)  # noqa: E731
    order_, token_of, counts = group_by_expert(expert_ids, num_experts)
    flat_w = weights.reshape(-1)
    starts = [0] * num_experts
    for e in range(1, num_experts):
        starts[e] = starts[e - 1] + counts[e - 1]
    out = torch.zeros_like(x)
    ys: dict[int, torch.Tensor] = {}
    for e in order if order is not None else range(num_experts):
        if counts[e] == 0:
            continue
        tok = token_of[starts[e]:starts[e] + counts[e]]
        y = expert_fn(e, x[tok])  # (n_e, D)
        if order is not None:
            ys[e] = y
        else:
            out.index_add_(0, tok, y * flat_w[order_[starts[e]:starts[e] + counts[e]], None].to(y.dtype))
    for e in sorted(ys):
        s, n = starts[e], counts[e]
        out.index_add_(0, token_of[s:s + n], ys[e] * flat_w[order_[s:s + n], None].to(ys[e].dtype))
    return out


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

    def __init__(self, config: DbrxConfig):
        super().__init__()
        self.num_experts, self.ffn_hidden_size = config.num_experts, config.ffn_hidden_size
        self.act = _ACTIVATIONS[config.activation]
        self.mlp = DbrxExpertGLU(config)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        Fh = self.ffn_hidden_size
        rows = slice(e * Fh, (e + 1) * Fh)
        w1, v1, w2 = self.mlp.w1[rows], self.mlp.v1[rows], self.mlp.w2[rows]  # (F, D) each
        return down_proj(self.act(x @ w1.T) * (x @ v1.T), w2)  # (n, D)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
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


class DbrxBlock(nn.Module):
    def __init__(self, config: DbrxConfig, layer_idx: int):
        super().__init__()
        self.norm_attn_norm = DbrxNormAttentionNorm(config, layer_idx)
        self.ffn = DbrxFFN(config)

    def forward(self, x, cos, sin, mask, cache, cache_position):
        resid, h = self.norm_attn_norm(x, cos, sin, mask, cache, cache_position)
        out, router_logits = self.ffn(h)
        return resid + out, router_logits


# --------------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------------
class DbrxModel(nn.Module):
    def __init__(self, config: DbrxConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(DbrxBlock(config, i) for i in range(config.n_layers))
        self.norm_f = nn.LayerNorm(config.d_model, bias=False)


def attention_mask_4d(attention_mask: torch.Tensor | None, batch: int, q_len: int, start: int,
                      device: torch.device) -> torch.Tensor | None:
    """Boolean SDPA mask (B, 1, T, S), True = may attend; None without padding (the attention is
    then causal by construction: :func:`causal_attention`).

    Queries sit at positions start..start+T-1 of a key sequence of length S = start + T.
    attention_mask (B, S) or (B, T) marks real tokens with 1 and (left) padding with 0.
    A query that may attend nowhere (a padding query before any real token) is allowed to attend
    everywhere instead: its output is never used, and this keeps SDPA from producing NaN.
    """
    S = start + q_len
    if attention_mask is None:  # no padding: plain decoding needs no mask, prefill uses causal_attention
        return None
    q_pos = torch.arange(start, S, device=device)
    allowed = torch.arange(S, device=device)[None, :] <= q_pos[:, None]  # (T, S) causal
    allowed = allowed.expand(batch, q_len, S)
    if attention_mask is not None:
        am = attention_mask.to(device=device, dtype=torch.bool)
        if am.shape[1] != S:
            raise ValueError(f"attention_mask has {am.shape[1]} columns; expected past + new tokens = {S}")
        allowed = allowed & am[:, None, :]
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None]  # (B, 1, T, S)


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


class DbrxForCausalLM(nn.Module):
    """DBRX with a language-model head; forward follows transformers' DbrxForCausalLM.

    Build it on the meta device and load weights with ``DbrxForCausalLM.from_pretrained``
    (dbrxq.loading), or construct directly for training/testing.
    """

    def __init__(self, config: DbrxConfig):
        super().__init__()
        self.config = config
        self.transformer = DbrxModel(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size,
                                                                          bias=False)

    # transformers-style conveniences
    @classmethod
    def from_pretrained(cls, path_or_repo_id, **kwargs) -> DbrxForCausalLM:
        from .loading import load_model
        return load_model(path_or_repo_id, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    def init_weights(self, generator: torch.Generator | None = None) -> DbrxForCausalLM:
        """transformers' init: normal(0, initializer_range) weights, unit LayerNorms."""
        std = self.config.initializer_range
        with torch.no_grad():
            for module in self.modules():
                for p in module.parameters(recurse=False):
                    if isinstance(module, nn.LayerNorm):
                        p.fill_(1.0)
                    else:
                        p.normal_(0.0, std, generator=generator)
        return self

    def new_cache(self, batch_size: int, max_length: int, *, dtype: torch.dtype | None = None,
                  device: torch.device | None = None) -> StaticKVCache:
        c = self.config
        return StaticKVCache(c.n_layers, batch_size, max_length, c.kv_n_heads, c.head_dim,
                             dtype=dtype or self.dtype, device=device or self.device,
                             max_capacity=c.max_seq_len)

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return by_rows(lambda r: r @ self.transformer.wte.weight.T, h, False)
        return apply(self.lm_head, h)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **unused,
    ) -> DbrxOutput | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        c = self.config
        use_cache = c.use_cache if use_cache is None else use_cache
        output_router_logits = c.output_router_logits if output_router_logits is None else output_router_logits
        x = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape

        cache = past_key_values
        if use_cache and cache is None:
            cache = self.new_cache(B, T, dtype=x.dtype, device=x.device)
        start = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + T, device=x.device)[None].expand(B, T)
        cos, sin = rope_cos_sin(position_ids, c.head_dim, c.attn_config.rope_theta, x.dtype)
        mask = attention_mask_4d(attention_mask, B, T, start, x.device)

        hidden: list[torch.Tensor] = [x] if output_hidden_states else []
        router: list[torch.Tensor] = []
        for block in self.transformer.blocks:
            x, logits = block(x, cos, sin, mask, cache, start)
            router.append(logits)
            if output_hidden_states:
                hidden.append(x)
        x = self.transformer.norm_f(x)
        if output_hidden_states:
            hidden[-1] = x  # transformers reports the normed output as the last hidden state

        if isinstance(logits_to_keep, int):
            h = x[:, -logits_to_keep:] if logits_to_keep else x
        else:
            h = x[:, logits_to_keep]
        logits = self.logits_from_hidden(h)

        loss = None
        if labels is not None:
            # Shift so that token t predicts t+1; -100 is ignored (transformers' ForCausalLMLoss).
            shift = F.pad(labels, (0, 1), value=-100)[:, 1:].to(logits.device)
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shift.reshape(-1),
                                   ignore_index=-100)
        aux_loss = None
        if output_router_logits:
            am = attention_mask
            if am is not None and am.shape[1] != T:  # with a cache, only the new tokens were routed
                am = am[:, -T:]
            aux_loss = load_balancing_loss(tuple(router), c.num_experts, c.top_k, am)
            if loss is not None:
                loss = loss + c.ffn_config.moe_loss_weight * aux_loss
        out = DbrxOutput(loss=loss, aux_loss=aux_loss, logits=logits,
                         past_key_values=cache if use_cache else None,
                         hidden_states=tuple(hidden) if output_hidden_states else None,
                         router_logits=tuple(router) if output_router_logits else None)
        return out.to_tuple() if return_dict is False else out
