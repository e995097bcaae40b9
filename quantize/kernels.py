"""Weight-only quantized matmul backends: y[..., N] = x[..., K] @ W[N, K]^T with W stored per
:mod:`quantize.format` (codes, fp16 scales, optional zero points; W = (code - zero) * scale).

One entry point, :func:`prepare`, takes a canonical :class:`~quantize.primitives.QuantizedTensor`
and repacks it ONCE, at load time, for the chosen backend; the resulting
:class:`PreparedWeight` has ``matmul(x)``. Backends (``BACKENDS``):

- ``torch``      dequantize to float32, then matmul. Runs everywhere; THE numerical reference.
- ``torch_int4`` torch's fused int4 kernels (``_weight_int4pack_mm_for_cpu`` on CPU,
                 ``_weight_int4pack_mm`` on CUDA, bf16). Exact mapping of our codes: torch
                 computes ``(q - 8) * scale + zero``, so we pass ``zero_f = (8 - z) * scale``.
- ``torch_int8`` ``_weight_int8pack_mm``: 8-bit, per-channel, symmetric only.
- ``bnb``        bitsandbytes NF4 (4-bit) / vector-wise int8 (8-bit), RE-quantized from the
                 dequantized weight: it changes the numbers and is here for comparison only.
- ``cpu_q4`` / ``cpu_q8`` dbrxq's own C kernel (quantize/csrc/qmatmul.c): activations
                 quantized to int8 (one scale per 32 values, or per 128 for int4 with groups
                 a multiple of 128), exact integer dot products on the codes.

:func:`available_backends` / :func:`backend_support` say what runs here and why not;
:func:`choose_backend` picks the fastest exact one (override by argument or $DBRXQ_BACKEND).
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F

from dbrxq.core.errors import QuantizationError
from quantize import cext, kquants
from quantize.blocks import BlocksTensor
from quantize.kquants import QK_K
from quantize.primitives import QuantizedTensor, pack_codes

log = logging.getLogger(__name__)

BACKENDS = ("torch", "torch_int4", "torch_int8", "bnb", "cpu_q4", "cpu_q8")
# What each backend supports, for one-line errors.
SUPPORTS = {
    "torch": "any bits, group size and device",
    "torch_int4": "bits=4 (or 2, 3: widened to int4), N % 16 == 0, group size a multiple of 32 (incl. per-channel); "
                  "CPU or CUDA",
    "torch_int8": "bits=8, per-channel (group_size=-1), symmetric; CPU (torch's int8 kernel) or CUDA "
                  "(bf16 codes, cuBLAS)",
    "bnb": "bits 4 (NF4) or 8 (int8) where bitsandbytes runs",
    "cpu_q4": "bits=4, 3 or 2 on CPU, K % 64 == 0, group size a multiple of 32 (incl. per-channel)",
    "cpu_q8": "bits=8 on CPU, K % 32 == 0, group size a multiple of 32 (incl. per-channel)",
}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- support


def _int4_group(g: int) -> int | None:
    """torch's int4 kernels take G in 32..256: the largest such G' dividing our G (scales are then
    repeated G/G' times; exact), or None."""
    return next((c for c in (256, 128, 64, 32) if g % c == 0), None)


@functools.lru_cache(maxsize=None)
def _bnb_reason() -> str | None:
    """None when bitsandbytes imports and runs a tiny NF4 matmul on CPU, else why not."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf

        q, st = bf.quantize_4bit(torch.ones(16, 64), quant_type="nf4", compress_statistics=False)
        bnb.matmul_4bit(torch.ones(1, 64), q.t(), quant_state=st)
    except Exception as e:  # ImportError, missing native library, unsupported CPU...
        return f"bitsandbytes unusable here: {type(e).__name__}: {str(e)[:120]}"
    return None


@functools.lru_cache(maxsize=None)
def _cuda_kernel_reason(backend: str, index: int) -> str | None:
    """None when ``backend``'s CUDA path runs on device ``index``, else why not: probed once per device
    by one matmul of a tiny weight (torch's _weight_int4pack_mm needs compute capability 8.0, and
    bf16 matmuls are not on every GPU)."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    dev = torch.device("cuda", index)
    k = 128
    bits, group = (4, 128) if backend == "torch_int4" else (8, -1)
    qt = QuantizedTensor(torch.zeros(16, k * bits // 8, dtype=torch.uint8), torch.ones(16, 1, dtype=torch.float16),
                         None, bits, group, (16, k))
    try:
        _CLASSES[backend](qt, dev).matmul(torch.zeros(1, k, dtype=torch.bfloat16, device=dev))
        torch.cuda.synchronize(dev)
    except Exception as e:  # NotImplementedError (no such kernel), RuntimeError (capability)
        return f"{backend} does not run on {torch.cuda.get_device_name(dev)}: " \
               f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return None


def backend_support(
    backend: str, device: torch.device | str, bits: int, group_size: int,
    dtype: torch.dtype = torch.float32, *, shape: tuple[int, int] | None = None,
    symmetric: bool = True,
) -> str | None:
    """None when ``backend`` can run this weight on ``device``, else a one-line reason.

    ``shape`` is the logical ``(N, K)``; without it, shape constraints are not checked.
    ``group_size`` -1 means per-channel.
    """
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {BACKENDS}"
    dev = torch.device(device)
    n, k = shape if shape is not None else (None, None)
    g = k if group_size == -1 else group_size
    if dtype not in _FLOAT_DTYPES:
        return f"activation dtype {dtype} is not one of {_FLOAT_DTYPES}"
    if backend == "torch":
        return None
    if dev.type not in ("cpu", "cuda"):
        return f"device {dev.type} is not supported"
    if backend == "torch_int4":
        if bits not in (2, 3, 4):
            return f"bits={bits}"
        if n is not None and n % 16:
            return f"N={n} is not a multiple of 16"
        if g is not None and g != -1 and _int4_group(g) is None:
            return f"group size {g} is not a multiple of 32"
        return _cuda_kernel_reason(backend, _index(dev)) if dev.type == "cuda" else None
    if backend == "torch_int8":
        if bits != 8 or not symmetric:
            return f"bits={bits}, symmetric={symmetric}"
        if group_size != -1 and (k is None or group_size != k):
            return f"group_size={group_size} is not per-channel"
        return _cuda_kernel_reason(backend, _index(dev)) if dev.type == "cuda" else None
    if backend == "bnb":
        if bits not in (4, 8):
            return f"bits={bits}"
        if dev.type != "cpu" and not torch.cuda.is_available():
            return "CUDA is not available"
        return _bnb_reason() if dev.type == "cpu" else None
    # cpu_q4 / cpu_q8 (cpu_q4 also runs 2- and 3-bit codes, in their own layouts)
    want = 4 if backend == "cpu_q4" else 8
    if dev.type != "cpu":
        return f"device {dev.type}: only CPU"
    if bits != want and not (want == 4 and bits in (2, 3)):
        return f"bits={bits}"
    if k is not None and k % (64 if want == 4 else 32):
        return f"K={k} is not a multiple of {64 if want == 4 else 32}"
    if g is not None and g != -1 and g % 32:
        return f"group size {g} is not a multiple of 32"
    return cext.unavailable_reason()


def _index(dev: torch.device) -> int:
    return dev.index if dev.index is not None else (torch.cuda.current_device() if torch.cuda.is_available() else 0)


def available_backends(
    device: torch.device | str, bits: int, group_size: int, dtype: torch.dtype = torch.float32,
    *, shape: tuple[int, int] | None = None, symmetric: bool = True,
) -> list[str]:
    """The backends that can run such a weight here, in BACKENDS order."""
    return [b for b in BACKENDS
            if backend_support(b, device, bits, group_size, dtype, shape=shape, symmetric=symmetric) is None]


def _check(backend, device, bits, group_size, dtype, shape, symmetric) -> None:
    why = backend_support(backend, device, bits, group_size, dtype, shape=shape, symmetric=symmetric)
    if why is not None:
        raise QuantizationError(
            f"backend {backend!r} cannot run bits={bits}, group_size={group_size}, shape={shape} "
            f"on {device}: {why} (it supports {SUPPORTS.get(backend, '-')})"
        )


def choose_backend(
    device: torch.device | str, bits: int, group_size: int, dtype: torch.dtype = torch.float32,
    *, shape: tuple[int, int] | None = None, symmetric: bool = True, override: str | None = None,
) -> str:
    """The backend to use: ``override`` (or $DBRXQ_BACKEND) when given, validated (raises
    QuantizationError naming what it supports); else the fastest exact backend available.

    Preference: CPU: our C kernel (cpu_q4/cpu_q8), then torch's fused kernels, then torch;
    CUDA: torch's fused kernels, then torch. bnb is never chosen automatically (it re-quantizes).
    """
    override = override or os.environ.get("DBRXQ_BACKEND") or None
    if override and override != "auto":
        _check(override, device, bits, group_size, dtype, shape, symmetric)
        return override
    order = (["cpu_q4", "cpu_q8"] if torch.device(device).type == "cpu" else []) + [
        "torch_int4", "torch_int8", "torch"]
    # only the candidates: probing bnb would import bitsandbytes (and its own imports) into every
    # process, resident memory a budget does not cover, for a backend never chosen automatically
    return next(b for b in order
                if backend_support(b, device, bits, group_size, dtype, shape=shape, symmetric=symmetric) is None)


# ----------------------------------------------------------------------------- prepared weights


class PreparedWeight:
    """A quantized weight W [N, K] repacked for one backend. ``matmul(x [..., K]) -> [..., N]``
    in x's dtype; ``nbytes`` is what one matmul reads of the weight (codes + scales [+ zeros])."""

    backend = "?"

    def __init__(self, qt: QuantizedTensor, device: torch.device):
        self.shape = tuple(qt.shape)  # (N, K)
        self.bits, self.group_size, self.group = qt.bits, qt.group_size, qt.group
        self.symmetric = qt.symmetric
        self.device = device
        self.nbytes = sum(t.numel() * t.element_size() for t in (qt.qweight, qt.scales, qt.qzeros)
                          if t is not None)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.shape
        assert x.shape[-1] == k, (tuple(x.shape), self.shape)
        y = self._mm(x.reshape(-1, k).to(self.device))  # [M, N]
        return y.to(x.dtype).reshape(*x.shape[:-1], n)

    __call__ = matmul

    def _mm(self, x2: torch.Tensor) -> torch.Tensor:  # [M, K] -> [M, N]
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(backend={self.backend!r}, shape={self.shape}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric})")


class TorchWeight(PreparedWeight):
    """Dequantize to float32 on every call, then a float32 matmul: the reference."""

    backend = "torch"

    def __init__(self, qt, device):
        super().__init__(qt, device)
        self.qt = QuantizedTensor(qt.qweight.to(device), qt.scales.to(device),
                                  None if qt.qzeros is None else qt.qzeros.to(device),
                                  qt.bits, qt.group_size, qt.shape)

    def _mm(self, x2):
        return x2.float() @ self.qt.dequantize(torch.float32).t()


class TorchInt4Weight(PreparedWeight):
    """torch's fused int4 kernels; scales_and_zeros [K/G', N, 2] in the activation dtype."""

    backend = "torch_int4"

    def __init__(self, qt, device):
        super().__init__(qt, device)
        n, k = self.shape
        g2 = _int4_group(self.group)
        self.g = g2
        codes = qt.codes()  # uint8 [N, K]
        if device.type == "cpu":
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        else:  # CUDA: uint8 [N, K/2], even column in the HIGH nibble (torch's convention, not ours)
            c = codes.to(device)
            tiles = next(t for t in (8, 4, 2, 1) if k % (t * 16) == 0)
            self.packed = torch.ops.aten._convert_weight_to_int4pack((c[:, ::2] << 4) | c[:, 1::2], tiles)
        s = qt.scales.float().repeat_interleave(self.group // g2, dim=1)  # [N, K/G']
        z = (torch.full_like(qt.scales, 8, dtype=torch.float32) if qt.qzeros is None
             else qt.qzeros.float()).repeat_interleave(self.group // g2, dim=1)
        # torch: (q - 8) * s + zero_f  ==  (q - z) * s  iff  zero_f = (8 - z) * s
        sz = torch.stack([s, (8 - z) * s], dim=-1).transpose(0, 1).contiguous()
        if device.type == "cuda":  # the CUDA kernel takes bf16 only: hold that copy alone, made now
            self.sz32, self._sz = None, {torch.bfloat16: sz.to(device, torch.bfloat16)}
        else:  # CPU: the activation's dtype, each copy made at its first use
            self.sz32, self._sz = sz.to(device), {}

    def _mm(self, x2):
        dt = x2.dtype if (self.device.type == "cpu" and x2.dtype in _FLOAT_DTYPES) else torch.bfloat16
        if dt not in self._sz:
            self._sz[dt] = self.sz32.to(dt)
        x2 = x2.to(dt).contiguous()
        if self.device.type == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.g, self._sz[dt])
        return torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.g, self._sz[dt])


class TorchInt8Weight(PreparedWeight):
    """int8 weights (code - 128) and per-row scales [N]: ``_weight_int8pack_mm`` on CPU. On CUDA, the
    codes in bf16 (exact: |code - 128| <= 128) through cuBLAS, then the row scales: torch's CUDA int8
    kernel ran a real-width Wqkv at 55x its read bound on an H200 (630 us; scripts/bench_gpu.py
    --profile), this at a few times it. Its output is rounded to bf16 twice (product, then scaled)."""

    backend = "torch_int8"

    def __init__(self, qt, device):
        super().__init__(qt, device)
        self.w = (qt.codes().to(torch.int16) - 128).to(torch.int8).to(device)  # [N, K], -127..127
        self.s32 = qt.scales[:, 0].float().to(device)  # [N]

    def _mm(self, x2):
        if self.device.type == "cuda":
            return (x2.to(torch.bfloat16) @ self.w.to(torch.bfloat16).t()) * self.s32.to(torch.bfloat16)
        dt = x2.dtype if x2.dtype in _FLOAT_DTYPES else torch.float32
        return torch.ops.aten._weight_int8pack_mm(x2.to(dt).contiguous(), self.w, self.s32.to(dt))


class BnbWeight(PreparedWeight):
    """bitsandbytes, for COMPARISON ONLY: the dequantized weight is re-quantized to NF4
    (blocksize 64, fp32 absmax; 4-bit) or vector-wise int8 (8-bit, activations quantized per row
    at run time), so results differ from the other backends by that extra quantization error."""

    backend = "bnb"

    def __init__(self, qt, device):
        super().__init__(qt, device)
        import bitsandbytes.functional as bf

        w = qt.dequantize(torch.float32).to(device)
        if self.bits == 4:
            self.q, self.state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        else:
            self.cb, self.scb, _ = bf.int8_vectorwise_quant(w)
        self.nbytes = (self.q.numel() + self.state.absmax.numel() * 4 if self.bits == 4
                       else self.cb.numel() + self.scb.numel() * 4)

    def _mm(self, x2):
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf

        if self.bits == 4:
            return bnb.matmul_4bit(x2.float(), self.q.t(), quant_state=self.state)
        xq, sx, _ = bf.int8_vectorwise_quant(x2.float().contiguous())
        return bf.int8_mm_dequant(bf.int8_linear_matmul(xq, self.cb), sx, self.scb)


class CpuQWeight(PreparedWeight):
    """dbrxq's C kernel (cpu_q4 / cpu_q8). Weights become blocks of 16 output rows interleaved
    so that one SIMD lane holds one row (codes, fp16 scales, uint8 zeros; see qmatmul.c). Activations are
    quantized per row to int8 with one scale d = amax/127 per span of ``act_span`` values (128
    for 4-bit weights whose group size is a multiple of 128, else 32), so vs the float reference
    |y - y_ref| <= sum_k |W[n,k]| * d_span(k) / 2 (+ float32 rounding); the code products
    themselves are exact integers. ``cpu_path`` forces "generic", "avx2" or "avx512" (default: by
    CPU); all three give bit-identical results, for any number of rows."""

    def __init__(self, qt, device, cpu_path: str | None = None):
        if isinstance(qt, BlocksTensor):  # already in the kernel's layout (a stored qblocks view): no copy
            self._from_blocks(qt, device, cpu_path)
            return
        super().__init__(qt, device)
        self.backend = "cpu_q8" if qt.bits == 8 else "cpu_q4"  # cpu_q4: 2, 3 and 4 bits
        self.lib = cext.load()
        self.path = cpu_path or cext.cpu_path()
        n, k = self.shape
        asym = qt.qzeros is not None
        nbytes = self.lib.dbrxq_packed_bytes(qt.bits, n, k, self.group, int(asym))
        codes = qt.codes().contiguous()
        scales = qt.scales.contiguous()
        zeros = qt.qzeros.contiguous() if asym else None
        self.w = torch.empty(nbytes, dtype=torch.uint8)  # blocks of 16 rows (qmatmul.c)
        self.lib.dbrxq_repack(codes.data_ptr(), scales.data_ptr(), zeros.data_ptr() if asym else None,
                              qt.bits, n, k, self.group, self.w.data_ptr())
        self.asym = int(asym)
        self.act_span = self.lib.dbrxq_act_span(qt.bits, self.group)

    def _from_blocks(self, bt: BlocksTensor, device, cpu_path: str | None) -> None:
        self.shape, self.bits, self.group_size, self.group = tuple(bt.shape), bt.bits, bt.group_size, bt.group
        self.symmetric, self.device = bt.symmetric, torch.device(device)
        self.backend = "cpu_q8" if bt.bits == 8 else "cpu_q4"
        self.lib = cext.load()
        self.path = cpu_path or cext.cpu_path()
        self.nbytes = bt.nbytes
        assert bt.blocks.dtype == torch.uint8 and bt.blocks.numel() >= self.nbytes, (bt.blocks.shape, self.nbytes)
        self.w = bt.blocks.reshape(-1)[: self.nbytes]  # a view: the stored bytes are the kernel's
        self.asym = int(bt.asym)
        self.act_span = self.lib.dbrxq_act_span(bt.bits, self.group)

    def _mm(self, x2):
        n, k = self.shape
        x2 = x2.float().contiguous()
        y = torch.empty(x2.shape[0], n, dtype=torch.float32)
        rc = self.lib.dbrxq_matmul(x2.data_ptr(), x2.shape[0], k, self.w.data_ptr(), n, self.bits,
                                   self.group, self.asym, y.data_ptr(), cext.PATHS[self.path],
                                   torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"dbrxq_matmul could not allocate its buffers (M={x2.shape[0]}, K={k})")
        return y

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """As PreparedWeight.matmul, with the fewest tensor operations around the one C call (a decode
        step makes two per layer, and their Python is part of every layer's fixed cost)."""
        n, k = self.shape
        y = self._mm(x.reshape(-1, k))
        return (y if x.dtype == torch.float32 else y.to(x.dtype)).view(*x.shape[:-1], n)

    __call__ = matmul


# GGML type ids of the K-quants; the C kernel takes KQ_BITS + id where other weights give their bits
GGML_TYPE_IDS = {"Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
KQ_BITS = 16


class CpuKQWeight(CpuQWeight):
    """A weight on one of llama.cpp's K-quant grids (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) in dbrxq's C kernel,
    its integers kept: blocks of 16 rows as :class:`CpuQWeight`'s, the codes in the 2-, 3- or 4-bit layout
    (5- and 6-bit codes as 4-bit nibbles plus a plane of high bits), each row's sub-block scales (and mins) as
    int8, its fp16 ``d`` (and ``dmin``) per 256 values. The weight computed with is llama.cpp's dequantization of the
    block exactly; activations take one int8 scale per 256 values (as llama.cpp's Q8_K), so
    ``|y - y_ref| <= sum_k |W[n, k]| d_256(k) / 2`` (+ float32 rounding). Made from a
    :class:`~quantize.kquants.KQuantized` (``kq``) or straight from a GGUF tensor's bytes (``raw``, in C,
    at memory speed). Q8_0 needs no class of its own: it is dbrxq's int8 symmetric g32 (:func:`prepare_ggml`)."""

    def __init__(self, kq=None, cpu_path: str | None = None, *, raw=None, ggml_type: str | None = None,
                 shape: tuple[int, int] | None = None, empty: bool = False):
        g = kq.grid if kq is not None else kquants.grid(ggml_type)
        n, k = kq.shape if kq is not None else shape
        self.shape, self.group_size, self.group, self.symmetric = (n, k), g.block, g.block, not g.asym
        self.device = torch.device("cpu")
        self.ggml_type = g.name
        self.bits = KQ_BITS + GGML_TYPE_IDS[g.name]
        self.backend = "cpu_q4"
        self.lib = cext.load()
        self.path = cpu_path or cext.cpu_path()
        self.asym = 0
        self.act_span = self.lib.dbrxq_act_span(self.bits, self.group)
        self.nbytes = self.lib.dbrxq_packed_bytes(self.bits, n, k, self.group, 0)
        self.w = torch.empty(self.nbytes, dtype=torch.uint8)
        if kq is None:
            if k % QK_K:
                raise QuantizationError(f"{g.name} tensor of shape {[n, k]} needs rows of a multiple of {QK_K} values")
            if not empty:
                size = np.asarray(raw).size
                if size != n * self.row_bytes:
                    raise QuantizationError(f"{g.name} tensor of shape {[n, k]} needs {n * self.row_bytes} bytes, "
                                            f"got {size}")
                self.fill_rows(0, raw)
            return
        codes = (kq.codes - g.lo).to(torch.uint8).contiguous()  # unsigned: c - off is llama.cpp's code
        f = kq.fields
        sc = f["sc"].reshape(n, -1).to(torch.int8).contiguous()  # |sc| <= 127 on every grid (Q6_K: int8 as stored)
        mn = f["m"].reshape(n, -1).to(torch.uint8).contiguous() if g.asym else None
        d = f["d"].reshape(n, -1).contiguous()
        dmin = f["dmin"].reshape(n, -1).contiguous() if g.asym else None
        self.lib.dbrxq_kq_repack(codes.data_ptr(), sc.data_ptr(), None if mn is None else mn.data_ptr(), d.data_ptr(),
                                 None if dmin is None else dmin.data_ptr(), self.bits, n, k, self.w.data_ptr())

    @property
    def row_bytes(self) -> int:
        """GGUF bytes of one row."""
        return self.shape[1] // QK_K * kquants.BLOCK_BYTES[self.ggml_type]

    def fill_rows(self, row0: int, raw) -> None:
        """Convert GGUF rows ``row0 ..`` (``raw``: whole rows; ``row0`` a multiple of 16, the rows a multiple of
        16 unless they end the tensor) into their blocks, in C (``empty=True`` made the weight to fill)."""
        n, k = self.shape
        src = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
        rows = src.size // self.row_bytes if self.row_bytes else 0
        if src.size != rows * self.row_bytes or row0 % 16 or row0 + rows > n or (rows % 16 and row0 + rows != n) \
                or (row0 == 0 and rows == 0 and n):
            raise QuantizationError(f"{self.ggml_type} tensor of shape {[n, k]} needs {n * self.row_bytes} bytes of "
                                    f"whole rows, got {src.size} bytes for rows from {row0}")
        dst = self.w.data_ptr() + row0 // 16 * self.lib.dbrxq_packed_bytes(self.bits, 16, k, self.group, 0)
        rc = self.lib.dbrxq_kq_from_ggml(src.ctypes.data, self.bits, rows, k, dst, torch.get_num_threads())
        if rc == -2:
            raise QuantizationError(f"{self.ggml_type} tensor {[n, k]} holds non-finite block scale(s) (d or dmin)")
        if rc:
            raise MemoryError(f"dbrxq_kq_from_ggml could not allocate its row buffers (K={k})")

    def __repr__(self) -> str:
        return f"CpuKQWeight({self.ggml_type}, shape={self.shape}, path={self.path!r})"


def prepare_ggml(raw, ggml_type: str, shape: tuple[int, int], cpu_path: str | None = None) -> PreparedWeight:
    """A GGUF tensor's bytes (Q8_0 or a K-quant, rows of ``shape[1]`` values) as dbrxq's C kernel weight,
    its numbers unchanged: Q8_0 becomes int8 symmetric g32 (code + 128, the fp16 scale as stored), a
    K-quant a :class:`CpuKQWeight` (converted in C). Raises QuantizationError for another type or a short tensor."""
    why = cext.unavailable_reason()
    if why is not None:
        raise QuantizationError(f"{ggml_type} tensor {list(shape)}: {why}")
    if ggml_type == "Q8_0":
        n, k = shape
        kq = kquants.from_bytes(raw, ggml_type, shape)
        if not bool(torch.isfinite(kq.fields["d"]).all()):
            raise QuantizationError(f"Q8_0 tensor {[n, k]} holds non-finite block scale(s) (d)")
        codes = (kq.codes + 128).to(torch.uint8)
        qt = QuantizedTensor(codes, kq.fields["d"].reshape(n, k // 32).contiguous(), None, 8, 32, (n, k))
        return CpuQWeight(qt, torch.device("cpu"), cpu_path)
    return CpuKQWeight(None, cpu_path, raw=raw, ggml_type=ggml_type, shape=shape)


_CLASSES = {"torch": TorchWeight, "torch_int4": TorchInt4Weight, "torch_int8": TorchInt8Weight,
            "bnb": BnbWeight, "cpu_q4": CpuQWeight, "cpu_q8": CpuQWeight}


def prepare(qt: QuantizedTensor | BlocksTensor, backend: str = "auto", device: torch.device | str = "cpu", *,
            dtype: torch.dtype = torch.float32, cpu_path: str | None = None) -> PreparedWeight:
    """Repack a canonical 2-D quantized weight [N, K] for ``backend`` ("auto": :func:`choose_backend`).
    A weight already in the CPU kernel's blocks (:class:`~quantize.blocks.BlocksTensor`) is used in place
    by the CPU kernel, and unpacked to the canonical codes for any other backend.

    Raises QuantizationError when the backend cannot run this weight on ``device``.
    """
    if len(qt.shape) != 2:
        raise QuantizationError(f"prepare() takes one [N, K] weight, got shape {tuple(qt.shape)}; "
                                "slice experts first")
    device = torch.device(device)
    shape = tuple(qt.shape)
    if backend == "auto":
        backend = choose_backend(device, qt.bits, qt.group_size, dtype, shape=shape, symmetric=qt.symmetric)
    else:
        _check(backend, device, qt.bits, qt.group_size, dtype, shape, qt.symmetric)
    if backend in ("cpu_q4", "cpu_q8"):
        return CpuQWeight(qt, device, cpu_path)
    if isinstance(qt, BlocksTensor):
        qt = qt.quantized()
    if backend == "torch_int4" and qt.bits in (2, 3):
        qt = widen_to_int4(qt)
    return _CLASSES[backend](qt, device)


def widen_to_int4(qt: QuantizedTensor) -> QuantizedTensor:
    """A 2- or 3-bit weight as the same numbers in int4 with zero points: code and scale unchanged,
    zero = the stored one or the implicit 2**(bits-1). Exact, so torch's int4 kernel (the CUDA path)
    runs 2/3-bit checkpoints, holding int4's bytes in memory; on CPU dbrxq's C kernel reads them
    natively (fewer bytes)."""
    zeros = qt.qzeros if qt.qzeros is not None else torch.full_like(qt.scales, 2 ** (qt.bits - 1), dtype=torch.uint8)
    return QuantizedTensor(pack_codes(qt.codes(), 4), qt.scales, zeros, 4, qt.group_size, qt.shape)


def _fusable(w1: PreparedWeight, v1: PreparedWeight, w2: PreparedWeight) -> bool:
    """Whether the three weights can go through the C kernel's fused GLU (dbrxq_glu)."""
    ws = (w1, v1, w2)
    if not all(isinstance(w, CpuQWeight) for w in ws):
        return False
    f, d = w1.shape
    same_x = w1.bits == v1.bits or (w1.bits >= KQ_BITS and v1.bits >= KQ_BITS)  # x quantized once for both
    return (v1.shape == (f, d) and w2.shape == (d, f) and same_x
            and len({w.asym for w in ws}) == 1 and len({w.path for w in ws}) == 1
            and w1.group == v1.group)


def glu(x: torch.Tensor, w1: PreparedWeight, v1: PreparedWeight, w2: PreparedWeight,
        act=F.silu, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One DBRX expert: ``(act(x @ w1^T) * (x @ v1^T)) @ w2^T``; x [..., D] -> [..., D].

    With silu and three cpu_q4/cpu_q8 weights of one kind, ONE call into the C kernel
    (dbrxq_glu: x quantized once, w1 and v1 in one parallel pass, silu * product in C);
    otherwise three matmuls. The two agree within the activation-quantization bound of w2's
    input (silu's exp is libm's expf in C and torch's otherwise: a last-bit difference can move
    one hidden value across a quantization boundary)."""
    if act is not F.silu or not _fusable(w1, v1, w2):
        y = w2.matmul(act(w1.matmul(x)) * v1.matmul(x))
        return y if out_dtype is None else y.to(out_dtype)
    f, d = w1.shape
    if x.shape[-1] != d:
        raise QuantizationError(f"glu: input of shape {tuple(x.shape)} has last dim {x.shape[-1]}, expected d_model={d}")
    x2 = x.reshape(-1, d).float().contiguous()
    y = torch.empty(x2.shape[0], d, dtype=torch.float32)
    rc = w1.lib.dbrxq_glu2(x2.data_ptr(), x2.shape[0], d, f, w1.w.data_ptr(), v1.w.data_ptr(), w2.w.data_ptr(),
                           w1.bits, v1.bits, w1.group, w2.bits, w2.group, w1.asym, y.data_ptr(), cext.PATHS[w1.path],
                           torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"dbrxq_glu could not allocate its buffers (M={x2.shape[0]}, D={d}, F={f})")
    return y.to(out_dtype or x.dtype).reshape(x.shape)


def moe_table(experts: list[tuple[PreparedWeight, PreparedWeight, PreparedWeight]], act=F.silu) -> torch.Tensor | None:
    """For :func:`moe`: per expert its blocks and recipe (int64 ``[E, 9]``), or None when a layer's experts
    cannot take the one-call path (another kernel, another activation, shapes the fused GLU does not take)."""
    if act is not F.silu or not all(_fusable(*p) for p in experts):
        return None
    if len({(p[0].shape, p[2].shape, p[0].path) for p in experts}) != 1:
        return None
    return torch.tensor([[w1.w.data_ptr(), v1.w.data_ptr(), w2.w.data_ptr(), w1.bits, v1.bits, w1.group, w2.bits,
                          w2.group, w1.asym] for w1, v1, w2 in experts], dtype=torch.int64)


def moe(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, table: torch.Tensor,
        experts: list) -> torch.Tensor:
    """A layer's MoE in one call into the C kernel (dbrxq_moe): x ``[N, D]``, expert_ids and float32
    weights ``[N, k]`` -> ``[N, D]`` in x's dtype. Bit for bit dbrxq.model.moe.moe_dispatch over
    :func:`glu` with float32 outputs: the same rows through the same kernel, summed in float32 in
    increasing expert id. ``table`` is :func:`moe_table`'s; ``experts`` keeps its weights alive."""
    w1 = experts[0][0]
    f, d = w1.shape
    x2 = x.reshape(-1, d).float().contiguous()
    ids = expert_ids if expert_ids.dtype == torch.int64 and expert_ids.is_contiguous() else \
        expert_ids.to(torch.int64).contiguous()  # route() gives int64 and float32, contiguous: used as they are
    wts = weights if weights.dtype == torch.float32 and weights.is_contiguous() else weights.float().contiguous()
    out = torch.empty(x2.shape[0], d, dtype=torch.float32)
    rc = w1.lib.dbrxq_moe(x2.data_ptr(), x2.shape[0], d, f, expert_ids.shape[-1], ids.data_ptr(), wts.data_ptr(),
                          table.data_ptr(), table.shape[0], out.data_ptr(), cext.PATHS[w1.path],
                          torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"dbrxq_moe could not allocate its buffers (N={x2.shape[0]}, D={d}, F={f})")
    return out.to(x.dtype).reshape(x.shape)
