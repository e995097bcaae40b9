"""Preallocated key/value caches with a transformers-like interface.

A cache holds, per layer, K and V buffers of shape (B, kv_heads, capacity, head_dim) allocated
once. ``update(k, v, layer_idx, cache_position)`` writes the new positions in place and returns
views of everything cached so far: no per-step concatenation. ``generate`` sizes the cache to
prompt + max_new_tokens up front, so it never reallocates; a direct user of ``forward`` who keeps
feeding tokens past the capacity gets the buffers grown by doubling (amortised, like a vector),
never beyond ``max_capacity`` (the model's max_seq_len).

Memory: 2 * n_layers * B * kv_heads * capacity * head_dim * itemsize bytes; for DBRX in bf16
that is 160 KiB per token of capacity (DESIGN.md section 2).
"""

from __future__ import annotations

import torch

from .errors import GenerationError


class KVCache:
    """The interface the model relies on (duck-typed; StaticKVCache is the implementation)."""

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, cache_position: int):
        raise NotImplementedError

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise NotImplementedError


class StaticKVCache(KVCache):
    def __init__(self, n_layers: int, batch_size: int, capacity: int, kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 max_capacity: int | None = None):
        self.n_layers, self.batch_size = n_layers, batch_size
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.max_capacity = max_capacity
        self._check_capacity(capacity)
        shape = (batch_size, kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n_layers)]
        self.lengths = [0] * n_layers

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def _check_capacity(self, needed: int) -> None:
        if self.max_capacity is not None and needed > self.max_capacity:
            raise GenerationError(f"sequence of {needed} tokens exceeds the model's context "
                                  f"(max_seq_len = {self.max_capacity})")

    def _grow(self, needed: int) -> None:
        self._check_capacity(needed)
        new_cap = max(needed, 2 * self.capacity)
        if self.max_capacity is not None:
            new_cap = min(new_cap, self.max_capacity)
        for bufs in (self.k, self.v):
            for i, old in enumerate(bufs):
                new = old.new_zeros(old.shape[:2] + (new_cap,) + old.shape[3:])
                new[:, :, : old.shape[2]] = old
                bufs[i] = new

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, cache_position: int):
        """k, v (B, kvH, T, hd) for positions cache_position .. +T -> all cached (B, kvH, S, hd)."""
        T = k.shape[2]
        end = cache_position + T
        assert k.shape[0] == self.batch_size, (k.shape, self.batch_size)
        if end > self.capacity:
            self._grow(end)
        self.k[layer_idx][:, :, cache_position:end] = k
        self.v[layer_idx][:, :, cache_position:end] = v
        self.lengths[layer_idx] = end
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def get_max_cache_shape(self) -> int:
        return self.capacity

    def crop(self, max_length: int) -> None:
        """Forget everything after the first max_length positions (cheap: lengths only)."""
        self.lengths = [min(n, max_length) for n in self.lengths]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for bufs in (self.k, self.v):
            for i, t in enumerate(bufs):
                bufs[i] = t.index_select(0, beam_idx.to(t.device))

    def reset(self) -> None:
        self.lengths = [0] * self.n_layers
