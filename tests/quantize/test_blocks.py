"""The kernel's block layout in torch (quantize.blocks): byte for byte the C kernel's repack, and exactly
invertible, so a checkpoint stored in it still yields the canonical codes."""

import pytest
import torch

from quantize import blocks, cext
from quantize.primitives import QuantizedTensor, pack_codes

CASES = [  # bits, N, K, group size (-1: per channel), asymmetric
    (4, 48, 256, 128, False), (4, 40, 128, 32, True), (4, 16, 64, -1, False),
    (8, 32, 96, -1, False), (8, 24, 64, 32, True),
    (2, 16, 128, 64, True), (2, 37, 64, 32, False),
    (3, 32, 128, 64, True), (3, 21, 256, 128, False),
]


def random_weight(bits, n, k, group, asym, seed=0) -> QuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    gs = k if group == -1 else group
    codes = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, k // gs, generator=g) * 0.1 + 0.001).half()
    zeros = torch.randint(0, 2 ** bits, (n, k // gs), generator=g, dtype=torch.uint8) if asym else None
    return QuantizedTensor(pack_codes(codes, bits), scales, zeros, bits, group, (n, k))


@pytest.mark.parametrize("bits, n, k, group, asym", CASES)
def test_pack_equals_the_c_repack(bits, n, k, group, asym):
    lib = cext.load()
    if lib is None:
        pytest.skip(cext.unavailable_reason())
    qt = random_weight(bits, n, k, group, asym)
    g = k if group == -1 else group
    want = torch.empty(lib.dbrxq_packed_bytes(bits, n, k, g, int(asym)), dtype=torch.uint8)
    codes, scales = qt.codes().contiguous(), qt.scales.contiguous()
    zeros = qt.qzeros.contiguous() if asym else None
    lib.dbrxq_repack(codes.data_ptr(), scales.data_ptr(), zeros.data_ptr() if asym else None, bits, n, k, g,
                     want.data_ptr())
    got = blocks.pack(qt)
    assert got.numel() == blocks.packed_bytes(bits, n, k, g, asym) == want.numel()
    assert torch.equal(got, want)


@pytest.mark.parametrize("bits, n, k, group, asym", CASES)
def test_unpack_inverts_pack(bits, n, k, group, asym):
    qt = random_weight(bits, n, k, group, asym, seed=1)
    back = blocks.unpack(blocks.pack(qt), bits, n, k, group, asym)
    assert torch.equal(back.qweight, qt.qweight) and torch.equal(back.scales, qt.scales)
    assert (back.qzeros is None) == (not asym)
    if asym:
        assert torch.equal(back.qzeros, qt.qzeros)
    s, z = blocks.scales_of(blocks.pack(qt), bits, n, k, group, asym)
    assert torch.equal(s, qt.scales) and (z is None or torch.equal(z, qt.qzeros))


def test_one_changed_code_changes_one_byte_and_unpacks_to_it():
    """Not a layout that merely round-trips: each code has its own bits in the blocks."""
    qt = random_weight(4, 16, 64, -1, False, seed=2)
    codes = qt.codes().clone()
    codes[5, 37] ^= 0x3
    other = QuantizedTensor(pack_codes(codes, 4), qt.scales, None, 4, -1, (16, 64))
    a, b = blocks.pack(qt), blocks.pack(other)
    assert int((a != b).sum()) == 1
    assert torch.equal(blocks.unpack(b, 4, 16, 64, -1, False).codes(), codes)


def test_expert_slot_views_hold_each_weight():
    slot = blocks.ExpertSlot(bits=3, group_size=64, asym=True, d_model=128, ffn=192)
    w1, v1 = (random_weight(3, 192, 128, 64, True, seed=s) for s in (3, 4))
    w2 = random_weight(3, 128, 192, 64, True, seed=5)
    img = slot.pack(w1, v1, w2)
    assert img.numel() == slot.stride and slot.stride % blocks.PAGE == 0 and slot.nbytes <= slot.stride
    assert all(o % blocks.ALIGN == 0 for o in slot.offsets)
    for got, want in zip(slot.unpack(img), (w1, v1, w2)):
        assert torch.equal(got.codes(), want.codes()) and torch.equal(got.scales, want.scales)
        assert torch.equal(got.qzeros, want.qzeros)
    assert not img[slot.nbytes:].any()  # the page padding is zeros: the same file bytes every write


def test_shapes_the_kernel_cannot_hold_are_refused_with_the_way_out():
    with pytest.raises(Exception, match="--layout canonical"):
        blocks.check_packable(4, 16, 96, 32, "attn.Wqkv")
    blocks.check_packable(8, 16, 96, 32, "attn.Wqkv")


@pytest.mark.parametrize("bits, n, k, group, asym", [(4, 64, 256, 128, False), (2, 48, 256, 64, True),
                                                     (3, 40, 256, 32, False), (8, 37, 128, -1, True)])
@pytest.mark.parametrize("damage", ["none", "nan", "inf", "negative", "-inf", "-zero", "zero", "zero-point",
                                    "last-row"])
def test_check_numbers_in_place_agrees_with_the_gathered_check(bits, n, k, group, asym, damage):
    """The strided check of stored scales and zeros (no gather) refuses exactly what the exact check
    of the gathered ones refuses, with the same one-line message, partial last row blocks included.
    A negative scale is refused only with zero points: symmetric full-range scales are signed."""
    from dbrxq.core.errors import CheckpointError
    from quantize.primitives import check_qparams, resolve_group_size
    g = resolve_group_size(group, k, bits)
    data = torch.randint(0, 256, (blocks.packed_bytes(bits, n, k, g, asym),), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))
    scales = torch.rand(n, k // g, generator=torch.Generator().manual_seed(1)) + 0.1
    zeros = torch.randint(0, 2**bits, (n, k // g), dtype=torch.uint8) if asym else None
    row = n - 1 if damage == "last-row" else 5
    if damage in ("nan", "inf", "negative", "-inf", "-zero", "zero", "last-row"):
        scales[row, 0] = {"nan": float("nan"), "inf": float("inf"), "negative": -1.0, "-inf": -float("inf"),
                          "-zero": -0.0, "zero": 0.0, "last-row": float("nan")}[damage]
    if damage == "zero-point":
        if not asym:
            pytest.skip("symmetric weights store no zero points")
        zeros = zeros.clone()
        zeros[row, 0] = 2**bits if bits < 8 else 255
        if bits == 8:
            pytest.skip("an 8-bit zero point cannot exceed its range")
    blocks.set_qparams(data, bits, n, k, group, scales, zeros)
    gathered = blocks.scales_of(data, bits, n, k, group, asym)
    try:
        check_qparams(*gathered, bits, "w")
        want = None
    except CheckpointError as e:
        want = str(e)
    try:
        blocks.check_numbers(data, bits, n, k, group, asym, "w")
        got = None
    except CheckpointError as e:
        got = str(e)
    accepted = damage == "none" or (damage == "negative" and not asym)
    assert got == want and (want is None) == accepted, (got, want)
