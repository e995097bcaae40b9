"""The CPU kernel's block layout, as stored in a checkpoint (``layout: blocks``), and back.

dbrxq's C kernel (``quantize/csrc/qmatmul.c``) reads a weight ``[N, K]`` as blocks of RB = 16 output
rows, each block holding the rows' codes interleaved so that one 32-bit SIMD lane belongs to one row,
then the rows' fp16 scales ``[K/G][16]``, then (asymmetric) their uint8 zero points ``[K/G][16]``,
padded to 64 bytes; N is padded to a multiple of 16 with zero rows. Codes per block, for columns
``k0..``:

- 4 bits, per 8 columns: row r's byte j (of 4) = ``c[k0+j] | c[k0+4+j] << 4``;
- 2 bits, per 16 columns: byte j = ``c[k0+j] | c[k0+4+j] << 2 | c[k0+8+j] << 4 | c[k0+12+j] << 6``;
- 3 bits, per 32 columns: the low two bits of columns 0-15 and 16-31 as at 2 bits, then a plane of
  high bits, bit u of byte j = column ``4u + j``;
- 8 bits, per 4 columns: byte j = ``c[k0+j] ^ 0x80`` (the signed code c - 128).

:func:`pack` and :func:`unpack` are the same transform in torch (vectorised, no C compiler needed),
tested byte for byte against ``dbrxq_repack``; ``unpack(pack(x)) == x`` exactly, so a checkpoint in
this layout still yields the canonical codes and scales (GGUF export, the GPU kernels).

One expert of a ``blocks`` checkpoint is one *slot image*: w1's blocks, then v1's, then w2's, each
starting on a 64-byte boundary, the whole padded to whole 4 KiB pages (:class:`ExpertSlot`). A
layer's experts are one ``uint8 [E, stride]`` tensor, so an expert is one contiguous, page-aligned
range of the file: the runtime maps it in place or reads it with one ``preadv`` (O_DIRECT too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dbrxq.core.errors import QuantizationError
from quantize.primitives import QuantizedTensor, check_qparams, pack_codes, resolve_group_size

RB = 16  # rows per block
ALIGN = 64  # a block, and each weight inside a slot, starts on a cache line
PAGE = 4096  # a slot (one expert), and a stored weight, is whole pages: O_DIRECT reads, page-aligned maps
BLOCKS = "qblocks"  # the stored tensor's suffix: <name>.qblocks


def _round(n: int, to: int) -> int:
    return -(-n // to) * to


def codes_bytes(bits: int, k: int) -> int:
    """Code bytes of one block of RB rows."""
    per_row = {4: k // 2, 8: k, 2: k // 4, 3: 3 * k // 8}[bits]
    return RB * per_row


def block_bytes(bits: int, k: int, group: int, asym: bool) -> int:
    """Bytes of one block: codes, scales (and zeros), padded to 64."""
    return _round(codes_bytes(bits, k) + RB * (k // group) * (3 if asym else 2), ALIGN)


def packed_bytes(bits: int, n: int, k: int, group: int, asym: bool) -> int:
    """Bytes of a whole weight [N, K] in blocks (``dbrxq_packed_bytes``); ``group`` resolved (K for
    per-channel)."""
    return -(-n // RB) * block_bytes(bits, k, group, asym)


def check_packable(bits: int, n: int, k: int, group: int, what: str) -> None:
    """The shapes the kernel's blocks hold: K a multiple of 64 (4 bits and fewer) or 32 (8 bits), groups
    a multiple of 32 (or the whole row).

    Raises:
        QuantizationError: naming ``what`` and how to write it in the canonical layout instead.
    """
    kq = 64 if bits <= 4 else 32
    if k % kq or (group != k and group % 32):
        raise QuantizationError(f"{what} [{n}, {k}] with {bits}-bit codes in groups of {group}: the kernel's block "
                                f"layout needs K a multiple of {kq} and groups a multiple of 32; write it with "
                                f"--layout canonical")


def _group(qt: QuantizedTensor) -> int:
    return resolve_group_size(qt.group_size, qt.shape[-1], qt.bits)


# ---------------------------------------------------------------------------------------------- pack
def _codes_to_blocks(c: torch.Tensor, bits: int) -> torch.Tensor:
    """c uint8 [nb, RB, K] -> code bytes [nb, codes_bytes / RB * RB] in the block order."""
    nb, _, k = c.shape
    if bits == 4:
        q = c.view(nb, RB, k // 8, 2, 4)
        b = q[..., 0, :] | (q[..., 1, :] << 4)  # [nb, RB, K/8, 4]
    elif bits == 2:
        q = c.view(nb, RB, k // 16, 4, 4)
        b = q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)
    elif bits == 8:
        b = (c ^ 0x80).view(nb, RB, k // 4, 4)
    else:  # 3 bits, per 32 columns: two 2-bit planes (columns 0-15, 16-31), then the high bits
        low = (c & 3).view(nb, RB, k // 32, 2, 4, 4)
        planes = low[..., 0, :] | (low[..., 1, :] << 2) | (low[..., 2, :] << 4) | (low[..., 3, :] << 6)
        high = ((c >> 2) & 1).view(nb, RB, k // 32, 8, 4)
        hb = torch.zeros(nb, RB, k // 32, 4, dtype=torch.uint8)
        for u in range(8):
            hb |= high[..., u, :] << u
        b = torch.stack([planes[..., 0, :], planes[..., 1, :], hb], dim=3)  # [nb, RB, K/32, 3, 4]
        return b.permute(0, 2, 3, 1, 4).reshape(nb, -1)
    return b.permute(0, 2, 1, 3).reshape(nb, -1)  # [nb, K/x, RB, 4]: one 64-byte line per column group


def pack(qt: QuantizedTensor) -> torch.Tensor:
    """A canonical 2-D weight ``[N, K]`` in the kernel's blocks: uint8 ``[packed_bytes]``."""
    n, k = qt.shape
    g, asym = _group(qt), qt.qzeros is not None
    nb, ng = -(-n // RB), k // g
    codes = qt.codes().to(torch.uint8)
    pad = nb * RB - n
    fill = 0x80 if qt.bits == 8 else 0  # padding rows: zero bytes, as dbrxq_repack leaves them
    if pad:
        codes = torch.cat([codes, torch.full((pad, k), fill, dtype=torch.uint8)])
    scales = torch.cat([qt.scales.contiguous(), torch.zeros(pad, ng, dtype=torch.float16)])
    parts = [_codes_to_blocks(codes.view(nb, RB, k), qt.bits),
             scales.view(nb, RB, ng).transpose(1, 2).contiguous().view(torch.uint8).reshape(nb, -1)]
    if asym:
        zeros = torch.cat([qt.qzeros.contiguous(), torch.zeros(pad, ng, dtype=torch.uint8)])
        parts.append(zeros.view(nb, RB, ng).transpose(1, 2).reshape(nb, -1))
    used = sum(p.shape[1] for p in parts)
    parts.append(torch.zeros(nb, block_bytes(qt.bits, k, g, asym) - used, dtype=torch.uint8))
    return torch.cat(parts, dim=1).reshape(-1)


# -------------------------------------------------------------------------------------------- unpack
def _blocks_to_codes(b: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`_codes_to_blocks`: code bytes [nb, ...] -> codes uint8 [nb, RB, K]."""
    nb = b.shape[0]
    if bits == 3:
        t = b.reshape(nb, k // 32, 3, RB, 4).permute(0, 3, 1, 2, 4)  # [nb, RB, K/32, 3, 4]
        planes, hb = t[..., :2, :], t[..., 2, :]
        low = torch.stack([(planes >> s) & 3 for s in (0, 2, 4, 6)], dim=-2)  # [nb, RB, K/32, 2, 4q, 4j]
        high = torch.stack([(hb >> u) & 1 for u in range(8)], dim=-2)  # [nb, RB, K/32, 8, 4]
        return (low.reshape(nb, RB, k) | (high.reshape(nb, RB, k) << 2)).contiguous()
    per = {4: 8, 2: 16, 8: 4}[bits]
    t = b.reshape(nb, k // per, RB, 4).permute(0, 2, 1, 3)  # [nb, RB, K/per, 4]
    if bits == 8:
        return (t ^ 0x80).reshape(nb, RB, k).contiguous()
    w = 8 // (per // 4)  # bits per field: 4 or 2
    fields = torch.stack([(t >> (w * f)) & ((1 << w) - 1) for f in range(per // 4)], dim=3)  # [nb, RB, K/per, f, 4]
    return fields.reshape(nb, RB, k).contiguous()


def unpack(blocks: torch.Tensor, bits: int, n: int, k: int, group_size: int, asym: bool) -> QuantizedTensor:
    """The canonical weight (packed codes, scales, zeros) a weight's blocks hold; exact inverse of
    :func:`pack`. ``group_size`` as stored in the config (-1: per channel)."""
    g = resolve_group_size(group_size, k, bits)
    nb, ng = -(-n // RB), k // g
    bb, cb = block_bytes(bits, k, g, asym), codes_bytes(bits, k)
    b = blocks.reshape(-1)[: nb * bb].reshape(nb, bb)
    codes = _blocks_to_codes(b[:, :cb], bits, k).reshape(nb * RB, k)[:n]
    scales = b[:, cb:cb + 2 * RB * ng].contiguous().view(torch.float16).reshape(nb, ng, RB).transpose(1, 2)
    scales = scales.reshape(nb * RB, ng)[:n].contiguous()
    zeros = None
    if asym:
        z = b[:, cb + 2 * RB * ng:cb + 3 * RB * ng].reshape(nb, ng, RB).transpose(1, 2)
        zeros = z.reshape(nb * RB, ng)[:n].contiguous()
    return QuantizedTensor(pack_codes(codes, bits), scales, zeros, bits, group_size, (n, k))


def scales_of(blocks: torch.Tensor, bits: int, n: int, k: int, group_size: int, asym: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Just the scales (and zeros) of a weight's blocks, as views where possible: what a check of the
    numbers needs, without unpacking the codes."""
    g = resolve_group_size(group_size, k, bits)
    nb, ng = -(-n // RB), k // g
    bb, cb = block_bytes(bits, k, g, asym), codes_bytes(bits, k)
    b = blocks.reshape(-1)[: nb * bb].reshape(nb, bb)
    scales = b[:, cb:cb + 2 * RB * ng].contiguous().view(torch.float16).reshape(nb, ng, RB)
    scales = scales.transpose(1, 2).reshape(nb * RB, ng)[:n]
    zeros = None
    if asym:
        zeros = b[:, cb + 2 * RB * ng:cb + 3 * RB * ng].reshape(nb, ng, RB).transpose(1, 2).reshape(nb * RB, ng)[:n]
    return scales, zeros


def check_numbers(blocks: torch.Tensor, bits: int, n: int, k: int, group_size: int, asym: bool, what: str) -> None:
    """:func:`quantize.primitives.check_qparams` of a weight stored in blocks, without gathering its
    scales: in the whole row blocks they are checked where they lie, as one strided reduction over
    their bit patterns (a positive finite half is a pattern in (0, 0x7C00); a symmetric one's sign bit
    is masked off first), and the zeros by their maximum, with no gathered and transposed copy (the
    first read of an offloaded expert pays this check). A failure, or a last partial row block (whose
    padding rows hold zeros), goes through the exact check, which counts."""
    g = resolve_group_size(group_size, k, bits)
    nb, ng = -(-n // RB), k // g
    bb, cb = block_bytes(bits, k, g, asym), codes_bytes(bits, k)
    full = n // RB
    ok = False
    if full:
        b = blocks.reshape(-1)[: nb * bb].reshape(nb, bb)[:full]
        try:
            s16 = b[:, cb:cb + 2 * RB * ng].view(torch.int16)
            lo, hi = (s16 if asym else s16 & 0x7FFF).aminmax()  # symmetric scales may be negative
        except RuntimeError:  # a layout whose rows do not keep the scales 2-byte aligned
            lo, hi = torch.tensor(0), torch.tensor(0)
        ok = int(lo) > 0 and int(hi) < 0x7C00
        if ok and asym:
            ok = int(b[:, cb + 2 * RB * ng:cb + 3 * RB * ng].max()) <= 2**bits - 1
    if ok and full == nb:
        return
    scales, zeros = scales_of(blocks, bits, n, k, group_size, asym)
    check_qparams(scales, zeros, bits, what)


def set_qparams(blocks: torch.Tensor, bits: int, n: int, k: int, group_size: int, scales: torch.Tensor,
                zeros: torch.Tensor | None) -> None:
    """Write a weight's scales ``[N, K/G]`` (and zeros) into its blocks in place (the codes stay): with
    random code bytes, a random weight in the kernel's layout without a pack."""
    g = resolve_group_size(group_size, k, bits)
    nb, ng, asym = -(-n // RB), k // g, zeros is not None
    bb, cb = block_bytes(bits, k, g, asym), codes_bytes(bits, k)
    b = blocks.reshape(-1)[: nb * bb].view(nb, bb)
    pad = nb * RB - n
    s = torch.cat([scales.to(torch.float16), torch.zeros(pad, ng, dtype=torch.float16)])
    b[:, cb:cb + 2 * RB * ng] = s.view(nb, RB, ng).transpose(1, 2).contiguous().view(torch.uint8).reshape(nb, -1)
    end = cb + 2 * RB * ng
    if asym:
        z = torch.cat([zeros.to(torch.uint8), torch.zeros(pad, ng, dtype=torch.uint8)])
        b[:, end:end + RB * ng] = z.view(nb, RB, ng).transpose(1, 2).reshape(nb, -1)
        end += RB * ng
    b[:, end:] = 0


# --------------------------------------------------------------------------------------------- slots
@dataclass(frozen=True)
class ExpertSlot:
    """Where w1 ``[F, D]``, v1 ``[F, D]`` and w2 ``[D, F]`` sit in one expert's slot image."""

    bits: int
    group_size: int  # as in the config (-1: per channel)
    asym: bool
    d_model: int
    ffn: int

    def _group(self, k: int) -> int:
        return resolve_group_size(self.group_size, k, self.bits)

    @property
    def sizes(self) -> tuple[int, int, int]:
        """Block bytes of w1, v1, w2."""
        f, d = self.ffn, self.d_model
        up = packed_bytes(self.bits, f, d, self._group(d), self.asym)
        return up, up, packed_bytes(self.bits, d, f, self._group(f), self.asym)

    @property
    def offsets(self) -> tuple[int, int, int]:
        a, b, _ = self.sizes
        return 0, _round(a, ALIGN), _round(a, ALIGN) + _round(b, ALIGN)

    @property
    def nbytes(self) -> int:
        """The slot's used bytes (what one expert reads)."""
        return self.offsets[2] + _round(self.sizes[2], ALIGN)

    @property
    def stride(self) -> int:
        """Bytes between experts in the stored ``[E, stride]`` tensor: whole pages."""
        return _round(self.nbytes, PAGE)

    def shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        f, d = self.ffn, self.d_model
        return (f, d), (f, d), (d, f)

    def views(self, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """w1's, v1's and w2's blocks in one slot image (views, no copy)."""
        return tuple(slot[o:o + s] for o, s in zip(self.offsets, self.sizes))

    def pack(self, w1: QuantizedTensor, v1: QuantizedTensor, w2: QuantizedTensor) -> torch.Tensor:
        """One expert's canonical weights as its slot image, uint8 ``[stride]``."""
        out = torch.zeros(self.stride, dtype=torch.uint8)
        for dst, qt in zip(self.views(out), (w1, v1, w2)):
            dst.copy_(pack(qt))
        return out

    def unpack(self, slot: torch.Tensor) -> tuple[QuantizedTensor, QuantizedTensor, QuantizedTensor]:
        """One expert's canonical (w1, v1, w2) from its slot image."""
        return tuple(unpack(v, self.bits, n, k, self.group_size, self.asym)
                     for v, (n, k) in zip(self.views(slot), self.shapes()))


def weight_stored_bytes(bits: int, n: int, k: int, group_size: int, asym: bool) -> int:
    """Bytes of a stored non-expert weight (attention, lm_head): its blocks padded to whole pages, so
    the tensors after it stay page-aligned."""
    return _round(packed_bytes(bits, n, k, resolve_group_size(group_size, k, bits), asym), PAGE)


@dataclass(frozen=True)
class BlocksTensor:
    """A weight ``[N, K]`` held in the kernel's blocks (a view of a stored ``qblocks`` tensor): what
    quantize.kernels.prepare takes in place of a canonical QuantizedTensor. The CPU kernel uses the
    bytes as they are; any other backend gets :meth:`quantized` (unpacked, exact)."""

    blocks: torch.Tensor  # uint8, at least packed_bytes
    bits: int
    group_size: int  # as in the config (-1: per channel)
    shape: tuple[int, int]
    asym: bool

    @property
    def symmetric(self) -> bool:
        return not self.asym

    @property
    def group(self) -> int:
        return resolve_group_size(self.group_size, self.shape[1], self.bits)

    @property
    def nbytes(self) -> int:
        n, k = self.shape
        return packed_bytes(self.bits, n, k, self.group, self.asym)

    def quantized(self) -> QuantizedTensor:
        n, k = self.shape
        return unpack(self.blocks, self.bits, n, k, self.group_size, self.asym)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Its scales and zeros."""
        n, k = self.shape
        return scales_of(self.blocks, self.bits, n, k, self.group_size, self.asym)

    def check_numbers(self, what: str) -> None:
        """Refuse (one line) scales that are not finite and positive (symmetric: non-zero), zeros beyond the
        codes."""
        n, k = self.shape
        check_numbers(self.blocks, self.bits, n, k, self.group_size, self.asym, what)
