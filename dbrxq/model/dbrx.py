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
forward signatures. The MoE pieces are in dbrxq.model.moe, batch invariance in dbrxq.model.batch.
Loading lives in dbrxq.loading.loader, which registers ``from_pretrained`` (:func:`register_loader`):
the model core imports nothing above it.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass, fields
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dbrxq.model.batch import apply, by_rows
from dbrxq.model.config import DbrxConfig
from dbrxq.model.kv_cache import KVCache, StaticKVCache
from dbrxq.model.moe import DbrxFFN, load_balancing_loss


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
# RoPE
# --------------------------------------------------------------------------------------------
def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """The rotary tables for integer positions (B, T): cos and a sign-folded sin, each (B, T, 1, head_dim),
    computed in float32, for :func:`apply_rope` (made once per forward, shared by every layer)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                              device=position_ids.device) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    sin = freqs.sin()
    cos = torch.cat((freqs, freqs), dim=-1).cos()  # (B, T, hd)
    return cos.to(dtype)[:, :, None], torch.cat((-sin, sin), dim=-1).to(dtype)[:, :, None]


class RopeTables:
    """:func:`rope_cos_sin` for positions 0..n-1, made once per (device, dtype, head_dim, theta) and grown to the
    next power of two a position needs, up to ``limit`` (the model's max_seq_len); a forward indexes them (two
    gathers instead of the tables' ten operators: a decode step's tables took about a layer's fixed cost).
    Every position's values are the ones rope_cos_sin computes for it among 0..n-1, so a prompt and the same
    tokens decoded one at a time meet the same tables. Positions below 0 or from ``limit`` on get
    rope_cos_sin itself, and so does any device but the CPU (reading the largest position back would make
    the host wait for the device at every step)."""

    MIN = 256

    def __init__(self, limit: int):
        self.limit = limit
        self.key: tuple | None = None
        self.cos = self.sin = None

    def __call__(self, position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
        if position_ids.device.type != "cpu" or position_ids.numel() == 0:
            return rope_cos_sin(position_ids, head_dim, theta, dtype)
        lo, hi = (int(v) for v in torch.aminmax(position_ids))
        if lo < 0 or hi >= self.limit:
            return rope_cos_sin(position_ids, head_dim, theta, dtype)
        key = (dtype, head_dim, theta)
        if self.key != key or hi >= self.cos.shape[0]:
            n = min(max(self.MIN, 1 << hi.bit_length()), self.limit)
            cos, sin = rope_cos_sin(torch.arange(n)[None], head_dim, theta, dtype)
            self.cos, self.sin, self.key = cos[0], sin[0], key  # (n, 1, head_dim)
        return self.cos[position_ids], self.sin[position_ids]  # (B, T, 1, head_dim)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half RoPE, x (B, T, heads, hd) with :func:`rope_cos_sin`'s tables: x * cos +
    rotate_half(x) * sin, where rotate_half(x) = cat(-x2, x1) is ``roll(x) * [-1, 1]``, the sign folded
    into the table (the same values, bit for bit, in three ops)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


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
        qkv = apply(self.Wqkv, x)  # (B, T, d + 2*kv*hd), a fresh tensor
        if self.clip_qkv is not None:
            qkv.clamp_(min=-self.clip_qkv, max=self.clip_qkv)
        kv_dim = self.kv_heads * self.head_dim
        qk, v = qkv.split([self.d_model + kv_dim, kv_dim], dim=-1)
        qk = apply_rope(qk.view(B, T, self.n_heads + self.kv_heads, self.head_dim), cos, sin)  # q and k at once
        q = qk[:, :, :self.n_heads].transpose(1, 2)  # (B, H, T, hd)
        k = qk[:, :, self.n_heads:].transpose(1, 2)  # (B, kvH, T, hd)
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
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
        dbrxq.model.kv_cache.SlotView): each row attends over its own keys exactly as it would alone."""
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
        # the norms' forward called directly: nothing hooks them, and a module call per norm is part of
        # every layer's fixed cost (scripts/bench_layer_cost.py)
        x = x + self.attn(self.norm_1.forward(x), cos, sin, mask, cache, cache_position)
        return x, self.norm_2.forward(x)


# --------------------------------------------------------------------------------------------
# Mixture of experts
# --------------------------------------------------------------------------------------------


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


class DbrxForCausalLM(nn.Module):
    """DBRX with a language-model head; forward follows transformers' DbrxForCausalLM.

    Build it on the meta device and load weights with ``DbrxForCausalLM.from_pretrained``
    (dbrxq.loading.loader), or construct directly for training/testing.
    """

    def __init__(self, config: DbrxConfig):
        super().__init__()
        self.config = config
        self.transformer = DbrxModel(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size,
                                                                          bias=False)
        self.rope = RopeTables(config.max_seq_len)

    # the checkpoint loader (dbrxq.loading.loader.load_model), registered by it: the model imports nothing above it
    _loader: ClassVar[Callable[..., DbrxForCausalLM] | None] = None

    # transformers-style conveniences
    @classmethod
    def from_pretrained(cls, path_or_repo_id, **kwargs) -> DbrxForCausalLM:
        """Load a float or dbrxq-quantized checkpoint (a folder or hub repo id); keywords as
        dbrxq.loading.loader.load_model. Registered by that module, which ``import dbrxq`` loads."""
        if DbrxForCausalLM._loader is None:
            raise RuntimeError("no checkpoint loader is registered; use dbrxq.DbrxForCausalLM (import dbrxq), "
                               "whose import registers dbrxq.loading.loader")
        return DbrxForCausalLM._loader(path_or_repo_id, **kwargs)

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
        cos, sin = self.rope(position_ids, c.head_dim, c.attn_config.rope_theta, x.dtype)
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


@contextlib.contextmanager
def skip_init():
    """Within this block torch.nn.init's functions do nothing: modules built on the meta device (whose
    parameters the loader assigns from a checkpoint) skip their initializers. Without it, an embedding's
    ``normal_`` on meta goes through torch's dispatch and imports torch._dynamo: 1.6-1.8 s of every
    start-up (``python -m cProfile -m dbrxq.cli run``)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
             "trunc_normal_", "ones_", "zeros_", "constant_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def register_loader(fn: Callable[..., DbrxForCausalLM]) -> Callable[..., DbrxForCausalLM]:
    """Make ``fn(path_or_repo_id, **kwargs)`` what :meth:`DbrxForCausalLM.from_pretrained` calls (a
    decorator; dbrxq.loading.loader registers its load_model, as torchao registers its handlers)."""
    DbrxForCausalLM._loader = fn
    return fn
