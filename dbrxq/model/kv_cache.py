"""Preallocated key/value caches with a transformers-like interface.

A cache holds, per layer, K and V buffers of shape (B, kv_heads, capacity, head_dim) allocated
once. ``update(k, v, layer_idx, cache_position)`` writes the new positions in place and returns
views of everything cached so far: no per-step concatenation. ``generate`` sizes the cache to
prompt + max_new_tokens up front, so it never reallocates; a direct user of ``forward`` who keeps
feeding tokens past the capacity gets the buffers grown by doubling (amortised, like a vector),
never beyond ``max_capacity`` (the model's max_seq_len).

Memory: 2 * n_layers * B * kv_heads * capacity * head_dim * itemsize bytes; for DBRX in bf16
that is 160 KiB per token of capacity (docs/architecture.md, "Generation").

Flavours (``KV_FLAVOURS``, chosen by ``make_kv_cache`` / ``generate(kv_cache=...)``, never by the
model): ``"bf16"`` is :class:`StaticKVCache` in the model's activation dtype (bf16 for real DBRX
checkpoints), ``"int8"`` is :class:`Int8KVCache`: int8 codes plus one float32 scale per (token,
head), i.e. (head_dim + 4) / (2 * head_dim) = 0.516 of the bf16 bytes at head_dim 128.
Its cost: ``update`` quantizes only the new positions, but returns the WHOLE prefix dequantized
(one (B, kvH, S, hd) temporary per K and V, per layer, per step): that is a first version, O(S)
extra work per layer and step, small next to the O(S) attention itself; a fused int8 attention
kernel would remove it.
"""

from __future__ import annotations

from typing import Callable

import torch

from dbrxq.core.errors import ConfigError, GenerationError
from dbrxq.core.memory import check_allocation

KV_FLAVOURS = ("bf16", "int8")


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
        self._check_memory(2 * n_layers * batch_size * kv_heads * capacity * head_dim * dtype.itemsize, capacity)
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n_layers)]
        self.lengths = [0] * n_layers

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def _check_memory(self, nbytes: int, capacity: int) -> None:
        check_allocation(nbytes, self.device, f"a KV cache of {self.batch_size} sequence(s) x {capacity} positions", "ask for fewer sequences at once (--max-batch), a shorter --context, or "
                         "--kv-cache int8", error=GenerationError)

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

    def _reserve(self, k: torch.Tensor, cache_position: int) -> int:
        """Make room for k's T positions from cache_position; returns the end position."""
        end = cache_position + k.shape[2]
        assert k.shape[0] == self.batch_size, (k.shape, self.batch_size)
        if end > self.capacity:
            self._grow(end)
        return end

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, cache_position: int):
        """k, v (B, kvH, T, hd) for positions cache_position .. +T -> all cached (B, kvH, S, hd)."""
        end = self._reserve(k, cache_position)
        kc, vc = self.k[layer_idx], self.v[layer_idx]
        kc[:, :, cache_position:end] = k
        vc[:, :, cache_position:end] = v
        self.lengths[layer_idx] = end
        return kc[:, :, :end], vc[:, :, :end]

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

    def _row_end(self, row: int, pos: int, k: torch.Tensor) -> int:
        end = pos + k.shape[2]
        if end > self.capacity:
            raise GenerationError(f"sequence of {end} tokens exceeds its cache slot of {self.capacity} positions")
        assert 0 <= row < self.batch_size and k.shape[0] == 1, (row, k.shape)
        return end

    def write_row(self, layer_idx: int, row: int, pos: int, k: torch.Tensor, v: torch.Tensor):
        """One sequence's k, v (1, kvH, T, hd) at positions pos.. of batch row ``row`` -> that row's
        cached (1, kvH, pos + T, hd), as :meth:`update` returns for a batch of one (a slot of a
        :class:`SlotPool`; the shared ``lengths`` are not used)."""
        end = self._row_end(row, pos, k)
        self.k[layer_idx][row:row + 1, :, pos:end] = k
        self.v[layer_idx][row:row + 1, :, pos:end] = v
        return self.k[layer_idx][row:row + 1, :, :end], self.v[layer_idx][row:row + 1, :, :end]


class Int8KVCache(StaticKVCache):
    """K/V stored as int8 with per-token, per-head scales (symmetric absmax over head_dim).

    Buffers per layer: codes int8 (B, kvH, capacity, hd) and scales float32 (B, kvH, capacity, 1)
    for K and for V. Quantization: s = max|x| / 127 over head_dim, q = round(x / s) in -127..127,
    x' = q * s, so |x - x'| <= s / 2 = max|x| / 254 per element (relative error <= 0.4% of the
    row's absmax). ``update`` returns dequantized K/V in the activation dtype (see module doc).
    """

    def __init__(self, n_layers: int, batch_size: int, capacity: int, kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 max_capacity: int | None = None):
        self.n_layers, self.batch_size = n_layers, batch_size
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)  # dtype: what update() returns
        self.max_capacity = max_capacity
        self._check_capacity(capacity)
        shape = (batch_size, kv_heads, capacity, head_dim)
        sshape = shape[:3] + (1,)
        self._check_memory(2 * n_layers * batch_size * kv_heads * capacity * (head_dim + 4), capacity)
        self.k = [torch.zeros(shape, dtype=torch.int8, device=self.device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=torch.int8, device=self.device) for _ in range(n_layers)]
        self.k_scale = [torch.zeros(sshape, dtype=torch.float32, device=self.device) for _ in range(n_layers)]
        self.v_scale = [torch.zeros(sshape, dtype=torch.float32, device=self.device) for _ in range(n_layers)]
        self.lengths = [0] * n_layers

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v + self.k_scale + self.v_scale)

    def _grow(self, needed: int) -> None:
        self._check_capacity(needed)
        new_cap = max(needed, 2 * self.capacity)
        if self.max_capacity is not None:
            new_cap = min(new_cap, self.max_capacity)
        for bufs in (self.k, self.v, self.k_scale, self.v_scale):
            for i, old in enumerate(bufs):
                new = old.new_zeros(old.shape[:2] + (new_cap,) + old.shape[3:])
                new[:, :, : old.shape[2]] = old
                bufs[i] = new

    @staticmethod
    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., hd) -> (codes int8 (..., hd), scale float32 (..., 1)); all-zero rows get scale 0."""
        x = x.float()
        scale = x.abs().amax(dim=-1, keepdim=True) / 127.0
        q = torch.where(scale > 0, x / torch.where(scale > 0, scale, 1.0), 0.0)
        return q.round().clamp(-127, 127).to(torch.int8), scale

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, cache_position: int):
        """k, v (B, kvH, T, hd) -> all cached positions dequantized, (B, kvH, S, hd) in self.dtype."""
        end = self._reserve(k, cache_position)
        for codes, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, s = self.quantize(x)
            codes[layer_idx][:, :, cache_position:end] = q
            scales[layer_idx][:, :, cache_position:end] = s
        self.lengths[layer_idx] = end
        out = []
        for codes, scales in ((self.k, self.k_scale), (self.v, self.v_scale)):
            out.append((codes[layer_idx][:, :, :end].float() * scales[layer_idx][:, :, :end]).to(self.dtype))
        return out[0], out[1]

    def write_row(self, layer_idx: int, row: int, pos: int, k: torch.Tensor, v: torch.Tensor):
        """As StaticKVCache.write_row, dequantized as :meth:`update` returns them."""
        end = self._row_end(row, pos, k)
        for codes, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            q, s = self.quantize(x)
            codes[layer_idx][row:row + 1, :, pos:end] = q
            scales[layer_idx][row:row + 1, :, pos:end] = s
        return tuple((codes[layer_idx][row:row + 1, :, :end].float() * scales[layer_idx][row:row + 1, :, :end])
                     .to(self.dtype) for codes, scales in ((self.k, self.k_scale), (self.v, self.v_scale)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for bufs in (self.k, self.v, self.k_scale, self.v_scale):
            for i, t in enumerate(bufs):
                bufs[i] = t.index_select(0, beam_idx.to(t.device))


class SlotPool:
    """A preallocated cache of ``cache.batch_size`` slots, one sequence per slot, each with its own
    length: what a server decoding several requests together keeps (dbrxq.serve.engine). Nothing is
    allocated after construction; a slot is reused by the next request once released."""

    def __init__(self, cache: StaticKVCache):
        self.cache = cache
        self.length = [0] * cache.batch_size
        self.free = list(range(cache.batch_size - 1, -1, -1))

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def acquire(self) -> int | None:
        if not self.free:
            return None
        slot = self.free.pop()
        self.length[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        assert slot not in self.free, slot
        self.length[slot] = 0
        self.free.append(slot)

    def view(self, slots: list[int]) -> SlotView:
        return SlotView(self, slots)


class SlotView:
    """The cache the model sees for one forward over rows that are different sequences (row i in
    ``slots[i]``): attention asks it row by row (``per_row``, dbrxq.model.dbrx.DbrxAttention); the new
    positions start at each slot's length and count once :meth:`commit` runs after the forward."""

    per_row = True

    def __init__(self, pool: SlotPool, slots: list[int]):
        self.pool, self.slots = pool, list(slots)
        self.start = [pool.length[s] for s in self.slots]
        self.added = 0

    def update_row(self, i: int, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        self.added = k.shape[2]
        return self.pool.cache.write_row(layer_idx, self.slots[i], self.start[i], k, v)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start[0] if len(self.slots) == 1 else 0  # per-row lengths: the caller passes positions

    def commit(self) -> None:
        for s, start in zip(self.slots, self.start):
            self.pool.length[s] = start + self.added


def kv_cache_bytes(config, batch_size: int, length: int, flavour: str, dtype: torch.dtype) -> int:
    """Bytes a cache of ``flavour`` takes for ``length`` positions (what make_kv_cache allocates)."""
    per_row = config.kv_n_heads * config.head_dim  # one layer, one token, K or V
    if flavour == "int8":
        per_row += config.kv_n_heads * 4  # one float32 scale per head
    else:
        per_row *= torch.empty(0, dtype=dtype).element_size()
    return 2 * config.n_layers * batch_size * length * per_row


def check_flavour(flavour: str) -> str:
    if flavour not in KV_FLAVOURS:
        raise ConfigError(f"kv_cache={flavour!r}: choose one of {', '.join(KV_FLAVOURS)}")
    return flavour


def make_kv_cache(config, batch_size: int, length: int, *, flavour: str = "bf16", dtype: torch.dtype,
                  device: torch.device | str) -> StaticKVCache:
    """A cache of ``flavour`` for a model with ``config`` (duck-typed: n_layers, kv_n_heads, head_dim,
    max_seq_len); ``dtype`` is the model's activation dtype."""
    cls = Int8KVCache if check_flavour(flavour) == "int8" else StaticKVCache
    return cls(config.n_layers, batch_size, length, config.kv_n_heads, config.head_dim, dtype=dtype,
               device=device, max_capacity=config.max_seq_len)


def cache_factory(model, flavour: str = "bf16") -> Callable[[int, int], StaticKVCache]:
    """``factory(batch_size, length)`` making ``flavour`` caches for ``model`` (what generate calls)."""
    check_flavour(flavour)
    if flavour == "bf16":
        return model.new_cache
    return lambda batch_size, length: make_kv_cache(model.config, batch_size, length, flavour=flavour,
                                                    dtype=model.dtype, device=model.device)
