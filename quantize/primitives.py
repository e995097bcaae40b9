"""Group-wise quantization primitives: qparams, quantize, dequantize, int4 pack/unpack.

Pure ``@torch.no_grad()`` functions following the one convention of :mod:`quantize.format`:

    W[..., n, k] ~= (code[..., n, k] - zero[..., n, k // G]) * scale[..., n, k // G]

codes uint8 in 0 .. 2**bits - 1, scales float16, zeros uint8 (stored only when asymmetric;
the implicit symmetric zero is 2**(bits-1)). Groups are G consecutive input columns (the last
dim, K); ``group_size=-1`` (or K) is per-channel, G = K. Every function accepts leading batch
dims ``[..., N, K]`` (e.g. experts ``[E, N, K]``), any device and any float dtype; the math runs
in float32.

We do not pad: K must be a multiple of G (and even for 4-bit). DBRX's dims (6144, 10752,
8192) are multiples of 128, so padding would only buy support for shapes we never serve.

Scale magnitudes are rounded to float16 *up* (to the next representable value at or above the
exact one) before any code is computed, and codes are computed with that rounded scale. Hence
(a) dequantize reproduces exactly what quantize intended, and (b) for asymmetric and 8-bit
symmetric weights the grid covers the group's range, so no value is clamped and
``|w - w_hat| <= scale / 2`` elementwise (up to float32 arithmetic rounding). Symmetric 2-4 bit
weights use every level and may clamp where that costs less squared error: there
``|w - w_hat| <= |scale| / 2`` within the grid's span and ``<= 1.5 |scale|`` beyond its short end
(:func:`compute_qparams`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dbrxq.core.errors import CheckpointError, QuantizationError
from quantize.format import (
    QWEIGHT,
    QZEROS,
    SCALES,
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
)

__all__ = [
    "QuantizedTensor",
    "check_bits",
    "compute_qparams",
    "dequantize",
    "pack_codes",
    "pack_int4",
    "packed_k",
    "quantize_codes",
    "quantize_tensor",
    "resolve_group_size",
    "unpack_codes",
    "unpack_int4",
]


# ----------------------------------------------------------------------------- validation


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is one of SUPPORTED_BITS, else raise QuantizationError."""
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(f"bits={bits!r} is not supported; use one of {SUPPORTED_BITS}")
    return bits


def resolve_group_size(group_size: int, k: int, bits: int) -> int:
    """The effective group length G for a weight with K = ``k`` input columns.

    ``-1`` (or ``k`` itself) means per-channel, G = K. Raises QuantizationError when the group
    size is not one of SUPPORTED_GROUP_SIZES, K is not a multiple of G, or K is odd at 4 bits
    (two codes share a byte; we do not pad).
    """
    check_bits(bits)
    if group_size not in SUPPORTED_GROUP_SIZES and group_size != k:
        raise QuantizationError(
            f"group_size={group_size!r} is not supported; use one of {SUPPORTED_GROUP_SIZES} "
            "(-1 = per-channel)"
        )
    g = k if group_size == -1 else group_size
    if g <= 0 or k % g != 0:
        raise QuantizationError(
            f"input dim K={k} is not divisible by group_size={group_size}; dbrxq does not pad "
            "(DBRX dims are multiples of 128)"
        )
    per = CODES_PER_UNIT[bits]
    if k % per != 0:
        raise QuantizationError(f"input dim K={k} is not a multiple of {per}; {bits}-bit packing needs that")
    return g


def _grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """[..., N, K] float32 -> [..., N, K // G, G] (a view when ``w`` is contiguous)."""
    return w.reshape(*w.shape[:-1], w.shape[-1] // g, g)


def _round_up_fp16(s: torch.Tensor) -> torch.Tensor:
    """Positive float32 -> the smallest float16 >= s (elementwise).

    Rounding up (not to nearest) keeps ``range / scale_fp16 <= qmax`` so the grid covers the
    group: see the module docstring. For positive finite halves, the next representable value
    is the bit pattern + 1.
    """
    h = s.to(torch.float16)
    low = h.float() < s
    bumped = (h.view(torch.int16) + 1).view(torch.float16)
    return torch.where(low, bumped, h)


# ----------------------------------------------------------------------------- qparams

# Divisors d of the full-range symmetric grid (scale = -m / d, m the group's signed extreme) tried per
# group, as offsets from q = 2**(bits-1): q - 1 is the old amax / (q - 1) grid, q puts m on code 0.
FULL_RANGE_OFFSETS = (-1.0, -0.5, 0.0, 0.5)


def _fp16_scales(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 scales (any sign; 0 for an all-zero group) -> float16, magnitudes rounded up and 0 -> 1.0;
    refuses a magnitude beyond float16's range."""
    mag = scale.abs()
    mag = torch.where(mag > 0, mag, torch.ones_like(mag))
    out = _round_up_fp16(mag)
    if not torch.isfinite(out).all():
        raise QuantizationError(
            f"weight of shape {tuple(w.shape)} has a range too large for float16 scales "
            f"(max |w| = {w.abs().max().item():.3g})"
        )
    return torch.where(scale < 0, -out, out)


def _full_range_scales(w: torch.Tensor, wg: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric scales at 2-4 bits over all 2**bits levels: see :func:`compute_qparams`."""
    q = 2 ** (bits - 1)
    m = wg.gather(-1, wg.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)  # NaN/inf win the argmax
    if not bool(torch.isfinite(m).all()):
        raise QuantizationError(f"weight of shape {tuple(w.shape)} contains NaN or inf values")
    best = err = None
    for off in FULL_RANGE_OFFSETS:
        s = _fp16_scales(w, -m / (q + off))
        sf = s.float().unsqueeze(-1)
        e = (wg / sf).round_().clamp_(-q, q - 1).mul_(sf).sub_(wg).square_().sum(dim=-1)
        if best is None:
            best, err = s, e
        else:
            better = e < err
            best, err = torch.where(better, s, best), torch.where(better, e, err)
    return best


@torch.no_grad()
def compute_qparams(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group scales (and zero points) for ``w``.

    Args:
        w: ``[..., N, K]`` weights, any float dtype and device.
        bits: 4 or 8.
        group_size: G in SUPPORTED_GROUP_SIZES, or -1 (per-channel, G = K).
        symmetric: implicit zero 2**(bits-1) if True, else a stored uint8 zero point.

    Returns:
        ``(scales, zeros)``: scales float16 ``[..., N, K // G]``; zeros uint8 of the same shape,
        or None when symmetric.

    Formulas, per group g (amax, min, max over the group's G values; q = 2**(bits-1)):
        symmetric, 8 bits: scale = amax / (q - 1)          (codes use -127..127 around 128)
        symmetric, 2-4 bits: all 2**bits levels (c - q) * scale, c = 0 .. 2q - 1: with m the
                    group's signed extreme (|m| = amax), scale = -m / d for the d in
                    (q - 1, q - 1/2, q, q + 1/2) whose grid has the least squared error over
                    the group. The scale's sign puts the grid's long side (q steps: code 0)
                    on m's side, as llama.cpp's Q4_0 does; d = q - 1 is the old
                    amax / (q - 1) grid (15 of 16 levels at 4 bits), so no group is worse
                    than there. Scales may be negative here (format_version 5).
        asymmetric: lo = min(min, 0), hi = max(max, 0)   (widened so 0 is exactly representable)
                    scale = (hi - lo) / (2**bits - 1)
                    zero = clamp(round(-lo / scale), 0, 2**bits - 1)   (with the fp16 scale)
    A group whose scale would be 0 (all zeros) gets scale 1.0: any positive scale reproduces
    zeros exactly, and 1.0 avoids a division by zero and fp16 subnormals.

    Raises:
        QuantizationError: unsupported bits/group size, K not divisible, non-finite weights, or
            a range too large for a float16 scale.
    """
    g = resolve_group_size(group_size, w.shape[-1], bits)
    wg = _grouped(w.float(), g)
    # NaN and inf propagate through amax/amin, so checking the per-group statistics is enough
    # (a full-tensor isfinite costs as much as the quantization itself).
    if symmetric and bits < 8:
        return _full_range_scales(w, wg, bits), None
    if symmetric:
        amax = wg.abs().amax(dim=-1)
        stats = (amax,)
        scale = amax / (2 ** (bits - 1) - 1)
    else:
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
        stats = (lo, hi)
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = (hi - lo) / (2**bits - 1)
    if not all(bool(torch.isfinite(t).all()) for t in stats):
        raise QuantizationError(f"weight of shape {tuple(w.shape)} contains NaN or inf values")
    scales = _fp16_scales(w, scale)
    if symmetric:
        return scales, None
    zeros = torch.round(-lo / scales.float()).clamp(0, 2**bits - 1).to(torch.uint8)
    return scales, zeros


# ----------------------------------------------------------------------------- codes


@torch.no_grad()
def quantize_codes(
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Unpacked codes for ``w`` under given qparams.

    ``code = clamp(round(w / scale) + zero, 0, 2**bits - 1)`` with zero = 2**(bits-1) when
    ``zeros`` is None (symmetric). Rounding is torch's round-half-to-even.

    Args:
        w: ``[..., N, K]`` weights.
        scales: float16 (or any float) ``[..., N, K // G]``.
        zeros: uint8 ``[..., N, K // G]`` or None.
    Returns:
        uint8 codes ``[..., N, K]`` on ``w``'s device.
    """
    g = resolve_group_size(group_size, w.shape[-1], bits)
    wg = _grouped(w.float(), g)
    assert scales.shape == wg.shape[:-1], (tuple(scales.shape), tuple(w.shape), g)
    zero = (
        torch.tensor(2 ** (bits - 1), dtype=torch.float32, device=w.device)
        if zeros is None
        else zeros.float().unsqueeze(-1)
    )
    q = wg / scales.float().unsqueeze(-1)  # fresh tensor: the in-place ops below do not touch w
    return q.round_().add_(zero).clamp_(0, 2**bits - 1).to(torch.uint8).reshape(w.shape)


@torch.no_grad()
def dequantize(
    codes_or_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    packed: bool | None = None,
) -> torch.Tensor:
    """The reference dequantizer: ``W = (code - zero) * scale`` -> ``[..., N, K]`` in ``dtype``.

    Args:
        codes_or_packed: uint8, either codes ``[..., N, K]`` or, below 8 bits, the packed
            ``qweight`` of :mod:`quantize.format`.
        scales: ``[..., N, K // G]``; zeros: uint8 ``[..., N, K // G]`` or None (symmetric).
        packed: whether the input is packed (below 8 bits). None infers it from the shapes:
            K = (K // G) * G must match the last dim (codes) or its packed length. Per-channel
            is ambiguous (one group, K unknown) and is taken as packed, the on-disk form.

    The product is formed in float32, where it is exact ((code - zero) has at most 9 bits,
    the fp16 scale 11), then cast to ``dtype``.
    """
    check_bits(bits)
    c = codes_or_packed
    if bits != 8:
        if packed is None:
            if group_size == -1:
                packed = True
            else:
                packed = logical_k(bits, c.shape[-1]) == scales.shape[-1] * group_size
        if packed:
            c = unpack_codes(c, bits)
    k = c.shape[-1]
    g = resolve_group_size(group_size, k, bits)
    if tuple(scales.shape) != (*c.shape[:-1], k // g) or (
        zeros is not None and zeros.shape != scales.shape
    ):
        raise QuantizationError(
            f"codes {tuple(c.shape)} do not fit scales {tuple(scales.shape)}"
            f"{'' if zeros is None else f' / qzeros {tuple(zeros.shape)}'} at "
            f"bits={bits}, group_size={group_size}"
        )
    zero = float(2 ** (bits - 1)) if zeros is None else zeros.float().unsqueeze(-1)
    w = (_grouped(c.float(), g) - zero) * scales.float().unsqueeze(-1)
    return w.reshape(c.shape).to(dtype)


# ----------------------------------------------------------------------------- packing

# K must be a multiple of this (codes that share bytes); see quantize.format
CODES_PER_UNIT = {2: 4, 3: 8, 4: 2, 8: 1}


def packed_k(bits: int, k: int) -> int:
    """Bytes per row of ``qweight`` for K codes of ``bits`` bits (quantize.format)."""
    return {2: k // 4, 3: k // 4 + k // 8, 4: k // 2, 8: k}[bits]


def logical_k(bits: int, packed: int) -> int:
    """K from the bytes per row of ``qweight`` (inverse of :func:`packed_k`)."""
    return {2: packed * 4, 3: packed * 8 // 3, 4: packed * 2, 8: packed}[bits]


@torch.no_grad()
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., N, K]`` -> ``qweight`` ``[..., N, packed_k]`` (quantize.format)."""
    if bits == 8:
        return codes.to(torch.uint8)
    if bits == 4:
        return pack_int4(codes)
    k = codes.shape[-1]
    per = CODES_PER_UNIT[bits]
    if k % per:
        raise QuantizationError(f"cannot pack {bits}-bit codes with K={k}; K must be a multiple of {per}")
    c = codes.to(torch.uint8)
    if c.numel() and int(c.max()) > 2**bits - 1:
        raise QuantizationError(f"{bits}-bit codes must be in 0..{2**bits - 1}, got max {int(c.max())}")
    low = c & 3  # 2-bit plane: four codes per byte, column 4j in bits 0-1 ... 4j+3 in bits 6-7
    plane2 = low[..., 0::4] | (low[..., 1::4] << 2) | (low[..., 2::4] << 4) | (low[..., 3::4] << 6)
    if bits == 2:
        return plane2
    hi = c >> 2  # 1-bit plane: eight high bits per byte, column 8j in bit 0
    plane1 = hi[..., 0::8]
    for i in range(1, 8):
        plane1 = plane1 | (hi[..., i::8] << i)
    return torch.cat([plane2, plane1], dim=-1)


@torch.no_grad()
def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """``qweight`` -> uint8 codes ``[..., N, K]``; inverse of :func:`pack_codes`."""
    if bits == 8:
        return qweight
    if bits == 4:
        return unpack_int4(qweight)
    p = qweight.to(torch.uint8)
    k = logical_k(bits, p.shape[-1])
    plane2 = p[..., : k // 4]
    low = torch.stack([(plane2 >> (2 * i)) & 3 for i in range(4)], dim=-1).reshape(*p.shape[:-1], k)
    if bits == 2:
        return low
    plane1 = p[..., k // 4:]
    hi = torch.stack([(plane1 >> i) & 1 for i in range(8)], dim=-1).reshape(*p.shape[:-1], k)
    return low | (hi << 2)


# ----------------------------------------------------------------------------- int4 packing


@torch.no_grad()
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[..., N, K]`` (values 0..15, K even) -> uint8 ``[..., N, K // 2]``.

    ``packed[..., j] = codes[..., 2j] | codes[..., 2j + 1] << 4`` (even column in the low nibble).
    """
    k = codes.shape[-1]
    if k % 2 != 0:
        raise QuantizationError(f"cannot pack int4 codes with odd K={k}; 4-bit needs an even K")
    c = codes.to(torch.uint8)
    if c.numel() and int(c.max()) > 15:
        raise QuantizationError(f"int4 codes must be in 0..15, got max {int(c.max())}")
    return c[..., 0::2] | (c[..., 1::2] << 4)


@torch.no_grad()
def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., N, K // 2]`` -> uint8 codes ``[..., N, K]``; inverse of :func:`pack_int4`."""
    p = packed.to(torch.uint8)
    both = torch.stack((p & 0x0F, p >> 4), dim=-1)  # [..., N, K // 2, 2]
    return both.reshape(*p.shape[:-1], p.shape[-1] * 2)


# ----------------------------------------------------------------------------- the container


@dataclass
class QuantizedTensor:
    """One quantized weight in the canonical layout of :mod:`quantize.format`.

    Attributes:
        qweight: uint8 ``[..., N, packed_k(bits, K)]`` (quantize.format).
        scales: float16 ``[..., N, K // G]``.
        qzeros: uint8 ``[..., N, K // G]``, or None when symmetric.
        bits: 2, 3, 4 or 8.
        group_size: as requested (-1 = per-channel); :attr:`group` is the resolved G.
        shape: the logical float shape ``[..., N, K]``.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None
    bits: int
    group_size: int
    shape: torch.Size

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        g = resolve_group_size(self.group_size, self.shape[-1], self.bits)
        want_q = (*self.shape[:-1], packed_k(self.bits, self.shape[-1]))
        want_s = (*self.shape[:-1], self.shape[-1] // g)
        bad = [
            f"{name} {tuple(t.shape)} (want {want})"
            for name, t, want in (
                (QWEIGHT, self.qweight, want_q),
                (SCALES, self.scales, want_s),
                (QZEROS, self.qzeros, want_s),
            )
            if t is not None and tuple(t.shape) != want
        ]
        if bad:
            raise QuantizationError(
                f"quantized tensor of shape {tuple(self.shape)}, bits={self.bits}, "
                f"group_size={self.group_size} has misshapen " + ", ".join(bad)
            )

    @property
    def group(self) -> int:
        """The resolved group length G (K when per-channel)."""
        return self.shape[-1] if self.group_size == -1 else self.group_size

    @property
    def symmetric(self) -> bool:
        return self.qzeros is None

    def codes(self) -> torch.Tensor:
        """Unpacked uint8 codes ``[..., N, K]``."""
        return unpack_codes(self.qweight, self.bits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[..., N, K]`` in ``dtype``; see :func:`dequantize`."""
        return dequantize(
            self.codes(), self.scales, self.qzeros, self.bits, self.group_size,
            dtype=dtype, packed=False,
        )

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """``{prefix.qweight, prefix.scales[, prefix.qzeros]}``; drops a trailing ``.weight``."""
        prefix = prefix.removesuffix(".weight")
        out = {f"{prefix}.{QWEIGHT}": self.qweight, f"{prefix}.{SCALES}": self.scales}
        if self.qzeros is not None:
            out[f"{prefix}.{QZEROS}"] = self.qzeros
        return out

    @classmethod
    def stack(cls, parts: list[QuantizedTensor]) -> QuantizedTensor:
        """Stack same-spec tensors ``[N, K]`` (e.g. one per expert) into ``[E, N, K]``."""
        assert parts, "nothing to stack"
        p0 = parts[0]
        spec = (p0.bits, p0.group_size, p0.shape, p0.symmetric)
        assert all((p.bits, p.group_size, p.shape, p.symmetric) == spec for p in parts), spec
        return cls(
            torch.stack([p.qweight for p in parts]),
            torch.stack([p.scales for p in parts]),
            None if p0.qzeros is None else torch.stack([p.qzeros for p in parts]),
            p0.bits, p0.group_size, torch.Size((len(parts), *p0.shape)),
        )

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], prefix: str, bits: int, group_size: int
    ) -> QuantizedTensor:
        """Inverse of :meth:`tensors`; the logical shape is read off ``qweight``.

        Raises QuantizationError when ``qweight`` or ``scales`` is missing or the shapes and
        dtypes do not fit ``bits`` / ``group_size``.
        """
        check_bits(bits)
        prefix = prefix.removesuffix(".weight")
        names = [f"{prefix}.{n}" for n in (QWEIGHT, SCALES, QZEROS)]
        missing = [n for n in names[:2] if n not in tensors]
        if missing:
            raise QuantizationError(f"missing quantized tensor(s): {', '.join(missing)}")
        qweight, scales = tensors[names[0]], tensors[names[1]]
        qzeros = tensors.get(names[2])
        for name, t, dt in ((names[0], qweight, torch.uint8), (names[1], scales, torch.float16),
                            (names[2], qzeros, torch.uint8)):
            if t is not None and t.dtype != dt:
                raise QuantizationError(f"{name} has dtype {t.dtype}, expected {dt}")
        k = logical_k(bits, qweight.shape[-1])
        return cls(qweight, scales, qzeros, bits, group_size, torch.Size((*qweight.shape[:-1], k)))


@torch.no_grad()
def quantize_tensor(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True
) -> QuantizedTensor:
    """Round-to-nearest quantization of ``w [..., N, K]`` into a :class:`QuantizedTensor`.

    Rows are processed in chunks of about 4M values so the float32 temporaries stay small and
    in cache-friendly sizes; groups run along K, so chunking rows does not change any result.
    """
    resolve_group_size(group_size, w.shape[-1], bits)
    flat = w.reshape(-1, w.shape[-1])
    rows = max(1, (1 << 22) // w.shape[-1])
    parts = []
    for r0 in range(0, flat.shape[0], rows):
        wf = flat[r0:r0 + rows].float()
        scales, zeros = compute_qparams(wf, bits, group_size, symmetric)
        codes = quantize_codes(wf, scales, zeros, bits, group_size)
        parts.append((pack_codes(codes, bits), scales, zeros))
    lead = w.shape[:-1]
    qweight = torch.cat([p[0] for p in parts]).reshape(*lead, -1)
    scales = torch.cat([p[1] for p in parts]).reshape(*lead, -1)
    zeros = None if symmetric else torch.cat([p[2] for p in parts]).reshape(*lead, -1)
    return QuantizedTensor(qweight, scales, zeros, bits, group_size, w.shape)


def check_qparams(scales: torch.Tensor | None, qzeros: torch.Tensor | None, bits: int, what: str, *,
                  symmetric: bool | None = None) -> None:
    """Refuse (CheckpointError, one line naming ``what``) scales that are not finite and positive
    (symmetric: finite and non-zero, format_version 5's full-range scales being signed), or zero points
    beyond the code range: such codes dequantize to NaN or garbage. ``symmetric`` None: whether
    ``qzeros`` is None. One pass over small tensors (1/32 of the codes' bytes at int4 g128: 2 bytes of
    scale per 64 bytes of codes)."""
    if scales is not None and scales.numel():
        signed = qzeros is None if symmetric is None else symmetric
        if scales.dtype == torch.float16:
            # one reduction: a positive finite half is a bit pattern in (0, 0x7C00), a finite non-zero one
            # such a pattern with any sign bit
            bits16 = scales.view(torch.int16)
            lo, hi = (bits16 & 0x7FFF if signed else bits16).aminmax()
            if int(lo) > 0 and int(hi) < 0x7C00:
                return check_qparams(None, qzeros, bits, what, symmetric=signed)
        s = scales.float()
        bad = int((~(torch.isfinite(s) & ((s != 0) if signed else (s > 0)))).sum())
        if bad:
            want = "finite and non-zero" if signed else "finite and positive"
            raise CheckpointError(f"{what}: {bad} scale(s) not {want}; the checkpoint is damaged")
    if qzeros is not None and qzeros.numel() and int(qzeros.max()) > 2**bits - 1:
        raise CheckpointError(f"{what}: zero points up to {int(qzeros.max())}, beyond the {bits}-bit code "
                              f"range; the checkpoint is damaged")

