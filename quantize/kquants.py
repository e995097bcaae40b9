"""llama.cpp's block grids, chosen by dbrxq: Q8_0 and Q6_K ... Q2_K codes and scales for a weight
``[N, K]``, their exact bytes in GGUF's layout, and their dequantization.

A grid says, per row and per block of columns, how a code maps back to a value: ``x = S * c - O``
with ``c`` an integer in ``[lo, hi]``. The per-block ``S`` and ``O`` are themselves quantized values
of the type (an fp16 super-scale times a 6- or 8-bit sub-block scale), chosen here from the weights
of one super-block (:meth:`Grid.params`) and then held fixed while the codes are chosen, by round to
nearest (:func:`quantize`) or by GPTQ (:meth:`quantize.gptq.GPTQ.quantize_grid`), which therefore
rounds onto the very grid that is written.

| type | values per block | code c | S per sub-block | O per sub-block | bytes / 256 values |
|---|---|---|---|---|---|
| Q8_0 | 32 | -127..127 | d (fp16) | 0 | 272 |
| Q6_K | 256 = 16 x 16 | -32..31 | d (fp16) x sc (int8) | 0 | 210 |
| Q5_K | 256 = 8 x 32 | 0..31 | d (fp16) x sc (6-bit) | dmin (fp16) x m (6-bit) | 176 |
| Q4_K | 256 = 8 x 32 | 0..15 | d (fp16) x sc (6-bit) | dmin (fp16) x m (6-bit) | 144 |
| Q3_K | 256 = 16 x 16 | -4..3 | d (fp16) x sc (6-bit signed) | 0 | 110 |
| Q2_K | 256 = 16 x 16 | 0..3 | d (fp16) x sc (4-bit) | dmin (fp16) x m (4-bit) | 84 |

Exactness: :func:`dequantize` computes in float32 in the order llama.cpp's reference (and the
``gguf`` package's numpy port) does, ``(d * sc) * c - dmin * m``, so dbrxq's dequantized weight and
llama.cpp's dequantization of the written bytes are equal, bit for bit (the bound is zero; the tests
compare with ``gguf.quants.dequantize``).

Choosing S and O. For the K-types each sub-block's scale (and min) is fitted by a small search: for
21 candidate scales around ``(max - min) / hi``, codes by rounding, then the weighted least-squares
(scale, min) for those codes (weights ``rms(x) + |x|``, llama.cpp's without an importance matrix, or
the caller's, e.g. the diagonal of the calibration Hessian); the best fit per sub-block wins. The
sub-block scales and mins are then put on their integer grid (4-bit Q2_K, 6-bit Q3_K/Q4_K/Q5_K,
8-bit Q6_K) under a fp16 super-scale, and only those quantized values are used from there on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dbrxq.core.errors import QuantizationError

QK_K = 256
CANDIDATES = torch.linspace(-1.0, 1.0, 21)  # relative steps of the scale search, in units of a code


@dataclass(frozen=True)
class Grid:
    """One llama.cpp type: ``block`` values share a super-scale; ``sub`` values share a sub-scale."""

    name: str
    block: int
    sub: int
    lo: int
    hi: int
    asym: bool  # a per-sub-block min (O) as well as a scale
    sc_hi: int  # the sub-block scales (and mins) are integers up to this (from 0, or from -sc_hi - 1
    #            when signed); 0 for Q8_0, whose blocks have d only

    @property
    def subs(self) -> int:
        return self.block // self.sub

    def params(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Quantized parameters of ``x [N, block]`` (float32): a dict of the stored fields (fp16 ``d``,
        ``dmin``; integer ``sc``, ``m``), from which :meth:`scale_offset` derives S and O. The same
        numbers whatever ``x``'s memory layout (a transposed view is copied first: sums over strided
        memory can round differently)."""
        x = x.contiguous()
        weights = None if weights is None else weights.contiguous()
        n = x.shape[0]
        if self.name == "Q8_0":
            d = (x.abs().amax(dim=1) / 127).to(torch.float16)
            return {"d": d.view(n, 1)}
        xs = x.view(n, self.subs, self.sub)
        w = _weights(xs) if weights is None else weights.view(n, self.subs, self.sub).float()
        top = self.sc_hi
        if self.asym:
            s, mval = _fit_asym(xs, w, self.hi)  # x ~ s * c - mval, s >= 0, mval >= 0
            d = (s.amax(dim=1) / top).to(torch.float16)
            dmin = (mval.amax(dim=1) / top).to(torch.float16)
            sc = _ratio(s, d, 0, top)
            m = _ratio(mval, dmin, 0, top)
            return {"d": d.view(n, 1), "dmin": dmin.view(n, 1), "sc": sc, "m": m}
        s = _fit_sym(xs, w, self.lo, self.hi)  # signed: the extreme may take the lowest code
        d = (s.abs().amax(dim=1) / top).to(torch.float16)
        sc = _ratio(s, d, -top - 1, top)
        return {"d": d.view(n, 1), "sc": sc}

    def scale_offset(self, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per sub-block ``S`` and ``O`` ``[N, subs]`` in float32, computed as llama.cpp does."""
        d = p["d"].float()
        if self.name == "Q8_0":
            return d, None
        S = d * p["sc"].float()
        return S, (p["dmin"].float() * p["m"].float() if self.asym else None)

    def codes(self, x: torch.Tensor, S: torch.Tensor, O: torch.Tensor | None) -> torch.Tensor:
        """Round ``x`` onto the grid: ``clamp(round((x + O) / S), lo, hi)``, 0 where S is 0."""
        t = x + O if O is not None else x
        c = torch.where(S != 0, torch.round(t / torch.where(S != 0, S, 1)), 0)
        return c.clamp(self.lo, self.hi)


GRIDS = {
    "Q8_0": Grid("Q8_0", 32, 32, -127, 127, False, 0),
    "Q6_K": Grid("Q6_K", QK_K, 16, -32, 31, False, 127),
    "Q5_K": Grid("Q5_K", QK_K, 32, 0, 31, True, 63),
    "Q4_K": Grid("Q4_K", QK_K, 32, 0, 15, True, 63),
    "Q3_K": Grid("Q3_K", QK_K, 16, -4, 3, False, 31),
    "Q2_K": Grid("Q2_K", QK_K, 16, 0, 3, True, 15),
}


# bytes of one block of each type in a GGUF file
BLOCK_BYTES = {"Q8_0": 34, "Q6_K": 210, "Q5_K": 176, "Q4_K": 144, "Q3_K": 110, "Q2_K": 84}


def grid(name: str) -> Grid:
    try:
        return GRIDS[name.upper()]
    except KeyError:
        raise QuantizationError(f"{name!r}: expected one of {', '.join(GRIDS)}") from None


def importance_weights(x: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """Per-value weights ``[N, B]`` from per-column ``importance [B]`` (an importance matrix, or the
    diagonal of the calibration Hessian): llama.cpp's ``qw * sqrt(sigma2 + x^2)``, sigma2 twice the
    row's mean square over the block."""
    sigma2 = 2 * x.square().mean(dim=1, keepdim=True)
    return importance.float().view(1, -1) * (sigma2 + x.square()).sqrt()


def _weights(xs: torch.Tensor) -> torch.Tensor:
    """llama.cpp's per-value weights without an importance matrix: rms of the sub-block + |x|."""
    return xs.square().mean(dim=-1, keepdim=True).sqrt() + xs.abs()


def _ratio(v: torch.Tensor, d: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Integers ``round(v / d)`` in [lo, hi] (0 where d is 0), the sub-block fields under super-scale d."""
    d = d.float().view(-1, 1)
    r = torch.where(d != 0, torch.round(v / torch.where(d != 0, d, 1)), 0).clamp(lo, hi)
    return r.to(torch.int8 if lo < 0 else torch.uint8)


def _fit_asym(xs: torch.Tensor, w: torch.Tensor, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sub-block (scale >= 0, min value >= 0) for x ~ scale * c - min, c in [0, hi]: the best
    weighted least-squares fit over the candidate roundings."""
    mn = xs.amin(dim=-1).clamp(max=0)
    mx = xs.amax(dim=-1)
    span = (mx - mn).clamp(min=1e-30)
    best_err = torch.full_like(mn, float("inf"))
    best_s, best_m = span / hi, -mn
    for step in CANDIDATES.tolist():
        iscale = (hi + step) / span
        c = torch.round((xs - mn.unsqueeze(-1)) * iscale.unsqueeze(-1)).clamp(0, hi)
        # weighted least squares for x ~ s * c + b (b = -min)
        sw, swc, swcc = w.sum(-1), (w * c).sum(-1), (w * c * c).sum(-1)
        swx, swcx = (w * xs).sum(-1), (w * c * xs).sum(-1)
        det = sw * swcc - swc * swc
        ok = det > 0
        s = torch.where(ok, (sw * swcx - swc * swx) / torch.where(ok, det, 1), span / hi)
        b = torch.where(ok, (swcc * swx - swc * swcx) / torch.where(ok, det, 1), mn)
        b = b.clamp(max=0)  # the min is at most 0, as llama.cpp keeps it
        s = torch.where(ok, (swcx - b * swc) / swcc.clamp(min=1e-30), s).clamp(min=0)
        err = (w * (s.unsqueeze(-1) * c + b.unsqueeze(-1) - xs).square()).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_m = torch.where(better, s, best_s), torch.where(better, -b, best_m)
    return best_s, best_m


def _fit_sym(xs: torch.Tensor, w: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Per sub-block signed scale for x ~ scale * c, c in [lo, hi]: the extreme value (with its sign)
    starts on the lowest code, then the best weighted fit over the candidate roundings."""
    idx = xs.abs().argmax(dim=-1, keepdim=True)
    ext = xs.gather(-1, idx).squeeze(-1)
    base = torch.where(ext != 0, ext / lo, 1e-30)  # ext -> lo (-32), using the full range of codes
    best_err = torch.full_like(base, float("inf"))
    best_s = base
    for step in CANDIDATES.tolist():
        s0 = ext / (lo - step * 0.5) if step else base
        s0 = torch.where(s0 != 0, s0, 1e-30)
        c = torch.round(xs / s0.unsqueeze(-1)).clamp(lo, hi)
        s = (w * c * xs).sum(-1) / (w * c * c).sum(-1).clamp(min=1e-30)
        err = (w * (s.unsqueeze(-1) * c - xs).square()).sum(-1)
        better = err < best_err
        best_err, best_s = torch.where(better, err, best_err), torch.where(better, s, best_s)
    return best_s


@dataclass
class KQuantized:
    """A weight ``[N, K]`` on a grid: codes ``[N, K]`` (int16) and per-block fields ``[N, K / block, ...]``."""

    grid: Grid
    codes: torch.Tensor
    fields: dict[str, torch.Tensor]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def block_fields(self, b: int) -> dict[str, torch.Tensor]:
        return {k: v[:, b] for k, v in self.fields.items()}


def check_shape(w: torch.Tensor, g: Grid) -> None:
    if w.dim() != 2 or w.shape[1] % g.block:
        raise QuantizationError(f"{g.name} needs rows of a multiple of {g.block} values, got a weight "
                                f"{tuple(w.shape)}")


def empty_fields(g: Grid, n: int, blocks: int) -> dict[str, torch.Tensor]:
    f = {"d": torch.empty(n, blocks, 1, dtype=torch.float16)}
    if g.name != "Q8_0":
        f["sc"] = torch.empty(n, blocks, g.subs, dtype=torch.uint8 if g.asym else torch.int8)
    if g.asym:
        f["dmin"] = torch.empty(n, blocks, 1, dtype=torch.float16)
        f["m"] = torch.empty(n, blocks, g.subs, dtype=torch.uint8)
    return f


def quantize(w: torch.Tensor, name: str, weights: torch.Tensor | None = None) -> KQuantized:
    """Round to nearest onto ``name``'s grid (per-column ``weights [K]`` optional, e.g. diag of H)."""
    g = grid(name)
    check_shape(w, g)
    x = w.float()
    n, k = x.shape
    fields = empty_fields(g, n, k // g.block)
    codes = torch.empty(n, k, dtype=torch.int16)
    for b in range(k // g.block):
        xb = x[:, b * g.block:(b + 1) * g.block]
        wb = None if weights is None else weights[b * g.block:(b + 1) * g.block].float().expand_as(xb)
        p = g.params(xb, wb)
        for key, v in p.items():
            fields[key][:, b] = v.view(n, -1)
        S, O = g.scale_offset(p)
        cols = lambda t: t.repeat_interleave(g.sub, dim=1)  # noqa: E731
        codes[:, b * g.block:(b + 1) * g.block] = g.codes(xb, cols(S), None if O is None else cols(O)).to(torch.int16)
    return KQuantized(g, codes, fields)


def dequantize(kq: KQuantized) -> torch.Tensor:
    """float32 ``[N, K]``, computed as llama.cpp's reference does (see the module docstring)."""
    g = kq.grid
    n, k = kq.shape
    blocks = k // g.block
    c = kq.codes.float().view(n, blocks, g.subs, g.sub)
    d = kq.fields["d"].float().view(n, blocks, 1)
    if g.name == "Q8_0":
        return (c.view(n, blocks, g.block) * d).view(n, k)
    S = (d * kq.fields["sc"].float()).unsqueeze(-1)
    out = S * c
    if g.asym:
        out = out - (kq.fields["dmin"].float().view(n, blocks, 1) * kq.fields["m"].float()).unsqueeze(-1)
    return out.view(n, k)


# ----------------------------------------------------------------------------- GGUF bytes

def to_bytes(kq: KQuantized) -> np.ndarray:
    """The tensor's GGUF bytes, ``uint8 [N, K / block * bytes_per_block]``."""
    g = kq.grid
    n, k = kq.shape
    nb = k // g.block
    c = kq.codes.numpy().astype(np.int16).reshape(n * nb, g.block)
    d = kq.fields["d"].numpy().reshape(n * nb, 1).view(np.uint8)
    if g.name == "Q8_0":
        out = np.concatenate([d, c.astype(np.int8).view(np.uint8)], axis=1)
    elif g.name == "Q6_K":
        q = (c + 32).astype(np.uint8).reshape(n * nb, 2, 4, 32)  # halves of 128: 4 runs of 32
        ql = (q[:, :, :2] & 0x0F) | ((q[:, :, 2:] & 0x0F) << 4)  # runs 0,1 low nibbles; 2,3 high
        qh = ((q >> 4) & 0x03)
        qh = qh[:, :, 0] | (qh[:, :, 1] << 2) | (qh[:, :, 2] << 4) | (qh[:, :, 3] << 6)
        sc = kq.fields["sc"].numpy().reshape(n * nb, 16).view(np.uint8)
        out = np.concatenate([ql.reshape(n * nb, 128), qh.reshape(n * nb, 64), sc, d], axis=1)
    elif g.name == "Q3_K":
        q = c.reshape(n * nb, 2, 4, 32)  # halves of 128: 4 runs of 32, 2 bits each in the 64 qs bytes
        low = (q & 3).astype(np.uint8)
        qs = low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)
        hb = (c.reshape(n * nb, 8, 32) >= 0).astype(np.uint8)  # the high bit is set for codes 0..3
        hmask = np.bitwise_or.reduce(hb << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1)
        sc = (kq.fields["sc"].numpy().reshape(n * nb, 16).astype(np.int16) + 32).astype(np.uint8)
        scales = np.empty((n * nb, 12), dtype=np.uint8)
        scales[:, :8] = (sc[:, :8] & 0x0F) | ((sc[:, 8:] & 0x0F) << 4)
        hi2 = (sc >> 4).reshape(n * nb, 4, 4)  # [shift s, byte k]: scale s * 4 + k
        scales[:, 8:] = hi2[:, 0] | (hi2[:, 1] << 2) | (hi2[:, 2] << 4) | (hi2[:, 3] << 6)
        out = np.concatenate([hmask, qs.reshape(n * nb, 64), scales, d], axis=1)
    elif g.name == "Q2_K":
        q = c.astype(np.uint8).reshape(n * nb, 2, 4, 32)
        qs = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
        scales = (kq.fields["sc"].numpy().reshape(n * nb, 16) & 0x0F) | (kq.fields["m"].numpy().reshape(n * nb, 16) << 4)
        dmin = kq.fields["dmin"].numpy().reshape(n * nb, 1).view(np.uint8)
        out = np.concatenate([scales.astype(np.uint8), qs.reshape(n * nb, 64), d, dmin], axis=1)
    else:
        dmin = kq.fields["dmin"].numpy().reshape(n * nb, 1).view(np.uint8)
        scales = _pack_scale_min(kq.fields["sc"].numpy().reshape(n * nb, 8), kq.fields["m"].numpy().reshape(n * nb, 8))
        q = c.astype(np.uint8).reshape(n * nb, 4, 2, 32)
        qs = ((q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)).reshape(n * nb, 128)
        parts = [d, dmin, scales]
        if g.name == "Q5_K":
            hb = (c.astype(np.uint8).reshape(n * nb, 8, 32) >> 4) & 1
            parts.append(np.bitwise_or.reduce(hb << np.arange(8, dtype=np.uint8).reshape(1, 8, 1), axis=1))
        out = np.concatenate([*parts, qs], axis=1)
    return out.reshape(n, -1)


def _pack_scale_min(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins in Q4_K/Q5_K's 12 bytes."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (m[:, :4] & 0x3F) | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return out


def _unpack_scale_min(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight mins (the inverse of :func:`_pack_scale_min`)."""
    sc = np.concatenate([b[:, 0:4] & 0x3F, (b[:, 8:12] & 0x0F) | ((b[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([b[:, 4:8] & 0x3F, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _bits_of(planes: np.ndarray, count: int) -> np.ndarray:
    """``planes [rows, 32]`` -> ``[rows, count, 32]``: bit u of each byte, u < count."""
    return (planes[:, None, :] >> np.arange(count, dtype=np.uint8).reshape(1, count, 1)) & 1


def from_bytes(raw: np.ndarray, name: str, shape: tuple[int, int]) -> KQuantized:
    """A tensor's GGUF bytes (``uint8``, rows of ``shape[1]`` values) back to codes and fields: the
    inverse of :func:`to_bytes`, integers and halves as stored."""
    g = grid(name)
    n, k = shape
    if k % g.block:
        raise QuantizationError(f"{g.name} needs rows of a multiple of {g.block} values, got {k}")
    nb = k // g.block
    per = BLOCK_BYTES[g.name]
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if raw.size != n * nb * per:
        raise QuantizationError(f"{g.name} tensor of shape {list(shape)} needs {n * nb * per} bytes, got {raw.size}")
    b = raw.reshape(n * nb, per)
    half = lambda col: torch.from_numpy(b[:, col:col + 2].copy().view(np.float16)).view(n, nb, 1)  # noqa: E731
    fields: dict[str, torch.Tensor] = {}
    if g.name == "Q8_0":
        fields["d"] = half(0)
        c = b[:, 2:].view(np.int8).astype(np.int16)
    elif g.name == "Q6_K":
        ql = b[:, :128].reshape(-1, 2, 2, 32)
        qh = b[:, 128:192].reshape(-1, 2, 32)
        low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # runs 0, 1 in the low nibbles, 2, 3 in the high
        high = np.stack([(qh >> (2 * r)) & 3 for r in range(4)], axis=2)
        c = (low | (high << 4)).astype(np.int16).reshape(-1, g.block) - 32
        fields["sc"] = torch.from_numpy(b[:, 192:208].copy().view(np.int8)).view(n, nb, 16)
        fields["d"] = half(208)
    elif g.name == "Q3_K":
        hmask, qs, sb = b[:, :32], b[:, 32:96].reshape(-1, 2, 32), b[:, 96:108]
        low = np.stack([(qs >> (2 * r)) & 3 for r in range(4)], axis=2).reshape(-1, 8, 32)
        c = (low.astype(np.int16) - 4 * (1 - _bits_of(hmask, 8).astype(np.int16))).reshape(-1, g.block)
        lo4 = np.concatenate([sb[:, :8] & 0x0F, sb[:, :8] >> 4], axis=1)
        hi2 = np.stack([(sb[:, 8:12] >> (2 * s)) & 3 for s in range(4)], axis=1).reshape(-1, 16)
        fields["sc"] = torch.from_numpy((lo4 | (hi2 << 4)).astype(np.int16) - 32).to(torch.int8).view(n, nb, 16)
        fields["d"] = half(108)
    elif g.name == "Q2_K":
        sb, qs = b[:, :16], b[:, 16:80].reshape(-1, 2, 32)
        c = np.stack([(qs >> (2 * r)) & 3 for r in range(4)], axis=2).astype(np.int16).reshape(-1, g.block)
        fields["sc"] = torch.from_numpy(sb & 0x0F).view(n, nb, 16)
        fields["m"] = torch.from_numpy(sb >> 4).view(n, nb, 16)
        fields["d"], fields["dmin"] = half(80), half(82)
    else:  # Q4_K, Q5_K
        fields["d"], fields["dmin"] = half(0), half(2)
        sc, m = _unpack_scale_min(b[:, 4:16])
        fields["sc"] = torch.from_numpy(sc.astype(np.uint8)).view(n, nb, 8)
        fields["m"] = torch.from_numpy(m.astype(np.uint8)).view(n, nb, 8)
        qs = b[:, -128:].reshape(-1, 4, 32)
        c = np.stack([qs & 0x0F, qs >> 4], axis=2).astype(np.int16).reshape(-1, g.block)
        if g.name == "Q5_K":
            c = c | (_bits_of(b[:, 16:48], 8).astype(np.int16).reshape(-1, g.block) << 4)
    return KQuantized(g, torch.from_numpy(np.ascontiguousarray(c)).view(n, k), fields)
