"""The fused MoE kernels for GPUs (quantize/triton_moe.py), run by Triton's interpreter on CPU tensors: the
arithmetic of the very kernels a GPU compiles (nibble order, scales, zero points, masks, the grouping of
pairs by expert, padding), checked against the float MoE of the dequantized weights. On a GPU the same
kernels compile; their speed is scripts/bench_gpu.py's to measure."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are made (at their first use)

import pytest  # noqa: E402
import torch  # noqa: E402

from dbrxq.model.moe import moe_dispatch, route  # noqa: E402
from quantize import triton_moe  # noqa: E402
from quantize.primitives import quantize_tensor  # noqa: E402

pytestmark = pytest.mark.skipif(triton_moe.available() is not None or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs triton, run by its interpreter")


def _stack(E, n, k, bits, group, sym, seed):
    g = torch.Generator().manual_seed(seed)
    qts = [quantize_tensor(torch.randn(n, k, generator=g) * 0.05, bits, group, sym) for _ in range(E)]
    ws = [triton_moe.widen_to_int4(q) if bits < 4 else q for q in qts]
    z = None if ws[0].qzeros is None else torch.stack([w.qzeros for w in ws])
    return (torch.stack([w.qweight for w in ws]), torch.stack([w.scales for w in ws]), z), [q.dequantize() for q in qts]


@pytest.mark.parametrize("bits, sym", [(4, True), (4, False), (3, False), (2, False)])
@pytest.mark.parametrize("tokens", [1, 5, 37])
def test_fused_moe_is_the_float_moe_of_the_dequantized_weights(bits, sym, tokens):
    """D = 96 and F = 160 are not whole 64-blocks (masked edges); 37 tokens x top-2 over 4 experts give some
    experts more than one block of 16 pairs, and a run of 1 token leaves experts with none."""
    E, D, F, k, G = 4, 96, 160, 2, 32
    (w1, W1), (v1, V1), (w2, W2) = (_stack(E, F, D, bits, G, sym, 1), _stack(E, F, D, bits, G, sym, 2),
                                    _stack(E, D, F, bits, G, sym, 3))
    stack = triton_moe.Int4Stack(w1, v1, w2, G)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, D, generator=g)
    w, ids = route(torch.randn(tokens, E, generator=g), k, 1.0)
    got = triton_moe.moe(x, ids, w, stack)
    ref = moe_dispatch(x.double(), ids, w.double(), E, lambda e, xe: (
        torch.nn.functional.silu(xe @ W1[e].double().T) * (xe @ V1[e].double().T)) @ W2[e].double().T)
    scale = moe_dispatch(x.double().abs(), ids, w.double().abs(), E, lambda e, xe: (
        (xe @ W1[e].double().abs().T) * (xe @ V1[e].double().abs().T)) @ W2[e].double().abs().T)
    assert got.dtype == x.dtype
    # float32 accumulation only: each output sums at most max(D, F) = 160 float32 products, so it is off by
    # <= 160 u = 9.5e-6 of the sum of their magnitudes (`scale` bounds it, silu(t) <= |t|)
    assert ((got.double() - ref).abs() <= 1e-5 * scale + 1e-7).all()


def test_align_groups_pairs_by_expert_in_whole_blocks_of_a_fixed_count():
    """6 pairs over 4 experts in blocks of 4: at most ceil((6 + 4 x 3) / 4) = 5 blocks, whatever the routing
    (so no host sync); the blocks past the last expert's are marked -1."""
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])
    token, pair, block_e = triton_moe.align(ids, 4, block=4)
    assert block_e.tolist() == [0, 1, 2, -1, -1]  # expert 3 has no pairs: no block
    assert pair.tolist() == [1, 4, -1, -1, 3, -1, -1, -1, 0, 2, 5, -1] + [-1] * 8  # each expert's pairs in order
    assert token.tolist() == [0, 2, -1, -1, 1, -1, -1, -1, 0, 1, 2, -1] + [-1] * 8
    token, pair, block_e = triton_moe.align(torch.tensor([[3, 3], [3, 3], [3, 3]]), 4, block=4)
    assert block_e.tolist() == [3, 3, -1, -1, -1] and pair[:8].tolist() == [0, 1, 2, 3, 4, 5, -1, -1]


def test_a_quantized_model_runs_its_moe_through_the_kernels(tmp_path):
    """use_triton_moe on a quantized checkpoint (the blocks layout, int4 experts), float32: the logits are the
    dequantize-then-matmul reference's (backend torch) to float32 rounding; the fused kernels round no
    activations (the C kernel's int8 activations move this model's logits by up to ~1, through routing)."""
    import dbrxq
    from dbrxq.loading.loader import load_model
    from quantize.config import ModuleQuant, QuantConfig
    from quantize.writer import quantize_checkpoint
    out = quantize_checkpoint(dbrxq.default_model_dir(), tmp_path / "q",
                              QuantConfig(method="rtn", experts=ModuleQuant(4, 64, True)))
    model = load_model(out, dtype="float32", backend="torch")
    ids = torch.tensor([[5, 17, 99, 300, 7, 8]])
    with torch.inference_mode():
        ref = model(ids).logits
        assert triton_moe.use_triton_moe(model, "cpu") == model.config.n_layers
        got = model(ids).logits
    assert not torch.equal(got, ref)  # it did take the other path
    # both compute the same float32 products in another order (<= 128 u = 7.6e-6 of each sum's magnitude); a
    # misread nibble, scale or zero point moves these logits by O(1) (a nibble-order mutation fails this test)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
