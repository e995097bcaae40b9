"""Tests of quantize.primitives (qparams, codes, dequantize, int4 packing, QuantizedTensor),
of the RTN expert layout (quantize.rtn) and of QuantConfig (quantize.config).

Tolerances are derived, not tuned; see the comments at each bound.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from dbrxq.core.errors import QuantizationError
from quantize.config import ModuleQuant, QuantConfig
from quantize.format import FORMAT_VERSION, QWEIGHT, QZEROS, SCALES
from quantize.primitives import (
    QuantizedTensor,
    compute_qparams,
    dequantize,
    pack_int4,
    quantize_codes,
    quantize_tensor,
    unpack_int4,
)
from quantize.rtn import (
    dequantize_experts_to_hub,
    experts_to_canonical,
    experts_to_hub,
    quantize_experts_rtn,
)

BITS = (4, 8)
GROUPS = (32, 64, 128, -1)
# Odd N, a leading expert dim, K a multiple of 128 (what DBRX has) and K == G.
SHAPES = ((7, 256), (3, 5, 384), (2, 1, 128), (33, 128))
CASES = list(itertools.product(BITS, GROUPS, (True, False), SHAPES))


def _ids(case):
    bits, g, sym, shape = case
    return f"b{bits}-g{g}-{'sym' if sym else 'asym'}-{'x'.join(map(str, shape))}"


def _per_column(t: torch.Tensor, k: int) -> torch.Tensor:
    """[..., N, K // G] -> [..., N, K]: each group's value repeated over its columns."""
    return t.repeat_interleave(k // t.shape[-1], dim=-1)


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("shape", [(1, 2), (7, 256), (3, 5, 130), (2, 3, 4, 6)])
def test_pack_unpack_round_trip(shape):
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, shape, dtype=torch.uint8, generator=gen)
    packed = pack_int4(codes)
    assert packed.shape == (*shape[:-1], shape[-1] // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)


def test_pack_nibble_order():
    # format.py: column 2j in the LOW nibble, 2j+1 in the HIGH nibble.
    packed = pack_int4(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8))
    assert packed.tolist() == [[0x21, 0x0F]]


def test_pack_rejects_odd_k_and_big_codes():
    with pytest.raises(QuantizationError, match="odd K=3"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(QuantizationError, match="0..15, got max 16"):
        pack_int4(torch.full((2, 2), 16, dtype=torch.uint8))


# ----------------------------------------------------------------------------- validation


def test_k_not_divisible_by_group():
    with pytest.raises(QuantizationError, match="K=96 is not divisible by group_size=64"):
        quantize_tensor(torch.randn(4, 96), 4, 64, True)


@pytest.mark.parametrize(
    "bits, g, k, msg",
    [
        (5, 128, 256, r"bits=5 is not supported; use one of \(2, 3, 4, 8\)"),
        (4, 16, 256, r"group_size=16 is not supported; use one of \(32, 64, 128, -1\)"),
        (4, -1, 5, "K=5 is not a multiple of 2; 4-bit packing needs that"),
        (3, -1, 20, "K=20 is not a multiple of 8; 3-bit packing needs that"),
        (2, -1, 6, "K=6 is not a multiple of 4; 2-bit packing needs that"),
    ],
)
def test_bad_settings_raise(bits, g, k, msg):
    with pytest.raises(QuantizationError, match=msg):
        compute_qparams(torch.randn(3, k), bits, g, True)


def test_non_finite_weights_raise():
    w = torch.randn(4, 128)
    w[1, 7] = float("nan")
    with pytest.raises(QuantizationError, match="NaN or inf"):
        quantize_tensor(w, 4, 128, True)


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("bits, g, sym, shape", CASES, ids=[_ids(c) for c in CASES])
def test_round_trip_error_bound(bits, g, sym, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.02
    qt = quantize_tensor(w, bits, g, sym)
    k = shape[-1]
    G = k if g == -1 else g
    assert qt.qweight.shape == (*shape[:-1], k // 2 if bits == 4 else k)
    assert qt.scales.shape == (*shape[:-1], k // G) and qt.scales.dtype == torch.float16
    assert (qt.qzeros is None) == sym
    w_hat = qt.dequantize()
    assert w_hat.shape == w.shape and w_hat.dtype == torch.float32

    wg = w.reshape(*shape[:-1], k // G, G)
    if sym and bits < 8:
        _check_full_range(w, wg, qt, bits, k)
        return
    # The fp16 scale is the exact one rounded UP by at most one fp16 step (2**-10 relative
    # for normal halves), so the grid always covers the group and nothing is clamped.
    exact = (
        wg.abs().amax(-1) / (2 ** (bits - 1) - 1)
        if sym
        else (wg.amax(-1).clamp(min=0) - wg.amin(-1).clamp(max=0)) / (2**bits - 1)
    )
    s = qt.scales.float()
    assert (s >= exact).all() and (s <= exact * (1 + 2**-10)).all()

    # Elementwise bound |w - w_hat| <= s/2. (code - zero) * s is exact in float32 (<= 9 + 11
    # significant bits), so the only slack is float32 rounding of w / s (relative 2**-24 of
    # |w / s| <= 2**bits) and of the final subtraction (2**-24 |w|): 2**-22 (|w| + 2**bits s)
    # is a comfortable cover.
    s_col = _per_column(s, k)
    slack = 2.0**-22 * (w.abs() + 2**bits * s_col)
    assert ((w - w_hat).abs() <= s_col / 2 + slack).all()

    # Both on-disk and unpacked forms dequantize identically, and re-quantizing the
    # dequantized weight with the same qparams is the identity (quantize/dequantize agree).
    assert torch.equal(dequantize(qt.qweight, qt.scales, qt.qzeros, bits, g), w_hat)
    assert torch.equal(quantize_codes(w_hat, qt.scales, qt.qzeros, bits, g), qt.codes())


def _check_full_range(w, wg, qt, bits, k):
    """Symmetric 2-4 bits: the scale is one of the documented candidates -m / d (m the group's signed
    extreme, d in q - 1 .. q + 1/2, magnitude rounded up to fp16), of m's opposite sign, and no group's
    squared error exceeds the old amax / (q - 1) grid's (computed here from its definition)."""
    q = 2 ** (bits - 1)
    m = wg.gather(-1, wg.abs().argmax(-1, keepdim=True)).squeeze(-1)
    s = qt.scales.float()
    mag = m.abs()
    assert ((s * m) < 0).all(), "the grid's long side (code 0) is on the extreme's side"
    assert (s.abs() >= mag / (q + 0.5)).all() and (s.abs() <= mag / (q - 1) * (1 + 2**-10)).all()
    exact = mag / (q - 1)
    h = exact.half()  # the old scale: the float16 at or above the exact one
    old_s = torch.where(h.float() < exact, torch.nextafter(h, torch.full_like(h, math.inf)), h).float()
    old_s = old_s.unsqueeze(-1)
    old_err = ((wg / old_s).round().clamp(-q, q - 1) * old_s - wg).square().sum(-1)
    new_err = (qt.dequantize().reshape(wg.shape) - wg).square().sum(-1)
    assert (new_err <= old_err * (1 + 1e-5) + 1e-12).all(), float((new_err / old_err).max())
    # Elementwise: within |s|/2 of the grid, or clamped at its short end: beyond (q - 1/2)|s| on the
    # side opposite the extreme, at most (q + 1/2) - (q - 1) = 1.5 |s| away.
    s_col = _per_column(s.abs(), k)
    err = (w - qt.dequantize()).abs()
    assert (err <= 1.5 * s_col * (1 + 1e-6)).all()
    inside = (w / _per_column(s, k)).abs() <= q - 0.5  # on the grid's span: round to nearest
    assert (err[inside] <= s_col[inside] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_full_range_grid_uses_every_level(bits):
    """All 2**bits codes occur, the extreme of a group whose scale is -m / q comes back exactly (code 0),
    and on Gaussian weights (g128) the grid's SQNR beats the old amax / (q - 1) one's by more than 1 dB at
    4 bits, 2 dB at 3 and 4 dB at 2 (about two thirds of what this seeded tensor gives)."""
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(5)) * 0.02
    qt = quantize_tensor(w, bits, 128, True)
    codes = qt.codes()
    assert set(codes.unique().tolist()) == set(range(2**bits))
    q = 2 ** (bits - 1)
    wg, sg = w.reshape(256, 8, 128), qt.scales.float()
    m = wg.gather(-1, wg.abs().argmax(-1, keepdim=True)).squeeze(-1)
    at_q = (m / sg + q).abs() < 1e-3  # groups whose extreme lies on code 0 exactly (d = q)
    assert at_q.any()
    idx = wg.abs().argmax(-1)
    ext_codes = codes.reshape(256, 8, 128).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    assert (ext_codes[at_q] == 0).all()
    old = torch.tensor(0.0)
    for g in range(8):  # the old grid, from its definition
        blk = wg[:, g]
        so = blk.abs().amax(-1, keepdim=True) / (q - 1)
        old += ((blk / so).round().clamp(-q, q - 1) * so - blk).square().sum()
    new = (qt.dequantize() - w).square().sum()
    gain_db = 10 * math.log10(float(old / new))
    assert gain_db > {4: 1.0, 3: 2.0, 2: 4.0}[bits], gain_db


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", (True, False))
@pytest.mark.parametrize("g", (32, 128, -1))
def test_sqnr_floor_uniform(bits, sym, g):
    # Uniform data on [-a, a] with step s: noise power s^2/12, signal power a^2/3, so
    # SQNR = 20 log10(2a / s). Asymmetric: s = 2a / (2^b - 1) -> 20 log10(2^b - 1);
    # symmetric: s = a / (2^(b-1) - 1) -> 20 log10(2^b - 2), i.e. ~6.02 b dB minus a little
    # (4-bit: 23.0 / 23.5 dB, 8-bit: 48.1 dB). A finite group's range is slightly inside
    # [-a, a] (which only helps), and the fp16 round-up of s costs < 0.01 dB; 0.5 dB of
    # margin covers the sampling noise of the estimate over 64k values.
    w = (torch.rand(64, 1024, generator=torch.Generator().manual_seed(2)) * 2 - 1) * 0.05
    w_hat = quantize_tensor(w, bits, g, sym).dequantize()
    sqnr = 10 * math.log10(float(w.square().sum() / (w - w_hat).square().sum()))
    floor = 20 * math.log10(2**bits - (2 if sym else 1)) - 0.5
    assert sqnr >= floor, (sqnr, floor)


@pytest.mark.parametrize("bits", BITS)
def test_asymmetric_zero_is_exact(bits):
    # Group 0 has min exactly 0 (zero point must be code 0), group 1 max exactly 0, group 2
    # straddles 0; every exact zero must come back as exactly 0.
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(5, 96, generator=gen)
    w[:, :32] = w[:, :32].abs()
    w[:, 32:64] = -w[:, 32:64].abs()
    w[:, ::7] = 0.0
    qt = quantize_tensor(w, bits, 32, symmetric=False)
    assert (qt.qzeros[:, 0] == 0).all() and (qt.qzeros[:, 1] == 2**bits - 1).all()
    w_hat = qt.dequantize()
    assert (w_hat[w == 0] == 0).all()
    assert (w_hat[:, :32] >= 0).all() and (w_hat[:, 32:64] <= 0).all()


@pytest.mark.parametrize("sym", (True, False))
def test_all_zero_group(sym):
    w = torch.randn(3, 64)
    w[1, :32] = 0.0
    qt = quantize_tensor(w, 4, 32, sym)
    assert qt.scales[1, 0] == 1.0  # documented guard: scale 1 for an all-zero group
    w_hat = qt.dequantize()
    assert torch.isfinite(w_hat).all() and (w_hat[1, :32] == 0).all()


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_low_precision_input_and_output_dtype(dtype):
    w = torch.randn(4, 2, 128).to(dtype)
    ref = quantize_tensor(w.float(), 4, 64, True)
    qt = quantize_tensor(w, 4, 64, True)
    assert torch.equal(qt.qweight, ref.qweight) and torch.equal(qt.scales, ref.scales)
    out = qt.dequantize(dtype)
    assert out.dtype == dtype and torch.equal(out, ref.dequantize().to(dtype))


# ----------------------------------------------------------------------------- container


@pytest.mark.parametrize("bits, sym", [(4, True), (4, False), (8, True), (8, False)])
def test_tensors_round_trip(bits, sym):
    qt = quantize_tensor(torch.randn(3, 6, 256), bits, 128, sym)
    d = qt.tensors("transformer.blocks.0.ffn.experts.mlp.w1.weight")
    prefix = "transformer.blocks.0.ffn.experts.mlp.w1"
    want = {f"{prefix}.{n}" for n in (QWEIGHT, SCALES) + (() if sym else (QZEROS,))}
    assert set(d) == want
    back = QuantizedTensor.from_tensors(d, prefix, bits, 128)
    assert back.shape == qt.shape and torch.equal(back.dequantize(), qt.dequantize())


def test_from_tensors_rejects_misshapen_and_missing():
    d = quantize_tensor(torch.randn(4, 256), 4, 128, True).tensors("x")
    with pytest.raises(QuantizationError, match="misshapen scales"):
        QuantizedTensor.from_tensors(d, "x", 4, 64)
    with pytest.raises(QuantizationError, match="missing quantized tensor"):
        QuantizedTensor.from_tensors({"x.qweight": d["x.qweight"]}, "x", 4, 128)
    with pytest.raises(QuantizationError, match="dtype torch.float32, expected torch.float16"):
        QuantizedTensor.from_tensors({**d, "x.scales": d["x.scales"].float()}, "x", 4, 128)


def test_stack_matches_batched_quantize():
    w = torch.randn(3, 8, 128)
    stacked = QuantizedTensor.stack([quantize_tensor(w[e], 4, 32, False) for e in range(3)])
    batched = quantize_tensor(w, 4, 32, False)
    assert torch.equal(stacked.qweight, batched.qweight)
    assert torch.equal(stacked.dequantize(), batched.dequantize())


# ----------------------------------------------------------------------------- RTN experts


@pytest.mark.parametrize("kind", ("w1", "v1", "w2"))
@pytest.mark.parametrize("bits, g", [(4, 128), (8, -1)])
def test_expert_layout(kind, bits, g):
    E, F, D = 4, 256, 128
    w_hub = torch.randn(E * F, D, generator=torch.Generator().manual_seed(4))
    qt = quantize_experts_rtn(w_hub, kind, E, bits, g)
    assert qt.shape == ((E, D, F) if kind == "w2" else (E, F, D))
    assert torch.equal(experts_to_hub(experts_to_canonical(w_hub, kind, E), kind), w_hub)
    hub_hat = dequantize_experts_to_hub(qt, kind)
    assert hub_hat.shape == w_hub.shape
    for e in range(E):
        # Expert e alone, in nn.Linear orientation: the hub computes x @ w2[e] but x @ w1[e].T.
        block = w_hub[e * F : (e + 1) * F]
        linear = block.T if kind == "w2" else block
        ref = quantize_tensor(linear, bits, g).dequantize()
        assert torch.equal(qt.dequantize()[e], ref)
        assert torch.equal(hub_hat[e * F : (e + 1) * F], ref.T if kind == "w2" else ref)


def test_expert_bad_kind_and_shape():
    with pytest.raises(QuantizationError, match="kind 'w3'"):
        quantize_experts_rtn(torch.randn(8, 128), "w3", 2)
    with pytest.raises(QuantizationError, match=r"not \[E\*F, D\] with E=3"):
        quantize_experts_rtn(torch.randn(8, 128), "w1", 3)


# ----------------------------------------------------------------------------- QuantConfig


def test_quant_config_defaults_and_round_trip():
    assert QuantConfig().layout == "auto"  # resolved per model by quantize.specs.resolve_layout
    blocks = QuantConfig(layout="blocks", full_range=False)
    assert blocks.to_dict()["format_version"] == 4 and blocks.to_dict()["layout"] == "blocks"
    assert QuantConfig.from_dict(json.loads(json.dumps(blocks.to_dict()))) == blocks
    # What the quantizer writes now: symmetric int4 experts over all 16 levels, scales signed (version 5).
    new = QuantConfig(layout="canonical").to_dict()
    assert new["format_version"] == 5 == FORMAT_VERSION and new["full_range"] is True
    assert QuantConfig.from_dict(json.loads(json.dumps(new))).full_range
    assert "full_range" not in QuantConfig(experts=ModuleQuant(4, 128, False), layout="canonical").to_dict()
    cfg = QuantConfig(layout="canonical", full_range=False)  # positive scales only: an older dbrxq's grid
    d = cfg.to_dict()
    assert d["quant_method"] == "dbrxq" and d["format_version"] == 1  # 4/8 bits: readable by v1 readers
    assert not QuantConfig.from_dict(json.loads(json.dumps(d))).full_range  # absent: positive scales
    assert QuantConfig(experts=ModuleQuant(3, 128, True), layout="canonical",
                       full_range=False).to_dict()["format_version"] == 2
    assert d["experts"] == {"bits": 4, "group_size": 128, "symmetric": True}
    assert d["attn"] == {"bits": 8, "group_size": -1, "symmetric": True}
    assert d["lm_head"]["bits"] is None and d["embed"]["bits"] is None
    assert QuantConfig.from_dict(json.loads(json.dumps(d))) == cfg

    assert "layout" not in d  # a canonical checkpoint's config is what an older dbrxq wrote
    custom = QuantConfig(
        layout="canonical",
        method="gptq",
        experts=ModuleQuant(4, 64, False),
        lm_head=ModuleQuant(8, -1, True),
        embed=ModuleQuant(16),
        calibration={"dataset": "c4", "tokens": 4096, "seed": 0},
    )
    assert custom.embed.bits is None and not custom.embed.quantized
    assert QuantConfig.from_dict(json.loads(json.dumps(custom.to_dict()))) == custom


@pytest.mark.parametrize(
    "patch, msg",
    [
        ({"format_version": 99},
         "format_version=99 is not supported; this dbrxq reads format_version 1, 2"),
        ({"method": "awq"}, "method='awq' is not supported"),
        ({"experts": {"bits": 5, "group_size": 128}},
         r"quantization_config.experts.bits=5 is not supported"),
        ({"experts": {"bits": 3, "group_size": 128}},
         r"format_version=1 cannot hold 2- or 3-bit codes"),
        ({"attn": {"bits": 8, "group_size": 48}},
         r"quantization_config.attn.group_size=48 is not supported"),
        ({"quant_method": "gptq"}, "not written by dbrxq"),
        ({"layout": "rows"}, "layout='rows' is not supported"),
        ({"layout": "blocks"}, "format_version=1 cannot hold the blocks layout"),
        ({"layout": ["blocks"]}, "layout=\\['blocks'\\] is not supported"),
        ({"full_range": True}, r"format_version=1 cannot hold signed \(full-range\) scales"),
        ({"full_range": "yes"}, "full_range='yes' is not true or false"),
    ],
)
def test_quant_config_errors(patch, msg):
    with pytest.raises(QuantizationError, match=msg):
        QuantConfig.from_dict({**QuantConfig(layout="canonical", full_range=False).to_dict(), **patch})


# ----------------------------------------------------------------------------- 2- and 3-bit codes
@pytest.mark.parametrize("bits", [2, 3])
def test_low_bit_pack_round_trip_and_layout(bits):
    from quantize.primitives import pack_codes, packed_k, unpack_codes
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (3, 5, 64), generator=g, dtype=torch.uint8)
    q = pack_codes(codes, bits)
    assert q.shape == (3, 5, packed_k(bits, 64)) and q.shape[-1] == 64 * bits // 8
    assert torch.equal(unpack_codes(q, bits), codes)
    row = torch.arange(8, dtype=torch.uint8) % 2**bits  # columns 0..7 of one row, by hand:
    q = pack_codes(row[None], bits)[0].tolist()
    if bits == 2:  # codes 0,1,2,3,0,1,2,3: byte j holds columns 4j..4j+3 in bits 0-1, 2-3, 4-5, 6-7
        assert q == [0b11100100, 0b11100100]
    else:  # codes 0..7: low plane 0,1,2,3,0,1,2,3 as at 2 bits; high bits 0,0,0,0,1,1,1,1 -> 0b11110000
        assert q == [0b11100100, 0b11100100, 0b11110000]
    with pytest.raises(QuantizationError, match=f"{bits}-bit codes must be in 0..{2**bits - 1}"):
        pack_codes(torch.full((1, 8), 2**bits, dtype=torch.uint8), bits)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("g, sym", [(32, True), (128, False), (-1, True), (64, False)])
def test_low_bit_error_bound(bits, g, sym):
    """At 2 and 3 bits, asymmetric: |w - w_hat| <= scale / 2 elementwise (the grid covers every group);
    symmetric (full range): as test_round_trip_error_bound states it."""
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    qt = quantize_tensor(w, bits, g, sym)
    G = 256 if g == -1 else g
    if sym:
        _check_full_range(w, w.reshape(16, 256 // G, G), qt, bits, 256)
    else:
        half = qt.scales.float().repeat_interleave(G, dim=-1) / 2
        err = (w - qt.dequantize()).abs()
        assert bool((err <= half * (1 + 1e-6)).all()), float((err / half).max())
        assert float((err / half).max()) > 0.5  # not vacuous: errors reach the bound's order
    assert qt.qweight.shape[-1] == 256 * bits // 8
    back = QuantizedTensor.from_tensors(qt.tensors("w"), "w", bits, g)
    assert back.shape == qt.shape and torch.equal(back.codes(), qt.codes())
