"""Tests of the KV cache flavours: int8 quantization error bound, memory (about half of bf16),
and the logits of a model decoding with an int8 cache within a derived tolerance of the float one."""

from __future__ import annotations

import pytest
import torch

from dbrxq.core.errors import ConfigError
from dbrxq.model.kv_cache import (
    Int8KVCache,
    StaticKVCache,
    kv_cache_bytes,
    make_kv_cache,
)
from dbrxq.runtime.generate import generate
from tests.conftest import build_tiny_model


def test_int8_roundtrip_error_bound():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 64) * torch.rand(2, 3, 5, 1) * 10
    x[0, 0, 0] = 0  # an all-zero row stays exactly zero
    q, s = Int8KVCache.quantize(x)
    err = (q.float() * s - x).abs()
    amax = x.abs().amax(-1, keepdim=True)
    assert bool((err <= amax / 254 * (1 + 1e-5) + 1e-12).all())  # half a step of amax/127
    assert torch.equal(q[0, 0, 0], torch.zeros(64, dtype=torch.int8))


def test_int8_cache_takes_about_half_of_bf16():
    # DBRX-like head_dim 128: (128 + 4) / 256 = 0.516
    bf16 = StaticKVCache(2, 1, 64, 8, 128, dtype=torch.bfloat16)
    int8 = Int8KVCache(2, 1, 64, 8, 128, dtype=torch.bfloat16)
    ratio = int8.nbytes() / bf16.nbytes()
    assert 0.5 < ratio < 0.52
    cfg = build_tiny_model().config
    for flavour in ("bf16", "int8"):
        c = make_kv_cache(cfg, 1, 16, flavour=flavour, dtype=torch.float32, device="cpu")
        assert c.nbytes() == kv_cache_bytes(cfg, 1, 16, flavour, torch.float32)


def test_update_returns_dequantized_prefix_and_grows():
    c = Int8KVCache(1, 1, 2, 2, 8)
    k = torch.randn(1, 2, 3, 8)
    kk, vv = c.update(k, -k, 0, 0)  # grows from 2 to 3 positions
    assert kk.shape == (1, 2, 3, 8) and c.get_seq_length() == 3
    assert (kk - k).abs().max() <= k.abs().max() / 254 * 1.0001


def test_int8_logits_within_derived_tolerance():
    """Each cached element moves by at most amax_row/254 (a relative 0.39% of its row's largest
    entry), once for K and once for V. To first order each layer's attention output then moves by
    at most ~2/254 of its scale, and the errors of n_layers layers add: so the logits may move by
    n_layers * 2/254 of their magnitude (max |logit|). The float32 cache is the reference."""
    model = build_tiny_model(seed=3)
    prompt = [[1, 7, 3, 9, 4, 22, 5]]
    ref = generate(model, prompt, max_new_tokens=6, kv_cache="bf16")  # 'bf16': the model's dtype
    got = generate(model, prompt, max_new_tokens=6, kv_cache="int8")
    assert got.sequences == ref.sequences  # greedy path unchanged on this tiny model
    ids = torch.tensor(prompt)
    c_ref, c_q = model.new_cache(1, 16), make_kv_cache(model.config, 1, 16, flavour="int8", dtype=model.dtype,
                                                       device="cpu")
    with torch.no_grad():
        model(ids, past_key_values=c_ref, use_cache=True)
        model(ids, past_key_values=c_q, use_cache=True)
        nxt = torch.tensor([[11]])
        a = model(nxt, past_key_values=c_ref, use_cache=True).logits
        b = model(nxt, past_key_values=c_q, use_cache=True).logits
    tol = model.config.n_layers * 2 / 254 * a.abs().max()
    assert (a - b).abs().max() <= tol
    assert (a - b).abs().max() > 0  # it really is quantized


def test_unknown_flavour():
    with pytest.raises(ConfigError, match="kv_cache='fp8'"):
        generate(build_tiny_model(), [[1, 2]], max_new_tokens=2, kv_cache="fp8")
