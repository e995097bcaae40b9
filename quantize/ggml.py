"""dbrxq's quantized codes as GGML block types (GGUF files for llama.cpp), with no weight changed.

GGML's 32-value blocks and dbrxq's groups describe the same numbers:

    Q4_0  block = fp16 d, 16 bytes of 4-bit q (value j in the low nibble of byte j, value j+16
          in the high nibble);  w = (q - 8) * d
    Q4_1  block = fp16 d, fp16 m, 16 bytes of q as in Q4_0;  w = q * d + m
    Q8_0  block = fp16 d, 32 int8 q;  w = q * d

dbrxq stores ``w = (code - zero) * scale`` with an fp16 scale per group of G input columns and
zero = 8 (int4) or 128 (int8) when symmetric. So:

* int4 symmetric -> Q4_0: q = code, d = the group's scale, repeated over its G/32 blocks. Exact.
* int8 symmetric -> Q8_0: q = code - 128 (an int8), d = scale repeated. Exact.
* int4 asymmetric -> Q4_1: q = code, d = scale, m = fp16(-zero * scale). The one change is the
  rounding of m to fp16 (round to nearest): per group, ``|w_gguf - w_dbrxq| <= 2**-11 * zero *
  scale`` (half an fp16 ulp of m), plus the float32 rounding of ``q*d + m`` versus
  ``(q - zero) * scale`` (one ulp of the larger of the two products). See :func:`q4_1_bound`.
* anything else (int8 asymmetric, a group or per-channel row that is not a multiple of 32)
  has no exact GGML type: :func:`exact_type` says None and the exporter refuses it unless the
  user asks to re-quantize (:func:`requantize_q8_0`, :func:`float_to_type`).

Everything here works on one tensor ``[..., N, K]`` at a time and returns the GGUF bytes as a
uint8 array ``[..., N, K / 32 * block_bytes]``: rows stay rows, so one expert can be converted
alone. The container (header, metadata, alignment) is the ``gguf`` package's.
"""

from __future__ import annotations

import numpy as np
import torch

from dbrxq.core.errors import QuantizationError
from quantize import kquants
from quantize.primitives import QuantizedTensor, quantize_tensor

BLOCK = 32
# bytes per 32-value block
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
# float types: bytes per value
FLOAT_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def exact_type(bits: int, symmetric: bool, group: int, k: int) -> str | None:
    """The GGML type that holds dbrxq codes of this recipe without changing a weight, or None.

    ``group`` is the resolved group length G (K when per-channel); the blocks need G % 32 == 0.
    """
    if group % BLOCK or k % BLOCK:
        return None
    if bits == 4:
        return "Q4_0" if symmetric else "Q4_1"
    if bits == 8 and symmetric:
        return "Q8_0"
    return None


# K-types: bytes per block of 256 values (quantize.kquants)
K_BLOCK_BYTES = {t: n for t, n in kquants.BLOCK_BYTES.items() if t.endswith("_K")}


def row_bytes(ggml_type: str, k: int) -> int:
    """Bytes of one row of K values in ``ggml_type``."""
    if ggml_type in FLOAT_BYTES:
        return k * FLOAT_BYTES[ggml_type]
    if ggml_type in K_BLOCK_BYTES:
        assert k % kquants.QK_K == 0, (ggml_type, k)
        return k // kquants.QK_K * K_BLOCK_BYTES[ggml_type]
    assert k % BLOCK == 0, (ggml_type, k)
    return k // BLOCK * BLOCK_BYTES[ggml_type]


def _block_scales(t: torch.Tensor, group: int) -> np.ndarray:
    """fp16 per-group values ``[..., N, K/G]`` -> their bytes per 32-block ``[..., N, K/32, 2]``."""
    s = t.to(torch.float16).numpy()
    s = np.repeat(s, group // BLOCK, axis=-1)
    return s[..., None].view(np.uint8)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes ``[..., N, K]`` (0..15) -> GGML's 4-bit packing ``[..., N, K/32, 16]``."""
    b = codes.reshape(*codes.shape[:-1], codes.shape[-1] // BLOCK, BLOCK)
    return b[..., :16] | (b[..., 16:] << 4)


def q4_0(qt: QuantizedTensor) -> np.ndarray:
    """int4 symmetric dbrxq codes -> Q4_0 bytes, bit-exact."""
    assert qt.bits == 4 and qt.symmetric and exact_type(4, True, qt.group, qt.shape[-1]) == "Q4_0"
    codes = qt.codes().numpy()
    out = np.concatenate([_block_scales(qt.scales, qt.group), _nibbles(codes)], axis=-1)
    return out.reshape(*codes.shape[:-1], -1)


def q8_0(qt: QuantizedTensor) -> np.ndarray:
    """int8 symmetric dbrxq codes (w = (c - 128) * s) -> Q8_0 bytes (q = c - 128), bit-exact."""
    assert qt.bits == 8 and qt.symmetric and exact_type(8, True, qt.group, qt.shape[-1]) == "Q8_0"
    codes = qt.codes().numpy()
    q = (codes ^ np.uint8(0x80)).reshape(*codes.shape[:-1], codes.shape[-1] // BLOCK, BLOCK)  # c - 128 as int8 bits
    out = np.concatenate([_block_scales(qt.scales, qt.group), q], axis=-1)
    return out.reshape(*codes.shape[:-1], -1)


def q4_1_offsets(qt: QuantizedTensor) -> torch.Tensor:
    """Q4_1's m per group: fp16(-zero * scale), computed in float32 (exact: 4 x 11 bits) and rounded
    to nearest once."""
    return (-(qt.qzeros.float() * qt.scales.float())).to(torch.float16)


def q4_1(qt: QuantizedTensor) -> np.ndarray:
    """int4 asymmetric dbrxq codes -> Q4_1 bytes; m rounded to fp16 (bound: :func:`q4_1_bound`)."""
    assert qt.bits == 4 and not qt.symmetric and exact_type(4, False, qt.group, qt.shape[-1]) == "Q4_1"
    codes = qt.codes().numpy()
    d = _block_scales(qt.scales, qt.group)
    m = _block_scales(q4_1_offsets(qt), qt.group)
    out = np.concatenate([d, m, _nibbles(codes)], axis=-1)
    return out.reshape(*codes.shape[:-1], -1)


def q4_1_bound(qt: QuantizedTensor) -> torch.Tensor:
    """Per-value bound ``[..., N, K]`` on |Q4_1 value - dbrxq value|: half an fp16 ulp of m
    (2**-11 relative, or 2**-25 absolute in fp16's subnormal range) plus two float32 roundings of
    the larger of |q * d| and |m| (GGML computes q * d + m in float32; dbrxq (q - zero) * scale)."""
    zs = qt.qzeros.float() * qt.scales.float()
    big = torch.maximum(zs, 15 * qt.scales.float())
    per_group = torch.maximum(zs * 2.0**-11, torch.full_like(zs, 2.0**-25)) + big * 2.0**-22
    return per_group.repeat_interleave(qt.group, dim=-1)


def from_codes(qt: QuantizedTensor) -> tuple[str, np.ndarray]:
    """(GGML type, bytes) of a dbrxq quantized tensor with an exact GGML type."""
    kind = exact_type(qt.bits, qt.symmetric, qt.group, qt.shape[-1])
    if kind is None:
        raise QuantizationError(f"no exact GGML type for int{qt.bits} {'sym' if qt.symmetric else 'asym'} "
                                f"group {qt.group} of rows of {qt.shape[-1]}")
    return kind, {"Q4_0": q4_0, "Q4_1": q4_1, "Q8_0": q8_0}[kind](qt)


def requantize_q8_0(w: torch.Tensor) -> np.ndarray:
    """Float ``[..., N, K]`` -> Q8_0 by round to nearest per 32-block (d = amax / 127, the scale
    rounded to fp16 first, q = round(w / d)); used only when the user passes --requantize."""
    qt = quantize_tensor(w.float(), 8, BLOCK, True)
    return q8_0(qt)


def float_to_type(w: torch.Tensor, ggml_type: str, what: str = "tensor") -> np.ndarray:
    """Float weights ``[..., N, K]`` -> bytes of ``ggml_type``.

    F32/F16/BF16 are conversions; Q8_0/Q4_0 quantize with dbrxq's own round-to-nearest at group
    32, symmetric (quantize.primitives), which then maps exactly onto the GGML type; the K-types
    round to nearest on their own grid (quantize.kquants).
    """
    if ggml_type == "F32":
        return w.float().contiguous().numpy().view(np.uint8)
    if ggml_type == "F16":
        h = w.to(torch.float16)
        if not torch.isfinite(h).all():
            raise QuantizationError(f"{what}: values beyond float16's range ({float(w.abs().max()):.3g}); "
                                    f"export it as BF16 or F32 (--float-type)")
        return h.contiguous().numpy().view(np.uint8)
    if ggml_type == "BF16":
        return w.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    if ggml_type == "Q8_0":
        return q8_0(quantize_tensor(w.float(), 8, BLOCK, True))
    if ggml_type == "Q4_0":
        return q4_0(quantize_tensor(w.float(), 4, BLOCK, True))
    if ggml_type in K_BLOCK_BYTES:  # dbrxq's round to nearest on llama.cpp's grid (quantize.kquants)
        rows = w.float().reshape(-1, w.shape[-1])
        return kquants.to_bytes(kquants.quantize(rows, ggml_type)).reshape(*w.shape[:-1], -1)
    raise AssertionError(ggml_type)
