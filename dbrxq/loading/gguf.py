"""A DBRX GGUF file in dbrxq's runtime: ``dbrxq.load("model.gguf")``, ``dbrxq run model.gguf``.

One quantize serves both engines: the file `dbrxq quantize --recipe` (or `dbrxq export`) writes for
llama.cpp runs here too, as do llama.cpp's own K-quants of DBRX. Each tensor keeps its numbers:

- attention, experts and the head: Q2_K .. Q6_K in the C kernel's K-quant path
  (:class:`quantize.kernels.CpuKQWeight`: llama.cpp's integers, repacked into blocks of 16 rows), Q8_0 and
  Q4_0 as dbrxq's int8 / int4 symmetric g32 weights (the same codes and fp16 scales), floats as they are.
  The weight each computes with is llama.cpp's dequantization of the file's blocks, exactly; the
  activations are rounded to int8 as in llama.cpp (one scale per 256 values for K-quants, 32 for
  Q8_0 and Q4_0).
- the token embedding: dequantized to the model's dtype (llama.cpp dequantizes the rows it looks up);
  norms and the router: float, as stored (F32 in every file llama.cpp or dbrxq writes).

What is resident: the kernel copies of every quantized tensor (1.00-1.04x their file bytes, Q2_K 1.19x: its
scales and mins take a byte each), the embedding in the model's dtype, and the float tensors; the file's
pages are given back as each matrix is converted, and the mapping is closed after loading. Other types (llama.cpp's i-quants, Q4_1,
Q5_0, Q5_1) are refused in one line naming the tensor. CPU only: offloading budgets and GPUs take dbrxq's
own checkpoints.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dbrxq.core.errors import CheckpointError, ConfigError, QuantizationError
from dbrxq.core.memory import memory_limit, process_rss
from dbrxq.core.pages import PageReleaser, trim_heap
from dbrxq.core.sysinfo import parse_device
from dbrxq.core.units import format_size
from dbrxq.core.untrusted import check_finite
from dbrxq.formats.gguf_file import FLOAT_TYPES, GGUFModelFile, GGUFTensor
from dbrxq.model.dbrx import DbrxForCausalLM, skip_init
from dbrxq.model.moe import ACTIVATIONS, DbrxExperts
from dbrxq.text.tokenizer import from_gguf_vocab
from quantize import cext, kernels
from quantize.float_experts import use_float_kernel
from quantize.kquants import BLOCK_BYTES
from quantize.modules import PreparedExperts, PreparedLinear
from quantize.primitives import QuantizedTensor, pack_codes

log = logging.getLogger(__name__)

class _Reads:
    """The file's K-quant matrices read in the order the loader converts them, two chunks of whole 16-row groups
    ahead in a thread: large sequential reads (pread) that the disk serves at its rate while the C kernel converts
    the chunk before, where faulting the mapping in converted at a third of that. Each chunk's pages are then
    dropped from the page cache (the kernel holds its copy). ``plan``: (key, offset, bytes, bytes per row)."""

    CHUNK = 32 << 20
    AHEAD = 2

    def __init__(self, path: Path, plan: list[tuple[object, int, int, int]]):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="dbrxq-gguf-read")
        self.items = iter([(key, s // rb, off + s, min(step, n - s)) for key, off, n, rb in plan
                           for step in [max(16, self.CHUNK // rb // 16 * 16) * rb] for s in range(0, n, step)])
        self.pending: deque = deque()
        self._fill()

    def _read(self, off: int, n: int) -> np.ndarray:
        buf = np.empty(n, dtype=np.uint8)
        view, done = memoryview(buf), 0
        while done < n:
            got = os.preadv(self.fd, [view[done:]], off + done)
            if got <= 0:
                raise CheckpointError(f"{self.path}: the file ends inside a tensor's data (at byte {off + done})")
            done += got
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, off, n, os.POSIX_FADV_DONTNEED)
        return buf

    def _fill(self) -> None:
        while len(self.pending) < self.AHEAD:
            nxt = next(self.items, None)
            if nxt is None:
                return
            key, row0, off, n = nxt
            self.pending.append((key, row0, self.pool.submit(self._read, off, n)))

    def rows(self, key):
        """(first row, bytes of whole rows) of ``key``'s chunks, in order."""
        assert self.pending and self.pending[0][0] == key, (key, self.pending[0][0] if self.pending else None)
        while self.pending and self.pending[0][0] == key:
            _, row0, fut = self.pending.popleft()
            self._fill()
            yield row0, fut.result()

    def close(self) -> None:
        for _, _, fut in self.pending:
            fut.cancel()
        self.pool.shutdown(wait=True)
        os.close(self.fd)


def _float(t: GGUFTensor, dtype: torch.dtype, where: Path) -> torch.Tensor:
    """A float tensor (or any runnable type, dequantized by llama.cpp's reference) as ``dtype``, checked finite."""
    if t.ggml_type in FLOAT_TYPES:
        a = np.asarray(t.data)
        x = torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16) if t.ggml_type == "BF16" else \
            torch.from_numpy(np.array(a, dtype=a.dtype))
        x = x.reshape(t.shape)
    else:
        import gguf

        x = torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType[t.ggml_type]))
        x = x.reshape(t.shape)
    return check_finite(x, t.name, where, what="refusing to run it").to(dtype)


def _matrix(t: GGUFTensor, index: int | None, dtype: torch.dtype, where: Path, release: PageReleaser | None = None,
            reads: _Reads | None = None):
    """One 2-D weight ``[N, K]`` (a stacked tensor's expert ``index``) as a prepared kernel weight, or a float tensor;
    a K-quant one from ``reads`` (see :func:`_k_jobs`), others from the mapping, whose pages ``release`` then
    gives back (the kernel holds a copy). Non-finite block scales are refused in one line naming the tensor."""
    data = t.data if index is None else t.data[index]
    shape = t.shape if index is None else t.shape[1:]
    if t.ggml_type in FLOAT_TYPES:
        return _float(GGUFTensor(t.name, t.ggml_type, shape, data), dtype, where)
    try:
        if reads is not None and t.ggml_type in kernels.GGML_TYPE_IDS:
            w = kernels.CpuKQWeight(ggml_type=t.ggml_type, shape=shape, empty=True)
            for row0, buf in reads.rows((t.name, index)):
                w.fill_rows(row0, buf)
            return w
        raw = np.asarray(data)
        w = _q4_0(raw, shape) if t.ggml_type == "Q4_0" else kernels.prepare_ggml(raw, t.ggml_type, shape)
    except QuantizationError as e:
        raise CheckpointError(f"{where}: tensor {t.name}: {e}") from None
    if release is not None:
        release.range(raw.ctypes.data, raw.nbytes)
    return w


def _q4_0(raw: np.ndarray, shape: tuple[int, int]):
    """Q4_0 blocks (fp16 d, 16 bytes of nibbles: values j and j+16 in byte j) as dbrxq's int4 symmetric
    g32 weight: W = d (q - 8), the same codes and scales."""
    n, k = shape
    b = np.ascontiguousarray(raw).reshape(n * k // 32, 18)
    d = torch.from_numpy(b[:, :2].copy().view(np.float16)).reshape(n, k // 32)
    if not bool(torch.isfinite(d).all()):
        raise QuantizationError(f"Q4_0 tensor {[n, k]} holds non-finite block scale(s) (d)")
    qs = b[:, 2:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1).reshape(n, k)  # natural order within each block
    qt = QuantizedTensor(pack_codes(torch.from_numpy(codes), 4), d, None, 4, 32, (n, k))
    return kernels.prepare(qt, "cpu_q4", "cpu")


def _linear(w) -> nn.Module:
    """A float weight as nn.Linear, a prepared kernel weight as PreparedLinear."""
    if isinstance(w, torch.Tensor):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight = nn.Parameter(w, requires_grad=False)
        return lin
    return PreparedLinear(w)


def _set_param(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    setattr(module, attr, nn.Parameter(value, requires_grad=False))


def _k_jobs(f: GGUFModelFile) -> list[tuple[object, int, int, int]]:
    """The K-quant matrices in the order :func:`load_gguf_model` converts them, as :class:`_Reads` plans:
    (``(name, expert or None)``, offset, bytes, bytes per row)."""

    def job(name, index=None):
        t = f.tensors[name]
        if t.ggml_type not in kernels.GGML_TYPE_IDS:
            return []
        rb = t.shape[-1] // 256 * BLOCK_BYTES[t.ggml_type]
        size = int(np.prod(t.shape[-2:])) // t.shape[-1] * rb
        return [((name, index), t.offset + (index or 0) * size, size, rb)]
    out = [] if f.config.tie_word_embeddings else job("output.weight")
    for i in range(f.config.n_layers):
        b = f"blk.{i}."
        out += job(b + "attn_qkv.weight") + job(b + "attn_output.weight")
        kinds = [b + n for n in ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")]
        if all(f.tensors[n].ggml_type not in FLOAT_TYPES for n in kinds):
            out += [j for e in range(f.config.num_experts) for n in kinds for j in job(n, e)]
    return out


def resident_bytes(f: GGUFModelFile, dtype: torch.dtype) -> int:
    """What loading ``f`` holds: each quantized matrix in the kernel's blocks, every other tensor (the embedding,
    norms, router, float matrices) in ``dtype``."""
    lib = cext.load()
    total = 0
    for t in f.tensors.values():
        rows, k = int(np.prod(t.shape[:-1])), t.shape[-1]
        if t.ggml_type in FLOAT_TYPES or t.name == "token_embd.weight" or lib is None:  # no kernel: refused later
            total += rows * k * (torch.finfo(dtype).bits // 8)
            continue
        n = t.shape[-2]
        bits = {"Q8_0": 8, "Q4_0": 4}.get(t.ggml_type) or kernels.KQ_BITS + kernels.GGML_TYPE_IDS[t.ggml_type]
        total += rows // n * lib.dbrxq_packed_bytes(bits, n, k, 32, 0)
    return total


def _check_fits(f: GGUFModelFile, dtype: torch.dtype, path: Path) -> None:
    """Refuse, before converting anything, a file whose kernel copy would not fit the memory this process may use
    (the kernel would kill it part-way)."""
    need = resident_bytes(f, dtype)
    try:
        limit, where = memory_limit()
    except OSError:  # not Linux: nothing to decide from
        return
    if need + process_rss() > limit:
        raise ConfigError(f"{path}: dbrxq holds a GGUF file whole ({format_size(need)} in its kernels' layout) and "
                          f"this process may use {format_size(limit)} ({where}); quantize the float model with `dbrxq "
                          f"quantize` and run it with --cpu-memory (experts read from disk as needed)")


def load_gguf_model(path: str | Path, *, device: str | torch.device | None = "cpu",
                    dtype: torch.dtype | None = None, backend: str | None = None,
                    offloading: bool = False) -> DbrxForCausalLM:
    """Build a DbrxForCausalLM from a DBRX GGUF file (module docstring); ``model.tokenizer_from_file``
    is its vocabulary. Raises CheckpointError naming the file and tensor for what cannot run."""
    t0 = time.perf_counter()
    path = Path(path)
    if device not in (None, "auto") and parse_device(device).type != "cpu":
        raise ConfigError(f"{path}: a GGUF file runs on the CPU in dbrxq (device {device!r} asked); quantize the "
                          f"float model with `dbrxq quantize` for --device cuda")
    if offloading:
        raise ConfigError(f"{path}: --cpu-memory/--gpu-memory offloading takes dbrxq's own checkpoints; a GGUF file "
                          f"is loaded whole")
    if backend not in (None, "auto", "cpu_q4", "cpu_q8"):
        raise ConfigError(f"{path}: a GGUF file's tensors run on dbrxq's C kernel; backend {backend!r} is not offered")
    dtype = dtype or torch.bfloat16
    f = GGUFModelFile(path)
    reads = None
    try:
        _check_fits(f, dtype, path)
        reads = _Reads(path, _k_jobs(f))
        config = f.config
        tok_meta = f.vocab()
        tokenizer = from_gguf_vocab(tok_meta["tokens"], tok_meta["types"], pre=tok_meta["pre"], eos=tok_meta["eos"],
                                    eot=tok_meta["eot"], pad=tok_meta["pad"], source=str(path))
        config.eos_token_id = tokenizer.eos_token_ids or None
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device("meta"), skip_init():
                model = DbrxForCausalLM(config)
        finally:
            torch.set_default_dtype(old)
        T = f.tensors
        release = PageReleaser()  # the file's pages each matrix was read from, given back once it is converted
        tr = model.transformer
        _set_param(tr.wte, "weight", _float(T["token_embd.weight"], dtype, path))
        _set_param(tr.norm_f, "weight", _float(T["output_norm.weight"], dtype, path))
        if not config.tie_word_embeddings:
            model.lm_head = _linear(_matrix(T["output.weight"], None, dtype, path, release, reads))
        act = ACTIVATIONS[config.activation]
        layer_tensors = [[t for n, t in T.items() if n.startswith(f"blk.{i}.")] for i in range(config.n_layers)]
        for i, block in enumerate(tr.blocks):
            b = f"blk.{i}."
            nan = block.norm_attn_norm
            _set_param(nan.norm_1, "weight", _float(T[b + "attn_norm.weight"], dtype, path))
            _set_param(nan.norm_2, "weight", _float(T[b + "attn_output_norm.weight"], dtype, path))
            nan.attn.Wqkv = _linear(_matrix(T[b + "attn_qkv.weight"], None, dtype, path, release, reads))
            nan.attn.out_proj = _linear(_matrix(T[b + "attn_output.weight"], None, dtype, path, release, reads))
            _set_param(block.ffn.router.layer, "weight", _float(T[b + "ffn_gate_inp.weight"], dtype, path))
            block.ffn.experts = _experts(f, i, config, act, dtype, path, release, reads)
            for t in layer_tensors[i]:  # the layer's float tensors too
                release.range(t.data.ctypes.data, t.data.nbytes)
            trim_heap()
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_meta:
                raise CheckpointError(f"{path}: {name} was not filled from the file")  # a mapping bug, never input
    finally:
        if reads is not None:
            reads.close()
        f.close()
    use_float_kernel(model)  # float experts (an F16/BF16/F32 file's) step through the C kernel
    model.eval()
    model.requires_grad_(False)
    model.source_dir = path.parent
    model.tokenizer_from_file = tokenizer
    log.info("loaded %s (GGUF, %d layers) in %.1f s", path, config.n_layers, time.perf_counter() - t0)
    return model


def _experts(f: GGUFModelFile, i: int, config, act, dtype: torch.dtype, where: Path, release: PageReleaser,
             reads: _Reads) -> nn.Module:
    b = f"blk.{i}."
    ts = [f.tensors[b + n] for n in ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")]
    floats = [t.ggml_type in FLOAT_TYPES for t in ts]
    if all(floats):  # float experts: the hub's [E*F, D] tensors (w2 transposed back)
        E, F, D = config.num_experts, config.ffn_hidden_size, config.d_model
        w1, v1, w2 = (_float(t, dtype, where) for t in ts)
        ex = DbrxExperts(config)
        _set_param(ex.mlp, "w1", w1.reshape(E * F, D))
        _set_param(ex.mlp, "v1", v1.reshape(E * F, D))
        _set_param(ex.mlp, "w2", w2.transpose(1, 2).reshape(E * F, D).contiguous())
        return ex
    if any(floats):
        raise CheckpointError(f"{where}: layer {i}'s expert tensors mix float and quantized types "
                              f"({', '.join(t.ggml_type for t in ts)}); dbrxq runs them all float or all quantized")
    prepared = [tuple(_matrix(t, e, dtype, where, release, reads) for t in ts) for e in range(config.num_experts)]
    return PreparedExperts(config.num_experts, config.ffn_hidden_size, act, prepared)
