"""Tests of quantize.modules: QLinear / QExperts against float modules on the dequantized weights,
for every kernel backend that runs here; the swap on meta; the in-memory RTN model's quality.

Tolerances are derived per backend (see :func:`matmul_bound`), not tuned.
"""

from __future__ import annotations

import math

import pytest
import torch

from dbrxq.core.errors import QuantizationError
from dbrxq.formats.random import preset_config
from dbrxq import DbrxForCausalLM
from dbrxq.model.moe import DbrxExperts, route
from quantize import kernels
from quantize.config import ModuleQuant, QuantConfig
from quantize.modules import (
    QBlocksExperts,
    QBlocksLinear,
    QExperts,
    QLinear,
    quantize_model_modules,
    quantize_model_rtn,
)
from quantize.primitives import quantize_tensor
from quantize.rtn import dequantize_experts_to_hub, quantize_experts_rtn
from quantize.specs import quantized_tensor_specs

EPS32 = 2.0**-24  # float32 unit roundoff
ROWS = (1, 17)  # batch 1 (decode) and a prefill-sized batch


def matmul_bound(backend: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |x @ w.T - backend(x)| for the dequantized weight w [N, K], x fp32.

    - every backend: float32 accumulation in any order, |err| <= K * eps32 * (|x| @ |w|.T)
      (the classical dot-product bound), doubled for the scale multiply.
    - cpu_q4 / cpu_q8 also quantize x per row per 32-block to int8 with step d = amax / 127,
      so x moves by <= d / 2 per element: + (d/2 broadcast) @ |w|.T (the integer products are exact).
    bnb re-quantizes the weight: see :func:`bnb_bound`.
    """
    ax, aw = x.abs().double(), w.abs().double()
    k = x.shape[-1]
    bound = 2 * k * EPS32 * (ax @ aw.T)
    if backend in ("cpu_q4", "cpu_q8"):
        d = ax.reshape(*ax.shape[:-1], k // 32, 32).amax(-1) / 127
        bound += (d / 2).repeat_interleave(32, -1) @ aw.T
    return bound


def bnb_bound(bits: int, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """bnb re-quantizes the dequantized weight: NF4 (4 bits, blocks of 64, levels in [-1, 1] whose
    largest gap is 1 - 0.7230 = 0.277) moves w by <= 0.139 * block absmax; int8 (8 bits) rounds w
    and x to row-absmax / 127 steps: each moves by <= half a step."""
    ax, aw = x.abs().double(), w.abs().double()
    k = x.shape[-1]
    bound = 4 * k * EPS32 * (ax @ aw.T)
    if bits == 4:
        blockmax = aw.reshape(-1, 64).amax(-1, keepdim=True).expand(-1, 64).reshape(aw.shape)
        return bound + ax @ (0.139 * blockmax + 1e-6).T
    wstep = aw.amax(-1, keepdim=True) / 127
    xstep = ax.amax(-1, keepdim=True) / 127
    return bound + ax @ (wstep / 2).expand_as(aw).T + (xstep / 2).expand_as(ax) @ (aw + wstep / 2).T


LINEAR_CASES = [(bits, g, sym) for bits in (2, 3, 4, 8) for g in (32, 128, -1) for sym in (True, False)]
N, K = 96, 256


@pytest.mark.parametrize("backend", kernels.BACKENDS)
@pytest.mark.parametrize("bits, group_size, symmetric", LINEAR_CASES)
def test_qlinear_matches_float_on_dequantized_weight(bits, group_size, symmetric, backend):
    why = kernels.backend_support(backend, "cpu", bits, group_size, shape=(N, K), symmetric=symmetric)
    if why:
        pytest.skip(f"{backend}: {why}")
    gen = torch.Generator().manual_seed(bits * 1000 + group_size + symmetric)
    w = torch.randn(N, K, generator=gen) * 0.05
    qt = quantize_tensor(w, bits, group_size, symmetric)
    w_deq = qt.dequantize(torch.float32)
    lin = QLinear(K, N, ModuleQuant(bits, group_size, symmetric))
    lin.copy_from(qt)
    lin.finalize_load(backend=backend)
    for m in ROWS:
        x = torch.randn(m, K, generator=gen)
        ref = x.double() @ w_deq.double().T
        y = lin(x)
        assert y.dtype == x.dtype and y.shape == (m, N)
        bound = bnb_bound(bits, x, w_deq) if backend == "bnb" else matmul_bound(backend, x, w_deq)
        excess = ((y.double() - ref).abs() - bound).max().item()
        assert excess <= 0, (backend, m, excess)
        if backend == "torch":  # the reference path: ~1e-7 relative, well inside 1e-5
            assert (y.double() - ref).norm() <= 1e-5 * ref.norm()
    # 3-D input [B, T, K] and bf16 activations keep their dtype and leading dims.
    x = torch.randn(2, 3, K, generator=gen, dtype=torch.bfloat16)
    assert lin(x).shape == (2, 3, N) and lin(x).dtype == torch.bfloat16


def _experts_config():
    return preset_config("tiny", d_model=128, ffn_hidden_size=64)


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 32, True), (4, 64, False), (8, -1, True),
                                                         (3, 64, True), (2, 32, False)])
def test_qexperts_match_float_experts_on_dequantized_weights(bits, group_size, symmetric):
    config = _experts_config()
    E, Fh, D = config.num_experts, config.ffn_hidden_size, config.d_model
    gen = torch.Generator().manual_seed(7 + bits)
    float_experts = DbrxExperts(config)
    mq = ModuleQuant(bits, group_size, symmetric)
    qt = {}
    for kind in ("w1", "v1", "w2"):
        w = torch.randn(E * Fh, D, generator=gen) * 0.1
        qt[kind] = quantize_experts_rtn(w, kind, E, bits, group_size, symmetric)
        getattr(float_experts.mlp, kind).data = dequantize_experts_to_hub(qt[kind], kind)
    shapes = [tuple(qt[k].shape[1:]) for k in ("w1", "v1", "w2")]
    backends = set(kernels.BACKENDS)
    for s in shapes:
        backends &= set(kernels.available_backends("cpu", bits, group_size, shape=s, symmetric=symmetric))
    backends.discard("bnb")  # re-quantizes: compared to the reference per matmul in the QLinear test
    for backend in sorted(backends):
        q = QExperts(config, mq)
        for kind in ("w1", "v1", "w2"):
            getattr(q.mlp, kind).copy_from(qt[kind])
        q.finalize_load(backend=backend)
        for n in ROWS:
            x = torch.randn(n, D, generator=gen)
            weights, ids = route(torch.randn(n, E, generator=gen), config.top_k, 1.0)
            ref = float_experts(x, ids, weights)
            y = q(x, ids, weights)
            rel = ((y - ref).norm() / ref.norm()).item()
            # torch paths: float32 rounding only (~1e-6; 1e-5 leaves room for 3 chained matmuls).
            # cpu_q*: three matmuls each with int8 activations; per element |dx| <= amax/254, i.e.
            # at most ~1.3% of a 32-block's rms for Gaussian-like inputs (amax <~ 3.3 rms): 3 x that.
            tol = 4e-2 if backend.startswith("cpu_q") else 1e-5
            assert rel <= tol, (backend, n, rel)
    # Per-expert accessor: views into one contiguous block per expert.
    w1, v1, w2 = q.expert_weights(3)
    assert w1.shape == (Fh, D) and w2.shape == (D, Fh)
    base = q.mlp.w2.qweight
    assert w2.qweight.data_ptr() == base.data_ptr() + 3 * base[0].numel() and w2.qweight.is_contiguous()
    assert torch.equal(w2.dequantize(), qt["w2"].dequantize()[3])


@pytest.mark.parametrize("layout", ["canonical", "blocks"])
def test_swap_on_meta_matches_the_checkpoint_specs(layout):
    config = preset_config("tiny", d_model=128, ffn_hidden_size=128)
    qc = QuantConfig(experts=ModuleQuant(4, 128, False), attn=ModuleQuant(8, -1, True),
                     lm_head=ModuleQuant(8, -1, True), layout=layout)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as the loader does: dtypes must not follow it
    try:
        with torch.device("meta"):
            model = DbrxForCausalLM(config)
            quantize_model_modules(model, qc.to_dict())
    finally:
        torch.set_default_dtype(old)
    got = [(n, tuple(t.shape), t.dtype) for n, t in model.state_dict().items()]
    want = [(n, tuple(s), d) for n, s, d in quantized_tensor_specs(config, qc)]
    if layout == "blocks":  # the same tensors; the blocks layout writes its pages first
        assert sorted(got) == sorted(want) and len(got) == len(want)
        assert "transformer.blocks.0.ffn.experts.mlp.qblocks" in dict((g[0], 1) for g in got)
        assert isinstance(model.lm_head, QBlocksLinear) and isinstance(model.transformer.blocks[0].ffn.experts,
                                                                       QBlocksExperts)
        return
    assert got == want
    assert "transformer.blocks.1.norm_attn_norm.attn.Wqkv.qweight" in dict((g[0], 1) for g in got)
    assert "transformer.blocks.0.ffn.experts.mlp.w2.qzeros" in dict((g[0], 1) for g in got)
    assert isinstance(model.lm_head, QLinear) and isinstance(model.transformer.blocks[0].ffn.experts, QExperts)


def test_unquantized_kinds_stay_float_and_embed_is_refused():
    config = preset_config("tiny")
    with torch.device("meta"):
        model = DbrxForCausalLM(config)
    quantize_model_modules(model, QuantConfig(experts=ModuleQuant(8, -1), attn=ModuleQuant(None), layout="canonical"))
    assert type(model.transformer.blocks[0].norm_attn_norm.attn.Wqkv) is torch.nn.Linear
    assert type(model.lm_head) is torch.nn.Linear
    assert isinstance(model.transformer.blocks[0].ffn.experts, QExperts)
    with pytest.raises(QuantizationError, match="embed"):
        quantize_model_modules(model, QuantConfig(embed=ModuleQuant(8, -1)))
    with pytest.raises(QuantizationError, match=r"attn\.Wqkv.*not divisible"):
        quantize_model_modules(_meta_model(),
                               QuantConfig(attn=ModuleQuant(4, 128), experts=ModuleQuant(None)))
    with pytest.raises(QuantizationError, match="format_version"):
        quantize_model_modules(_meta_model(), {"quant_method": "dbrxq", "format_version": 99})


def _meta_model():
    with torch.device("meta"):
        return DbrxForCausalLM(preset_config("tiny"))  # d_model 64: K=64 < group 128


# ---------------------------------------------------------------------------------------- quality
def _float_model(seed=0):
    config = preset_config("tiny", d_model=128, ffn_hidden_size=128)
    model = DbrxForCausalLM(config).init_weights(torch.Generator().manual_seed(seed))
    return model.eval().requires_grad_(False)


def _rel_logit_error(qc: QuantConfig) -> tuple[float, float, int]:
    """(relative logit error vs float, max relative weight error over quantized matrices,
    number of quantized matmuls a token passes through)."""
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = _float_model()(ids).logits
    model = _float_model()
    eps = []
    for name, p in model.named_parameters():
        kind = ("attn" if ".attn." in name else "experts" if ".experts." in name
                else "lm_head" if name.startswith("lm_head") else None)
        mq = qc.for_kind(kind) if kind else None
        if mq is not None and mq.quantized:
            w = p.reshape(model.config.num_experts, -1, p.shape[-1]) if kind == "experts" else p
            qt = quantize_tensor(w if not name.endswith("w2") else w.transpose(1, 2), mq.bits,
                                 mq.group_size, mq.symmetric)
            wd = qt.dequantize() if not name.endswith("w2") else qt.dequantize().transpose(1, 2)
            eps.append(((wd - w).norm() / w.norm()).item())
    quantize_model_rtn(model, qc, backend="torch")  # the weights' error alone, no kernel error
    out = model(ids).logits
    n_mm = model.config.n_layers * ((2 if qc.attn.quantized else 0) + (3 if qc.experts.quantized else 0)) \
        + (1 if qc.lm_head.quantized else 0)
    return ((out - ref).norm() / ref.norm()).item(), max(eps), n_mm


def test_int8_per_channel_keeps_logits_close_and_int4_is_worse():
    int8 = QuantConfig(experts=ModuleQuant(8, -1), attn=ModuleQuant(8, -1), lm_head=ModuleQuant(8, -1))
    int4 = QuantConfig(experts=ModuleQuant(4, 32), attn=ModuleQuant(4, 32))
    err8, eps8, n8 = _rel_logit_error(int8)
    err4, eps4, n4 = _rel_logit_error(int4)
    # Each quantized matmul perturbs its output by ~eps_w relative (eps_w = ||W - W_q|| / ||W||,
    # measured above; ~0.0063 for int8 per-channel over K=128). Independent perturbations from M
    # matmuls on a token's path add in quadrature: ~sqrt(M) * eps_w; 2x for the non-linear parts
    # (softmax, GLU, LayerNorm, the odd routing flip). Measured: err8 ~ 0.02 with M = 11.
    assert err8 <= 2 * math.sqrt(n8) * eps8, (err8, eps8, n8)
    assert err8 < 0.05
    assert err4 <= 2 * math.sqrt(n4) * eps4, (err4, eps4, n4)
    assert err4 > 3 * err8  # int4 g32 steps are 16x coarser than int8's (8x per-channel ranges)


def test_forced_backend_applies_where_it_can_and_warns_once(monkeypatch, caplog):
    """DBRXQ_BACKEND=cpu_q4 on the default recipe (int4 experts, int8 attention): the experts run
    cpu_q4, the int8 attention the automatic choice, with one warning; an unknown name is one
    line listing the backends."""
    import logging

    from dbrxq.core.errors import QuantizationError
    from quantize import cext, modules
    from quantize.primitives import quantize_tensor

    if cext.unavailable_reason():
        pytest.skip(cext.unavailable_reason())
    modules._WARNED.clear()
    w4, w8 = quantize_tensor(torch.randn(64, 128), 4, 128, True), quantize_tensor(torch.randn(64, 128), 8, -1, True)
    monkeypatch.setenv("DBRXQ_BACKEND", "cpu_q4")
    with caplog.at_level(logging.WARNING, logger="quantize.modules"):
        assert modules.prepare_weight(w4, None, torch.device("cpu")).backend == "cpu_q4"
        assert modules.prepare_weight(w8, None, torch.device("cpu")).backend == "cpu_q8"
        assert modules.prepare_weight(w8, None, torch.device("cpu")).backend == "cpu_q8"
    warnings = [r.getMessage() for r in caplog.records if "cannot run" in r.getMessage()]
    assert len(warnings) == 1 and "cpu_q4" in warnings[0] and "cpu_q8" in warnings[0]
    monkeypatch.setenv("DBRXQ_BACKEND", "foo")
    with pytest.raises(QuantizationError, match=r"backend 'foo' \(from DBRXQ_BACKEND\) is not one of torch, "):
        modules.prepare_weight(w4, None, torch.device("cpu"))
