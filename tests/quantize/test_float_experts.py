"""The float experts' one-call C kernel (quantize/csrc/fmoe.c via quantize.float_experts) against a float64
reference of DBRX's MoE, on every kernel path this CPU runs.

Tolerance, derived: every value is float32; a hidden value h_f = silu(a) * b has a and b dot products
of length D (relative error <= D u of the sum of absolute products, u = 2**-24), the down projection a
length-F sum, the routed sum K more roundings. So |y - y_ref| <= (D + F + K + 8) u * S per output, S
the same computation on absolute values (|x| through |w1|, |v1|, |silu(a) b|, |w2|, |weights|); the
tests take 2x that bound.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dbrxq.model.config import DbrxConfig, FfnConfig
from dbrxq.model.moe import DbrxExperts
from quantize import cext
from quantize.float_experts import FloatMoE, use_float_kernel

pytestmark = pytest.mark.skipif(cext.load() is None, reason="dbrxq's C kernel could not be built here")
U = 2.0**-24


def experts(d: int, f: int, e: int, dtype: torch.dtype, seed: int = 0) -> DbrxExperts:
    config = DbrxConfig(d_model=d, n_heads=2, n_layers=1, vocab_size=32,
                        ffn_config=FfnConfig(ffn_hidden_size=f, moe_num_experts=e, moe_top_k=2))
    m = DbrxExperts(config)
    g = torch.Generator().manual_seed(seed)
    for p in (m.mlp.w1, m.mlp.v1, m.mlp.w2):
        p.data = (torch.randn(p.shape, generator=g) / d**0.5).to(dtype)
    return m


def routing(n: int, k: int, e: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])
    w = torch.rand(n, k, generator=g)
    return ids, w / w.sum(-1, keepdim=True)


def reference(m: DbrxExperts, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, absolute: bool = False):
    """The MoE in float64 (``absolute``: every term's magnitude, the bound's S)."""
    E, Fh, D = m.num_experts, m.ffn_hidden_size, x.shape[-1]
    w1, v1, w2 = (p.detach().double().view(E, Fh, D) for p in (m.mlp.w1, m.mlp.v1, m.mlp.w2))
    xd = x.double()
    out = torch.zeros(x.shape[0], D, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if absolute:
                a, b = xd[t].abs() @ w1[e].abs().T, xd[t].abs() @ v1[e].abs().T
                h = (F.silu(xd[t] @ w1[e].T) * (xd[t] @ v1[e].T)).abs() + a * b  # the product's own terms too
                out[t] += float(w[t, j]) * (h @ w2[e].abs())
            else:
                out[t] += float(w[t, j]) * ((F.silu(xd[t] @ w1[e].T) * (xd[t] @ v1[e].T)) @ w2[e])
    return out


@pytest.mark.parametrize("path", cext.runnable_paths())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d,f", [(128, 96), (48, 40)])  # D a multiple of 64 (the SIMD path), and not
def test_matches_the_float64_moe(path, dtype, d, f):
    m = experts(d, f, 6, dtype)
    kernel = FloatMoE(m, cext.load(), path)
    for n, k in ((1, 2), (5, 3), (9, 1)):
        ids, w = routing(n, k, 6, seed=n)
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(n)).to(dtype)
        y = kernel(x, ids, w)
        assert y is not None and y.dtype == dtype and y.shape == (n, d)
        y32 = kernel(x.float(), ids, w)  # the kernel's own float32 result, before the cast to x's dtype
        ref, s = reference(m, x, ids, w), reference(m, x, ids, w, absolute=True)
        bound = 2 * (d + f + k + 8) * U * s
        assert ((y32.double() - ref).abs() <= bound).all(), ((y32.double() - ref).abs() / s).max()
        assert torch.equal(y, y32.to(dtype))


@pytest.mark.parametrize("path", cext.runnable_paths())
def test_rows_and_slot_order_do_not_change_the_bits(path):
    m = experts(128, 64, 8, torch.bfloat16)
    kernel = FloatMoE(m, cext.load(), path)
    ids, w = routing(7, 4, 8)
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    y = kernel(x, ids, w)
    for i in range(7):  # a row alone, as a batch of one computes it
        assert torch.equal(kernel(x[i:i + 1], ids[i:i + 1], w[i:i + 1]), y[i:i + 1])
    perm = torch.tensor([2, 0, 3, 1])  # each token's slots in another order: summed in expert id all the same
    assert torch.equal(kernel(x, ids[:, perm], w[:, perm]), y)
    # the torch path sums in the same order (increasing expert id) with the same float32 products
    assert (kernel(x.float(), ids, w) - m.gathered(x.float(), ids, w)).abs().max() <= 1e-5


def test_threads_split_rows_never_sums():
    """Above the size where threads wake (F * D >= 2**20), two threads give one thread's bits."""
    m = experts(1024, 1024, 2, torch.bfloat16)
    kernel = FloatMoE(m, cext.load(), cext.cpu_path())
    ids, w = routing(2, 1, 2)
    x = torch.randn(2, 1024, generator=torch.Generator().manual_seed(4))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(x, ids, w)
        torch.set_num_threads(2)
        two = kernel(x, ids, w)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_what_it_does_not_take_falls_back_to_torch():
    m = experts(64, 32, 4, torch.float16)  # a dtype the kernel does not read
    kernel = FloatMoE(m, cext.load(), cext.cpu_path())
    ids, w = routing(2, 2, 4)
    assert kernel(torch.randn(2, 64, dtype=torch.float16), ids, w) is None
    m = experts(64, 32, 4, torch.float32)
    kernel = FloatMoE(m, cext.load(), cext.cpu_path())
    assert kernel(torch.randn(2, 64), ids + 4, w) is None  # an expert id outside [0, E): refused by the kernel
    m.fused = kernel
    with pytest.raises(IndexError):  # and the torch path then says so
        m(torch.randn(2, 64), ids + 4, w)
    assert kernel(torch.randn(2, 48), ids, w) is None  # x of another width: never read past the weights




def test_the_loader_gives_float_experts_the_kernel():
    """The loader's wiring: every float layer of a CPU model steps through the kernel (the numbers are the
    tests above)."""
    import dbrxq
    model = dbrxq.load(None).model  # the embedded demo: float bf16
    layers = [m for m in model.modules() if type(m) is DbrxExperts]
    assert layers and all(isinstance(m.fused, FloatMoE) for m in layers)
    calls = []
    for m in layers:
        m.fused = (lambda f: lambda *a: calls.append(f(*a)) or calls[-1])(m.fused)
    with torch.no_grad():
        model(torch.tensor([[5, 9, 17, 33]]))  # a prompt: 4 tokens, small enough for the one-call path
        model(torch.tensor([[5]]))
    assert len(calls) == 2 * len(layers) and all(c is not None for c in calls)
    assert use_float_kernel(model) == len(layers)
