"""Tests of quantize/kernels.py: every available backend against the float reference
(dequantize per format.py, then a float64 matmul), with tolerances DERIVED per backend below.

Notation: y_ref = x @ W^T in float64, S = |x| @ |W|^T (the sum of absolute products, [M, N]),
u = 2**-24 (float32 unit roundoff), gamma_K = K * u (bound on a length-K float32 dot product's
relative rounding error w.r.t. S, first order).
"""

from __future__ import annotations

import pytest
import torch

from dbrxq.core.errors import QuantizationError
from quantize import cext, kernels
from quantize.primitives import quantize_tensor

N, K = 48, 256  # N % 16 == 0 (torch_int4), K % 64 == 0 (cpu_q4); small so the suite is fast
ROWS = (1, 3, 16, 77)  # decode, odd, a tile multiple, an odd prefill size
U = 2.0**-24
# NF4 codebook (bitsandbytes): the widest gap is -1 -> -0.6962, so rounding moves a value by at
# most 0.1519 * absmax of its 64-block.
NF4_HALF_GAP = 0.152


def _cpu(bits: int) -> str:
    """dbrxq's C backend for ``bits``: cpu_q8, else cpu_q4 (2-, 3- and 4-bit codes, each in its own layout)."""
    return "cpu_q8" if bits == 8 else "cpu_q4"


def _qt(bits, group_size, symmetric, n=N, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize_tensor(torch.randn(n, k, generator=g), bits, group_size, symmetric)


def _x(m, k=K, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, 5] *= 20  # one outlier column: blocks with a large activation scale
    return x


def _act_quant_bound(x, w, span=32):
    """cpu_q*: activations quantized with d = amax / 127 per span of values (32, or 128 for
    int4 with groups a multiple of 128: PreparedWeight.act_span), q = round(x / d), so
    |x - d q| <= d / 2 per element; the code products are exact integers. Hence
    |y - y_ref| <= sum_k |W[n, k]| * d(m, k) / 2, plus float32 accumulation (gamma_K * S, twice
    for the two-level sums over blocks and groups)."""
    m, k = x.shape
    d = x.abs().reshape(m, k // span, span).amax(-1) / 127  # [M, K/span]
    half = d.repeat_interleave(span, dim=1) / 2  # [M, K]
    return half.double() @ w.abs().double().t()


def _int4_terms(qt) -> torch.Tensor:
    """[N, K] |q - 8| s + |8 - z| s: the two terms torch's int4 kernel adds, (q - 8) s + (8 - z) s, each
    rounded to bf16 (2- and 3-bit codes widened: z is their zero, so the terms can far exceed |W|)."""
    q = qt.codes().double()
    z = (qt.qzeros.double() if qt.qzeros is not None else torch.full_like(qt.scales.double(), 2 ** (qt.bits - 1)))
    g = qt.shape[-1] // qt.scales.shape[-1]
    s, z = qt.scales.double().abs().repeat_interleave(g, 1), z.repeat_interleave(g, 1)  # signed when symmetric
    return ((q - 8).abs() + (8 - z).abs()) * s


def _tolerance(backend, x, w, y_ref, dtype, bits, span=32, qt=None):
    s = x.abs().double() @ w.abs().double().t()  # S [M, N]
    gamma = 4 * K * U * s + 1e-6
    if backend in ("torch", "torch_int8", "torch_int4") and dtype == torch.float32:
        return gamma  # exact dequantization, float32 accumulation only
    if backend == "torch_int4":  # bf16: x, both terms of the dequantized weight, the weight and the output rounded
        return 2.0**-8 * (s + x.abs().double() @ _int4_terms(qt).t() + s) + 2.0**-8 * y_ref.abs() + gamma
    if backend in ("cpu_q4", "cpu_q8"):
        extra = 2.0**-8 * y_ref.abs() if dtype == torch.bfloat16 else 0.0  # bf16 output
        return _act_quant_bound(x, w, span) + gamma + extra
    if backend == "bnb" and bits == 4:
        absmax = w.abs().reshape(w.shape[0], -1, 64).amax(-1).repeat_interleave(64, dim=1)  # [N, K]
        return NF4_HALF_GAP * (x.abs().double() @ absmax.double().t()) + gamma
    # bnb int8 (vector-wise): W per row with s_w = rowmax/127, x per row with s_x = rowmax/127:
    # |err| <= sum_k (|x| s_w/2 + |W| s_x/2 + s_x s_w/4); output may pass through fp16 (2^-11).
    sw = w.abs().amax(1).double() / 127  # [N]
    sx = x.abs().amax(1, keepdim=True).double() / 127  # [M, 1]
    xs, ws = x.abs().double().sum(1, keepdim=True), w.abs().double().sum(1)
    return xs * sw / 2 + ws * sx / 2 + K * sx * sw / 4 + 2.0**-10 * y_ref.abs() + gamma


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group_size", (32, 64, 128, -1))
@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize("backend", kernels.BACKENDS)
def test_backend_matches_reference(bits, group_size, symmetric, backend):
    qt = _qt(bits, group_size, symmetric)
    why = kernels.backend_support(backend, "cpu", bits, group_size, shape=(N, K), symmetric=symmetric)
    if why is not None:
        with pytest.raises(QuantizationError, match=backend):
            kernels.prepare(qt, backend, "cpu")
        pytest.skip(f"{backend}: {why}")
    w = qt.dequantize(torch.float32)
    pw = kernels.prepare(qt, backend, "cpu")
    assert pw.backend == backend and pw.shape == (N, K)
    dtypes = [torch.float32] + ([torch.bfloat16] if backend in ("torch_int4", "cpu_q4", "cpu_q8") else [])
    for dtype in dtypes:
        for m in ROWS:
            x = _x(m).to(dtype)
            y = pw.matmul(x)
            assert y.shape == (m, N) and y.dtype == dtype
            xf = x.float()
            y_ref = xf.double() @ w.double().t()
            err = (y.double() - y_ref).abs()
            tol = _tolerance(backend, xf, w, y_ref, dtype, bits, getattr(pw, "act_span", 32), qt)
            assert (err <= tol).all(), (backend, dtype, m, float((err - tol).max()), float(err.max()))


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_cpu_kernel_exact_emulation_and_paths_agree(bits):
    """The C kernel equals (dequantized int8 activations) @ W^T up to float rounding, on the
    generic scalar path and on the SIMD paths this CPU has (avx2, avx512), for odd row counts. The
    activation span is 32 values, or 128 for int4 with groups a multiple of 128 (G = 128 and
    per-channel G = 384 below), which takes the AVX2 path's line-at-a-time loop."""
    if cext.unavailable_reason():
        pytest.skip(cext.unavailable_reason())
    backend = _cpu(bits)
    # K = 192: 3 superblocks; N = 40: not a multiple of 16
    for gs, sym, k in ((32, False, 192), (64, True, 192), (-1, False, 192), (128, False, 384), (-1, True, 384)):
        qt = _qt(bits, gs, sym, n=40, k=k)
        w = qt.dequantize(torch.float32)
        paths = cext.runnable_paths()
        pws = [kernels.prepare(qt, backend, "cpu", cpu_path=p) for p in paths]
        span = pws[0].act_span
        assert span == (128 if bits == 4 and (gs if gs > 0 else k) % 128 == 0 else 32)
        x = _x(5, k=k)
        amax = x.abs().reshape(5, -1, span).amax(-1, keepdim=True)  # same float32 ops as the C code
        d = amax / 127
        xq = torch.where(amax > 0, torch.round(x.reshape(5, -1, span) * (127 / amax)), 0).clamp(-127, 127)
        y_emul = ((xq * d).reshape(5, k).double() @ w.double().t())
        s = x.abs().double() @ w.abs().double().t()
        outs = [pw.matmul(x) for pw in pws]
        for p, y in zip(paths, outs):
            assert ((y.double() - y_emul).abs() <= 4 * k * U * s + 1e-6).all(), (p, gs, sym, k)
        for y in outs[1:]:
            assert ((outs[0] - y).double().abs() <= 4 * k * U * s + 1e-6).all()


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
def test_cpu_kernel_rounds_activation_ties_half_to_even(bits):
    """Activation quantization on both C paths rounds x / d half to even, like torch.round.
    Every block holds 127 (so d = 1 exactly) and half-integers, so each value is a tie: a path
    rounding ties away from zero (or off by one code) is off by |W[n, k]| per tie, far above
    the float tolerance."""
    if cext.unavailable_reason():
        pytest.skip(cext.unavailable_reason())
    for gs, k in ((64, 192), (128, 256)):  # activation spans of 32 and (int4) 128 values
        qt = _qt(bits, gs, True, n=40, k=k)
        w = qt.dequantize(torch.float64)
        g = torch.Generator().manual_seed(5)
        x = (torch.randint(-126, 126, (3, k), generator=g) + 0.5).float()
        x[:, ::32] = 127.0
        xq = torch.round(x.double())  # half to even: 2.5 -> 2, -3.5 -> -4
        assert (xq != torch.trunc(x.double()) + torch.sign(x.double())).any()  # ties do occur
        y_emul = xq @ w.t()
        s = x.abs().double() @ w.abs().t()
        paths = cext.runnable_paths()
        for p in paths:
            y = kernels.prepare(qt, _cpu(bits), "cpu", cpu_path=p).matmul(x).double()
            assert ((y - y_emul).abs() <= 4 * k * U * s + 1e-6).all(), (p, gs)


def test_leading_dims_and_glu():
    qts = [_qt(4, 64, True, n=64, k=128, seed=s) for s in (1, 2)] + [_qt(4, 64, True, n=128, k=64, seed=3)]
    x = _x(6, k=128).reshape(2, 3, 128)
    for backend in kernels.available_backends("cpu", 4, 64, shape=(64, 128)):
        if backend == "bnb":
            continue
        w1, v1, w2 = (kernels.prepare(q, backend) for q in qts)
        y = kernels.glu(x, w1, v1, w2)
        assert y.shape == (2, 3, 128)
        a, b, c = (q.dequantize().double() for q in qts)
        xd = x.double()
        ref = (torch.nn.functional.silu(xd @ a.t()) * (xd @ b.t())) @ c.t()
        assert torch.allclose(y.double(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item()), backend


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("group_size, symmetric", ((32, False), (128, True), (-1, True)))
def test_fused_glu_matches_three_matmuls_and_the_float_expert(bits, group_size, symmetric):
    """kernels.glu with three cpu_q* weights runs ONE C call (dbrxq_glu). Against the three
    separate kernel matmuls it differs only through silu's last bits (libm's expf in C, torch's
    otherwise): float rounding, plus one int8 code d_h(k) for each hidden value that sits
    within a hair of a rounding tie (times |W2[n, k]|). Against the float expert (float64, dequantized weights)
    the activation-quantization errors of both layers propagate through silu (|silu'| < 1.1)."""
    if cext.unavailable_reason():
        pytest.skip(cext.unavailable_reason())
    d, f = 128, 384  # multiples of the largest group size; ROWS include odd counts
    qts = [_qt(bits, group_size, symmetric, n=f, k=d, seed=1), _qt(bits, group_size, symmetric, n=f, k=d, seed=2),
           _qt(bits, group_size, symmetric, n=d, k=f, seed=3)]
    w1, v1, w2 = (q.dequantize(torch.float32) for q in qts)
    paths = cext.runnable_paths()
    for path in paths:
        pws = [kernels.prepare(q, _cpu(bits), "cpu", cpu_path=path) for q in qts]
        assert kernels._fusable(*pws)
        with pytest.raises(QuantizationError, match="expected d_model=128"):
            kernels.glu(_x(2, k=64), *pws)
        for m in ROWS:
            x = _x(m, k=d)
            y = kernels.glu(x, *pws)
            a1, a3 = pws[0].matmul(x), pws[1].matmul(x)
            h = torch.nn.functional.silu(a1) * a3
            y3 = pws[2].matmul(h)
            # only hidden values within a hair of a rounding tie can land on another code
            hb = h.reshape(m, -1, pws[2].act_span)
            amax = hb.abs().amax(-1, keepdim=True)
            r = hb * (127 / amax)
            near = ((r - r.floor() - 0.5).abs() < 1e-3) * (amax / 127)  # [M, F/32, 32]
            flip = near.reshape(m, f).double() @ w2.abs().double().t()
            s3 = h.abs().double() @ w2.abs().double().t()
            assert ((y.double() - y3.double()).abs() <= flip + 8 * f * U * s3 + 1e-6).all(), (path, m)
            # against float64 with exact silu
            xd = x.double()
            r1, r3 = xd @ w1.double().t(), xd @ v1.double().t()
            e1 = _act_quant_bound(x, w1, pws[0].act_span) + 4 * d * U * (x.abs().double() @ w1.abs().double().t()) + 1e-6
            e3 = _act_quant_bound(x, v1, pws[1].act_span) + 4 * d * U * (x.abs().double() @ v1.abs().double().t()) + 1e-6
            rh = torch.nn.functional.silu(r1) * r3
            eh = 1.1 * e1 * r3.abs() + torch.nn.functional.silu(r1).abs() * e3 + 1.1 * e1 * e3
            ref = rh @ w2.double().t()
            tol = eh @ w2.abs().double().t() + _act_quant_bound(h, w2, pws[2].act_span) + 4 * f * U * s3 + 1e-5
            assert ((y.double() - ref).abs() <= tol).all(), (path, m, float(((y.double() - ref).abs() - tol).max()))


def test_dispatcher():
    for bits in (2, 3, 4, 8):
        for gs in (32, 128, -1):
            b = kernels.choose_backend("cpu", bits, gs, shape=(N, K))
            assert b in kernels.available_backends("cpu", bits, gs, shape=(N, K)) and b != "bnb"
            if cext.unavailable_reason() is None:
                assert b == _cpu(bits)
    assert kernels.choose_backend("cpu", 4, 128, shape=(N, K), override="torch") == "torch"
    with pytest.raises(QuantizationError, match="torch_int8"):
        kernels.choose_backend("cpu", 4, 128, shape=(N, K), override="torch_int8")
    with pytest.raises(QuantizationError, match="N=40"):
        kernels.prepare(_qt(4, 32, True, n=40, k=64), "torch_int4")
    with pytest.raises(QuantizationError, match="unknown backend"):
        kernels.choose_backend("cpu", 4, 128, override="nope")
    assert kernels.prepare(_qt(8, -1, True), "auto").backend in kernels.BACKENDS


def test_cext_disabled_falls_back(monkeypatch):
    monkeypatch.setenv("DBRXQ_DISABLE_CEXT", "1")
    cext.load.cache_clear()
    try:
        assert cext.unavailable_reason() is not None
        assert "cpu_q4" not in kernels.available_backends("cpu", 4, 128, shape=(N, K))
        assert kernels.choose_backend("cpu", 4, 128, shape=(N, K)) == "torch_int4"
    finally:
        monkeypatch.delenv("DBRXQ_DISABLE_CEXT")
        cext.load.cache_clear()


GEMM_ROWS = (2, 3, 16, 77, 512)  # the batched (M > 1) tiles: partial and full tiles, a prompt chunk


def _gemm_cases():
    for bits in (2, 3, 4, 8):
        for gs in (32, 64, 128, -1):
            for sym in (True, False):
                yield bits, gs, sym


@pytest.mark.parametrize("path", ("generic", "avx2", "avx512"))
def test_gemm_path_matches_reference_and_is_row_independent(path):
    """Batched rows (M > 1) run tiles of up to 8 (AVX-512) or 4 (AVX2) activation rows over each
    block of 16 weight rows; M = 1 and the tile edges run the same loop with fewer rows. Each
    result is within the derived activation-rounding bound of the float64 reference, and row i
    of a batch equals the same row computed alone, bit for bit, for every M: the float operations
    per (weight row, activation row) are the same sequence whatever the tile."""
    if cext.unavailable_reason():
        pytest.skip(cext.unavailable_reason())
    if path not in cext.runnable_paths():
        pytest.skip(f"this CPU cannot run the {path} path (flags: {sorted(cext.PATH_FLAGS[path])})")
    k, n = 256, 45  # N = 45: two full blocks of 16 rows and a block with 13 (3 padding rows)
    for bits, gs, sym in _gemm_cases():
        qt = _qt(bits, gs, sym, n=n, k=k, seed=bits + gs)
        w = qt.dequantize(torch.float32)
        pw = kernels.prepare(qt, _cpu(bits), "cpu", cpu_path=path)
        assert pw.nbytes <= qt.qweight.numel() + 4 * qt.scales.numel()  # native codes: no widening to int4
        for m in GEMM_ROWS:
            x = _x(m, k=k, seed=m)
            y = pw.matmul(x)
            y_ref = x.double() @ w.double().t()
            s = x.abs().double() @ w.abs().double().t()
            tol = _act_quant_bound(x, w, pw.act_span) + 4 * k * U * s + 1e-6
            assert ((y.double() - y_ref).abs() <= tol).all(), (path, bits, gs, sym, m)
            rows = range(m) if m < 100 else (0, 1, 2, 3, 4, 255, 508, 509, 510, 511)
            for i in rows:
                assert torch.equal(pw.matmul(x[i:i + 1])[0], y[i]), (path, bits, gs, sym, m, i)


def test_every_path_gives_the_same_bits():
    """The generic C loop, the AVX2 path (vpmaddubsw) and the AVX-512 path (vpdpbusd) compute the
    same exact integer per (row, span) and then the same float operations in the same order
    (qmatmul.c's header): results are identical, matmul and fused GLU, for every M."""
    if cext.unavailable_reason():
        pytest.skip(cext.unavailable_reason())
    paths = cext.runnable_paths()
    if len(paths) < 2:
        pytest.skip("this CPU runs only the generic path: nothing to compare it with")
    for bits, gs, sym in _gemm_cases():
        qt = _qt(bits, gs, sym, n=45, k=384, seed=3)
        pws = [kernels.prepare(qt, _cpu(bits), "cpu", cpu_path=p) for p in paths]
        for m in GEMM_ROWS:
            x = _x(m, k=384, seed=m)
            ys = [pw.matmul(x) for pw in pws]
            for p, y in zip(paths[1:], ys[1:]):
                assert torch.equal(ys[0], y), (p, bits, gs, sym, m)
    d, f = 128, 384
    for bits, gs, sym in ((4, 128, True), (4, 32, False), (8, -1, True), (8, 64, False), (3, 64, False), (2, 32, True)):
        qts = [_qt(bits, gs, sym, n=f, k=d, seed=1), _qt(bits, gs, sym, n=f, k=d, seed=2), _qt(bits, gs, sym, n=d, k=f, seed=3)]
        x = _x(37, k=d)
        ys = [kernels.glu(x, *(kernels.prepare(q, _cpu(bits), "cpu", cpu_path=p) for q in qts)) for p in paths]
        for p, y in zip(paths[1:], ys[1:]):
            assert torch.equal(ys[0], y), (p, bits, gs, sym)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer where CUDA is missing")
def test_torch_fused_kernels_on_cuda_need_cuda():
    """Without CUDA, torch's fused kernels are not offered for a CUDA device: the choice falls to torch."""
    for backend, bits, g in (("torch_int4", 4, 128), ("torch_int8", 8, -1)):
        assert kernels.backend_support(backend, "cuda", bits, g) == "CUDA is not available"
    assert kernels.choose_backend("cuda", 4, 128) == "torch"


@pytest.mark.parametrize("bits_of", [(4,) * 6, (2, 3, 4, 8, 4, 2)])
@pytest.mark.parametrize("rows", [1, 5])
def test_moe_in_one_call_equals_one_glu_per_expert(bits_of, rows):
    """quantize.kernels.moe (a layer's experts in one call into C) gives the bits of moe_dispatch over
    one fused GLU per expert, with any recipe per expert, for one row or several."""
    from dbrxq.model.moe import moe_dispatch, route
    from quantize.kernels import glu, moe, moe_table, prepare
    from quantize.primitives import quantize_tensor
    if cext.load() is None:
        pytest.skip(cext.unavailable_reason())
    g = torch.Generator().manual_seed(0)
    D, Fh, E, k = 128, 192, 6, 2

    def weight(n, kk, bits):
        qt = quantize_tensor(torch.randn(n, kk, generator=g) * 0.05, bits, 64 if bits < 8 else -1, bits != 8)
        return prepare(qt, "cpu_q4" if bits < 8 else "cpu_q8")
    experts = [(weight(Fh, D, b), weight(Fh, D, b), weight(D, Fh, b)) for b in bits_of]
    table = moe_table(experts)
    assert table is not None
    x = torch.randn(rows, D, generator=g).bfloat16()
    w, ids = route(torch.randn(rows, E, generator=g), k, 1.0)
    got = moe(x, ids, w, table, experts)
    want = moe_dispatch(x, ids, w, E, lambda e, xe: glu(xe, *experts[e], out_dtype=torch.float32))
    assert got.dtype == x.dtype and torch.equal(got, want)
    ref = moe_dispatch(x.float(), ids, w, E, lambda e, xe: experts[e][2].matmul(
        torch.nn.functional.silu(experts[e][0].matmul(xe)) * experts[e][1].matmul(xe)))
    assert (got.float() - ref).abs().max() < 2e-2 * ref.abs().max()  # the unfused kernels agree
