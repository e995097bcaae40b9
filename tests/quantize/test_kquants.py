"""llama.cpp's grids chosen by dbrxq (quantize/kquants.py): the bytes written dequantize in the
`gguf` package's port of llama.cpp's reference to exactly dbrxq's dequantized weight, for round to
nearest and for GPTQ onto the grid."""

import numpy as np
import pytest
import torch

from dbrxq.core.errors import QuantizationError
from quantize import kquants
from quantize.gptq import GPTQ, quadratic_energy
from quantize.primitives import quantize_tensor

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as llama_dequantize  # noqa: E402

TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]


def weight(n=48, k=512, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[3, 7] = 0.4  # an outlier
    w[5] = 0.0  # a row of zeros
    w[6, 256:] = -0.01  # a constant half row
    w[7] = w[7].abs()  # a row without negatives
    return w


@pytest.mark.parametrize("name", TYPES)
def test_bytes_dequantize_in_llama_cpp_to_exactly_our_weight(name):
    w = weight()
    kq = kquants.quantize(w, name)
    data = kquants.to_bytes(kq)
    qtype = getattr(gguf.GGMLQuantizationType, name)
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    assert data.dtype == np.uint8 and data.shape == (48, 512 // block * nbytes)
    theirs = llama_dequantize(data, qtype)
    assert np.array_equal(theirs, kquants.dequantize(kq).numpy())  # the bound is zero
    g = kquants.grid(name)
    assert int(kq.codes.min()) >= g.lo and int(kq.codes.max()) <= g.hi
    if "sc" in kq.fields:
        assert -g.sc_hi - 1 <= int(kq.fields["sc"].min()) and int(kq.fields["sc"].max()) <= g.sc_hi
    if g.asym:
        assert 0 <= int(kq.fields["m"].min()) and int(kq.fields["m"].max()) <= g.sc_hi
    assert torch.equal(kquants.dequantize(kq)[5], torch.zeros(512))  # zeros stay zeros


@pytest.mark.parametrize("name, bits, group, sym", [("Q8_0", 8, 32, True), ("Q6_K", 4, 32, True),
                                                    ("Q5_K", 4, 32, False), ("Q4_K", 4, 32, False),
                                                    ("Q3_K", 3, 32, False), ("Q2_K", 2, 32, False)])
def test_error_is_below_a_plain_grid_with_as_many_or_more_bytes(name, bits, group, sym):
    """Sanity of the scale search: each type's error is at most that of dbrxq's plain RTN at a
    comparable or larger width with fp16 scales (Q4_K: int4 asym g32, 5 bits per value; Q3_K, 3.44
    bits: int3 asym g32, 3.75; Q2_K, 2.63 bits: int2 asym g32, 2.75)."""
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1)) * 0.02
    mine = (kquants.dequantize(kquants.quantize(w, name)) - w).square().mean()
    plain = (quantize_tensor(w, bits, group, sym).dequantize() - w).square().mean()
    assert mine <= plain * 1.001, (float(mine), float(plain))
    if name == "Q8_0":  # round to nearest on d = amax / 127: within half a step
        d = w.view(64, -1, 32).abs().amax(-1, keepdim=True).half().float() / 127
        assert bool(((kquants.dequantize(kquants.quantize(w, name)) - w).view(64, -1, 32).abs() <= d * 0.5 + 1e-7).all())


def correlated(k=512, n=4096, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g) @ torch.randn(64, k, generator=g) * 0.3 + torch.randn(n, k, generator=g) * 0.1
    x[:, :8] *= 8  # outlier features, as real activations have
    return x


@pytest.mark.parametrize("name", TYPES)
def test_gptq_onto_the_grid_is_exact_and_beats_round_to_nearest(name):
    w = weight(n=64)
    solver = GPTQ(512)
    solver.add_batch(correlated())
    kq, stats = solver.quantize_grid(w, name)
    qtype = getattr(gguf.GGMLQuantizationType, name)
    assert np.array_equal(llama_dequantize(kquants.to_bytes(kq), qtype), kquants.dequantize(kq).numpy())
    assert stats["output_error"] == pytest.approx(quadratic_energy(w - kquants.dequantize(kq), solver.H), rel=1e-5)
    rtn = quadratic_energy(w - kquants.dequantize(kquants.quantize(w, name)), solver.H)
    assert stats["output_error"] < rtn / 4, (stats["output_error"], rtn)


def test_shapes_the_grids_cannot_hold_are_refused():
    with pytest.raises(QuantizationError, match=r"Q4_K needs rows of a multiple of 256 values, got a weight \(4, 320\)"):
        kquants.quantize(torch.zeros(4, 320), "Q4_K")
    with pytest.raises(QuantizationError, match="'IQ4_XS': expected one of Q8_0, Q6_K, Q5_K, Q4_K, Q3_K, Q2_K"):
        kquants.quantize(torch.zeros(4, 256), "IQ4_XS")
