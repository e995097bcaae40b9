"""dbrxq's C kernel on llama.cpp's K-quant blocks (quantize.kernels.CpuKQWeight, prepare_ggml).

The weight the kernel computes with must be llama.cpp's dequantization of the block, exactly: so the
kernel's output is checked against a float64 product of that weight (from the ``gguf`` package's
reference dequantization) with the activations as the kernel rounds them (int8, one scale per 256
values), within float32 accumulation rounding: a wrong scale, min, offset or code is far outside it.
Against the unrounded activations the derived bound ``sum_k |W[n, k]| d(k) / 2`` holds. Every SIMD path
gives the same bits, a row's result does not depend on the batch, and the layer-in-one-call MoE equals
one fused GLU per expert when gate, up and down are three different types."""

import numpy as np
import pytest
import torch

from quantize import cext, kquants
from quantize.kernels import CpuKQWeight, glu, moe, moe_table, prepare_ggml

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as llama_dequantize  # noqa: E402

TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
pytestmark = pytest.mark.skipif(cext.load() is None, reason="the C kernel cannot be built here")


def _weight(n, k, name, seed=0):
    """A weight with outliers on ``name``'s grid: (GGUF bytes, llama.cpp's float64 dequantization)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * (1 + 4 * (torch.rand(n, k, generator=g) < 0.02))
    raw = kquants.to_bytes(kquants.quantize(w, name))
    ref = llama_dequantize(raw, gguf.GGMLQuantizationType[name]).reshape(n, k)
    return raw, torch.from_numpy(ref.astype(np.float64))


def _act_rounded(x, span):
    """The activations as the kernel rounds them: d = amax / 127 per span (float32), q = round(x / d)
    half to even, returned as float64 d * q."""
    m, k = x.shape
    xs = x.view(m, k // span, span)
    amax = xs.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xs * inv).clamp(-127, 127)
    return ((amax / 127).double() * q.double()).view(m, k)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("rows", [1, 3, 6])
def test_kernel_computes_with_llama_cpps_dequantized_weight(name, rows):
    n, k = 40, 768  # 40: two blocks of 16 rows and a padded one
    raw, W = _weight(n, k, name)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1)) * 3
    span = 32 if name == "Q8_0" else 256
    outs = {p: prepare_ggml(raw, name, (n, k), cpu_path=p).matmul(x) for p in cext.runnable_paths()}
    y = outs["generic"].double()
    for p, o in outs.items():
        assert torch.equal(o, outs["generic"]), p  # every path, the same bits
    exact = _act_rounded(x, span) @ W.T
    scale = _act_rounded(x, span).abs() @ W.abs().T
    # float32 accumulation only: per super-block the int32 sum's conversion, d * d_a, and the fma each round once
    # (u = 2**-24 of the terms' magnitude), three super-blocks here, then acc - corr: <= (3 * 3 + 2) u = 6.6e-7 of
    # `scale`; 2e-6 leaves room for the reference's own rounding of d_a.
    assert ((y - exact).abs() <= 2e-6 * scale + 1e-30).all()
    d = x.view(rows, k // span, span).abs().amax(-1).double() / 127
    bound = (W.abs().view(1, n, k // span, span).sum(-1) * d.view(rows, 1, -1) / 2).sum(-1)
    err = (y - x.double() @ W.T).abs()
    assert (err <= bound * 1.0001 + 2e-6 * scale).all()  # the activation rounding's derived bound
    assert err.max() > 0  # the activations really were rounded (the bound is not vacuous)


@pytest.mark.parametrize("name", ["Q3_K", "Q6_K", "Q4_K"])
def test_a_row_is_the_same_alone_or_in_a_batch(name):
    raw, _ = _weight(32, 512, name, seed=3)
    x = torch.randn(9, 512, generator=torch.Generator().manual_seed(4))
    for p in cext.runnable_paths():
        w = prepare_ggml(raw, name, (32, 512), cpu_path=p)
        batch = w.matmul(x)
        for i in (0, 4, 8):
            assert torch.equal(batch[i:i + 1], w.matmul(x[i:i + 1])), (p, i)


def test_from_bytes_reads_any_block_as_llama_cpp_does():
    """Random block bytes (finite halves): from_bytes' fields dequantize to llama.cpp's reference values,
    bit for bit, for every type; to_bytes gives the same bytes back; and the C conversion the loader uses
    gives the kernel the same bytes as from_bytes does."""
    rng = np.random.default_rng(0)
    for name in TYPES:
        per = kquants.BLOCK_BYTES[name]
        blocks = 64 if name == "Q8_0" else 8
        raw = rng.integers(0, 256, size=(4, blocks * per), dtype=np.uint8)
        halves = {"Q8_0": [0], "Q6_K": [per - 2], "Q3_K": [per - 2], "Q2_K": [per - 4, per - 2], "Q4_K": [0, 2],
                  "Q5_K": [0, 2]}[name]
        b = raw.reshape(-1, per)
        for col in halves:  # finite halves of moderate size
            b[:, col:col + 2] = np.float16(rng.uniform(-2, 2, size=(b.shape[0], 1))).view(np.uint8)
        k = blocks * (32 if name == "Q8_0" else 256)
        kq = kquants.from_bytes(raw, name, (4, k))
        want = llama_dequantize(raw, gguf.GGMLQuantizationType[name]).reshape(4, k)
        assert np.array_equal(kquants.dequantize(kq).numpy(), want), name
        assert np.array_equal(kquants.to_bytes(kq), raw), name
        if name != "Q8_0":  # the loader's path, in C, makes the kernel bytes the numpy path makes
            assert torch.equal(CpuKQWeight(raw=raw, ggml_type=name, shape=(4, k)).w, CpuKQWeight(kq).w), name


def test_rows_filled_in_chunks_make_the_whole_tensors_bytes():
    """The loader converts a big tensor in chunks of 16-row multiples as it reads them: the same bytes."""
    raw, _ = _weight(53, 512, "Q5_K", seed=5)
    whole = CpuKQWeight(raw=raw, ggml_type="Q5_K", shape=(53, 512))
    parts = CpuKQWeight(ggml_type="Q5_K", shape=(53, 512), empty=True)
    for r0, r1 in ((0, 16), (16, 48), (48, 53)):
        parts.fill_rows(r0, raw[r0:r1])
    assert torch.equal(parts.w[:whole.nbytes], whole.w)


def test_a_short_or_misshapen_tensor_is_refused():
    from dbrxq.core.errors import QuantizationError
    raw, _ = _weight(16, 256, "Q4_K")
    with pytest.raises(QuantizationError, match="needs 2304 bytes, got 2288"):
        prepare_ggml(raw[:, :-1], "Q4_K", (16, 256))
    w = CpuKQWeight(ggml_type="Q4_K", shape=(16, 256), empty=True)
    with pytest.raises(QuantizationError, match="whole rows"):
        w.fill_rows(8, raw[:8])  # rows must start on a block of 16
    with pytest.raises(QuantizationError, match="multiple of 256"):
        kquants.from_bytes(raw, "Q4_K", (32, 128))


@pytest.mark.parametrize("rows", [1, 5])
def test_moe_of_three_types_equals_one_glu_per_expert(rows):
    """Gate, up and down of three different K-types (a --target-size file can choose so): the one-call MoE
    gives the bits of one fused GLU per expert, and both are the float GLU of the dequantized weights
    within the activation rounding."""
    from dbrxq.model.moe import moe_dispatch, route
    D, Fh, E, k = 256, 512, 4, 2
    kinds = [("Q5_K", "Q3_K", "Q6_K"), ("Q4_K", "Q4_K", "Q2_K"), ("Q2_K", "Q6_K", "Q4_K"), ("Q3_K", "Q5_K", "Q5_K")]
    experts, dense = [], []
    for e, (a, b, c) in enumerate(kinds):
        (r1, W1), (r2, W2), (r3, W3) = _weight(Fh, D, a, 10 * e), _weight(Fh, D, b, 10 * e + 1), _weight(D, Fh, c, 10 * e + 2)
        experts.append((prepare_ggml(r1, a, (Fh, D)), prepare_ggml(r2, b, (Fh, D)), prepare_ggml(r3, c, (D, Fh))))
        dense.append((W1.float(), W2.float(), W3.float()))
    assert all(isinstance(w, CpuKQWeight) for p in experts for w in p)
    table = moe_table(experts)
    assert table is not None
    g = torch.Generator().manual_seed(7)
    x = torch.randn(rows, D, generator=g) * 0.5
    w, ids = route(torch.randn(rows, E, generator=g), k, 1.0)
    got = moe(x, ids, w, table, experts)
    want = moe_dispatch(x, ids, w, E, lambda e, xe: glu(xe, *experts[e], out_dtype=torch.float32))
    assert torch.equal(got, want)
    ref = moe_dispatch(x, ids, w, E, lambda e, xe: (torch.nn.functional.silu(xe @ dense[e][0].T) *
                                                   (xe @ dense[e][1].T)) @ dense[e][2].T)
    assert (got - ref).abs().max() < 2e-2 * ref.abs().max()
