"""Model pieces checked against plain float computations (the whole model is checked against
transformers in test_parity.py)."""

import pytest
import torch

from dbrxq.core.errors import GenerationError
from dbrxq.model.dbrx import RopeTables, causal_attention, rope_cos_sin
from dbrxq.model.moe import down_proj, moe_dispatch, route


def test_route_softmax_topk_and_l1_normalisation():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0]])
    w, ids = route(logits, 2, 1.0)
    p = torch.softmax(logits, -1)
    assert ids.tolist() == [[0, 1], [2, 3]]
    expected = torch.stack([p[0, [0, 1]], p[1, [2, 3]]])
    assert torch.allclose(w, expected / expected.sum(-1, keepdim=True))
    w_raw, _ = route(logits, 2, None)
    assert torch.allclose(w_raw, expected)


def test_moe_dispatch_equals_per_token_loop():
    torch.manual_seed(0)
    N, D, E, k = 37, 8, 5, 3
    x = torch.randn(N, D)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    w = torch.rand(N, k)
    mats = torch.randn(E, D, D)
    got = moe_dispatch(x, ids, w, E, lambda e, xe: xe @ mats[e])
    ref = torch.stack([sum(w[n, j] * (x[n] @ mats[ids[n, j]]) for j in range(k)) for n in range(N)])
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3])
def test_bf16_down_projection_equals_float(rows):
    torch.manual_seed(0)
    h = torch.randn(rows, 64).bfloat16()
    w2 = torch.randn(64, 48).bfloat16()
    ref = h.float() @ w2.float()
    got = down_proj(h, w2)
    assert got.dtype == torch.bfloat16 and got.shape == ref.shape
    # one bf16 rounding of the result (rel 2^-8) plus bf16 accumulation differences in mv
    assert (got.float() - ref).abs().max() <= 2 ** -7 * ref.abs().max()


def test_bf16_model_tracks_float32(tiny_model):
    m = tiny_model(1)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = m(ids).logits
    m16 = tiny_model(1).to(torch.bfloat16)
    got = m16(ids).logits.float()
    # bf16 keeps 8 bits of mantissa; two layers of rounding leave a few percent of the logit scale
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


def test_cache_refuses_to_grow_past_context(tiny_model):
    m = tiny_model()
    cache = m.new_cache(1, 8)
    ids = torch.randint(0, 50, (1, 30))
    m(ids, past_key_values=cache)
    with pytest.raises(GenerationError, match="exceeds the model's context"):
        m(torch.randint(0, 50, (1, 11)), past_key_values=cache)


def test_cache_crop_and_reorder(tiny_model):
    m = tiny_model()
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(3))
    cache = m.new_cache(2, 16)
    m(ids[:, :6], past_key_values=cache)
    m(ids[:, 6:8], past_key_values=cache)
    cache.crop(6)  # forget positions 6, 7 and redo them: same logits as the first time
    again = m(ids[:, 6:], past_key_values=cache).logits
    assert torch.allclose(again, m(ids).logits[:, 6:], atol=1e-5)
    cache.reorder_cache(torch.tensor([1, 0]))
    assert cache.get_seq_length() == 10
    assert cache.nbytes() == 2 * 2 * 2 * 2 * 16 * 8 * 4  # layers*(k,v)*B*kvH*cap*hd*fp32


def test_router_logits_and_hidden_state_shapes(tiny_model):
    m = tiny_model()
    out = m(torch.randint(0, 50, (3, 5)), output_router_logits=True, output_hidden_states=True)
    assert [r.shape for r in out.router_logits] == [(15, 8)] * 2
    assert len(out.hidden_states) == 3 and out.hidden_states[0].shape == (3, 5, 32)
    assert out.aux_loss is not None and out.loss is None


@pytest.mark.parametrize("past", [0, 1, 7, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_attention_without_a_mask_equals_the_masked_reference(past, dtype):
    """Unpadded prefill attends causally without building a (T, S) mask: SDPA's causal path for
    the first chunk, and for a later chunk (past > 0) the past and the chunk as two exact parts
    merged by their log-sum-exp. Against float64 softmax attention with the explicit causal mask
    (queries at past..past+T-1), with grouped kv heads."""
    g = torch.Generator().manual_seed(past)
    T, H, kvH, hd = 9, 8, 2, 16
    q = torch.randn(2, H, T, hd, generator=g)
    k, v = torch.randn(2, kvH, past + T, hd, generator=g), torch.randn(2, kvH, past + T, hd, generator=g)
    allowed = torch.arange(past + T)[None, :] <= torch.arange(past, past + T)[:, None]
    kd, vd = (t.double().repeat_interleave(H // kvH, dim=1) for t in (k, v))
    scores = (q.double() @ kd.transpose(-1, -2)) / hd ** 0.5
    ref = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ vd
    got = causal_attention(q.to(dtype), k.to(dtype), v.to(dtype), past, True)
    assert got.dtype == dtype and got.shape == ref.shape
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (got.double() - ref).abs().max() <= tol


def test_chunked_prefill_equals_one_pass(tiny_model):
    """A prompt prefilled in chunks (later chunks attend to the cache without a mask) gives the
    logits of one full forward."""
    from dbrxq.runtime.generate import prefill

    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
    for chunk in (5, 8, 23):
        cache = model.new_cache(2, 23)
        with torch.no_grad():
            got = prefill(model, ids, torch.ones_like(ids), cache, chunk_size=chunk)
        assert torch.allclose(got, full, atol=1e-5, rtol=1e-5), chunk


def test_rope_tables_are_rope_cos_sin_at_every_position():
    """The cached tables give each position exactly what rope_cos_sin computes for it, through growth, a
    change of dtype, negative positions and positions past the limit (both computed directly)."""
    tables = RopeTables(limit=4096)
    for pos, dtype in (([[0, 1, 2]], torch.float32), ([[7], [300]], torch.float32), ([[1000, 5]], torch.bfloat16),
                       ([[-3, 4]], torch.bfloat16), ([[5000, 2]], torch.bfloat16), ([[2**40]], torch.float32)):
        p = torch.tensor(pos)
        got, want = tables(p, 32, 500000.0, dtype), rope_cos_sin(p, 32, 500000.0, dtype)
        assert all(g.shape == w.shape and g.dtype == dtype and torch.equal(g, w) for g, w in zip(got, want))
    assert tables.cos.shape[0] == 1024  # grown to the power of two that held position 1000, never past the limit
