"""``dbrxq export``: a DBRX checkpoint (dbrxq-quantized or float) as one GGUF file for llama.cpp.

What llama.cpp's DBRX loader reads, and what we write:

* metadata ``dbrx.*``: context length, block count, embedding and feed-forward length, head
  counts, RoPE base, clamp_kqv, layer-norm epsilon (1e-5), expert count and used count, and
  ``general.file_type``;
* tensors, with llama.cpp's DBRX converter's names and orientations (numpy shapes here; ggml's
  ``ne`` is the reverse): ``token_embd`` [V, d], ``blk.N.attn_norm`` [d], ``attn_qkv``
  [d + 2 kv hd, d], ``attn_output`` [d, d], ``attn_output_norm`` [d], ``ffn_gate_inp`` [E, d],
  ``ffn_gate_exps`` / ``ffn_up_exps`` [E, F, d] and ``ffn_down_exps`` [E, d, F] (the expert
  dimension outermost, as dbrxq stores them), ``output_norm`` [d], ``output`` [V, d];
* the tokenizer: ``gpt2`` byte-level BPE with the ``dbrx`` pre-tokenizer (cl100k's split),
  tokens in id order padded to the embedding's rows with ``[PADi]`` (type UNUSED), specials as
  CONTROL, the merges, bos/eos/eot/pad ids, no BOS added, and DBRX-instruct's chat template.

Quantized weights keep their codes (quantize/ggml.py: int4 sym -> Q4_0 and int8 sym -> Q8_0
bit-exact, int4 asym -> Q4_1 with m rounded to fp16). Norms and the router are F32, as
llama.cpp's converter writes them; other float tensors keep their stored precision (BF16 stays
BF16) unless --float-type says otherwise.

The file is written one tensor at a time (experts one expert at a time), so memory stays near one
expert's conversion; it is written as ``OUT.tmp.<pid>.<hex>`` and renamed when complete, so a file named
OUT is always whole.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from calibration.options import CalibrationOptions
from dbrxq.core.errors import CheckpointError, ConfigError, QuantizationError
from dbrxq.core.files import fsync_dir, remove_stale_temps, temp_path
from dbrxq.core.units import format_size
from dbrxq.core.untrusted import check_finite
from dbrxq.export.fisher import Sensitivity, allocate, candidates, matrices, measure
from dbrxq.export.calibrated import calibrate_kquants
from dbrxq.export.gguf_meta import add_metadata
from dbrxq.formats.checkpoint import CheckpointReader, check_checkpoint
from dbrxq.formats.gguf_file import is_gguf
from dbrxq.formats.hub import resolve_model_dir, resolve_model_name
from dbrxq.model.config import DbrxConfig
from dbrxq.text.tokenizer import DbrxTokenizer
from quantize.config import quantization_of
from quantize import blocks
from quantize.ggml import (
    BLOCK,
    K_BLOCK_BYTES,
    exact_type,
    float_to_type,
    from_codes,
    requantize_q8_0,
    row_bytes,
)
from quantize.primitives import QuantizedTensor, check_qparams, logical_k
from quantize.recipes import FILE_TYPES, RECIPES, fit_type, tensor_type
from quantize.rtn import EXPERT_KINDS
from quantize.specs import expected_tensors, expert_slot, expert_stack

log = logging.getLogger(__name__)

FLOAT_TYPES = ("F32", "F16", "BF16")
QUANT_TYPES = ("Q8_0", "Q4_0")
TYPES = ("auto", "f32", "f16", "bf16", "q8_0", "q4_0", *RECIPES)  # --type
FLOAT_TYPE_CHOICES = ("auto", "f32", "f16", "bf16")  # --float-type
CHUNK_BYTES = 64 << 20  # rows of a float matrix converted at a time
_SOURCE_FLOAT = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


# The `dbrxq quantize` options that give each kind of matrix an exact GGML type.
EXACT_OPTIONS = {
    "experts": "--expert-bits 4 and --group-size 32, 64 or 128 (Q4_0, or Q4_1 with --asym), or --expert-bits 8 "
               "--sym (Q8_0)",
    "attn": "--attn-bits 8 without --attn-asym (Q8_0), --attn-bits 4 --attn-group-size 32, 64 or 128 (Q4_0; "
            "Q4_1 with --attn-asym), or --attn-bits 16 (kept as stored)",
    "lm_head": "--lm-head-bits 16 (kept as stored) or --lm-head-bits 8 without --attn-asym (Q8_0)",
}


@dataclass
class PlannedTensor:
    """One GGUF tensor: its name, GGML type, numpy shape [..., N, K] of values, and a producer of
    its bytes in row order (one chunk per expert for the expert tensors)."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[np.ndarray]]
    origin: str  # for people: where the bytes come from

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) * row_bytes(self.ggml_type, self.shape[-1])


@dataclass
class ExportResult:
    path: Path
    tensors: int
    nbytes: int
    seconds: float
    file_type: str
    types: dict[str, int] = field(default_factory=dict)  # GGML type -> tensor count
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- the tokenizer


# ----------------------------------------------------------------------------- planning

def _float_type(choice: str, dtype: torch.dtype) -> str:
    return _SOURCE_FLOAT.get(dtype, "F32") if choice == "auto" else choice.upper()


class _Planner:
    """Decides each tensor's GGML type (refusing what has no faithful mapping) before anything is
    written, and builds the producers of its bytes."""

    def __init__(self, reader: CheckpointReader, config: DbrxConfig, qcfg, *, type_: str, float_type: str,
                 requantize: bool) -> None:
        self.r, self.c, self.q = reader, config, qcfg
        self.type, self.float_choice, self.requantize = type_, float_type, requantize
        self.warnings: list[str] = []
        self.solved: dict[str, tuple[str, Path]] = {}  # GGUF name -> (type, file of its bytes), when calibrated
        self.types: dict[str, str] = {}  # GGUF name -> the type --target-size allocated it

    def mix_type(self, gguf_name: str, k: int) -> str | None:
        """A float matrix's type: the one allocated to it (--target-size), else the K-quant mix's (fitted to
        rows of ``k`` values), else None."""
        if gguf_name in self.types:
            return self.types[gguf_name]
        if self.type.lower() in RECIPES:
            c = self.c
            return fit_type(tensor_type(self.type.lower(), gguf_name, c.n_layers, c.n_heads // c.kv_n_heads), k)
        return None

    def why(self, gguf_name: str) -> str:
        return "allocated by --target-size" if gguf_name in self.types else f"{self.type} mix"

    # -- reading: rows at a time, the shard unmapped after each read, so the pages of the source
    # that were read do not pile up in RSS (they are file-backed, but a mapping keeps them counted)
    def rows(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        t = self.r.get(name) if start is None else self.r.get_slice(name)[start:stop]
        self.r.close()
        return t

    def _finite(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return check_finite(x, name, self.r.file_of(name), what="refusing to export it")

    def row_chunks(self, name: str) -> Iterator[torch.Tensor]:
        """A 2-D tensor in chunks of about CHUNK_BYTES."""
        n, k = self.r.shape(name)
        step = max(1, CHUNK_BYTES // (k * self.r.dtype(name).itemsize))
        for r0 in range(0, n, step):
            yield self._finite(self.rows(name, r0, min(n, r0 + step)), name)

    # -- small, always-float tensors
    def f32(self, gguf_name: str, name: str) -> PlannedTensor:
        shape = self.r.shape(name)
        def chunks():
            yield self._finite(self.rows(name), name).float().numpy().view(np.uint8)
        return PlannedTensor(gguf_name, "F32", shape, chunks, name)

    def float_matrix(self, gguf_name: str, name: str, ggml_type: str | None = None) -> PlannedTensor:
        """A 2-D float tensor (embedding, head, unquantized attention) in the float type, or in a
        K-quant mix's type for it."""
        shape = self.r.shape(name)
        kind = ggml_type or _float_type(self.float_choice, self.r.dtype(name))
        if ggml_type is None and self.q is None:
            kind = self.mix_type(gguf_name, shape[-1]) or kind
        def chunks():
            for part in self.row_chunks(name):
                yield float_to_type(part, kind, name)
        return PlannedTensor(gguf_name, kind, shape, chunks, name)


    def _qt(self, base: str, kind: str, index=None):
        """The QuantizedTensor of ``base`` (or of its expert ``index``); in the blocks layout unpacked
        from the stored kernel bytes (exact: the same codes and scales)."""
        mq = self.q.for_kind(kind)
        if self.q.layout == "blocks":
            return self._qt_blocks(base, kind, mq, index)
        names = [f"{base}.qweight", f"{base}.scales", f"{base}.qzeros"]
        parts = {}
        for n in names:
            if n in self.r:
                parts[n] = self.rows(n) if index is None else self.rows(n, index, index + 1)[0]
        try:
            qt = QuantizedTensor.from_tensors(parts, base, mq.bits, mq.group_size)
        except QuantizationError as e:
            raise CheckpointError(f"{self.r.file_of(names[0])}: {e}") from None
        check_qparams(qt.scales, qt.qzeros, qt.bits, f"tensor {base}")
        return qt

    def _qt_blocks(self, base: str, kind: str, mq, index):
        if index is None:
            n, k = self._blocks_shape(base)
            qt = blocks.unpack(self.rows(f"{base}.{blocks.BLOCKS}"), mq.bits, n, k, mq.group_size, not mq.symmetric)
        else:
            layer, which = int(base.split(".")[2]), EXPERT_KINDS.index(base.rsplit(".", 1)[1])
            slot = expert_slot(self.c, mq)
            view = slot.views(self.rows(expert_stack(layer), index, index + 1)[0])[which]
            n, k = slot.shapes()[which]
            qt = blocks.unpack(view, mq.bits, n, k, mq.group_size, not mq.symmetric)
        check_qparams(qt.scales, qt.qzeros, qt.bits, f"tensor {base}")
        return qt

    def _blocks_shape(self, base: str) -> tuple[int, ...]:
        """The logical shape of a weight stored in blocks (experts: with the expert dimension)."""
        c = self.c
        if ".ffn.experts.mlp." in base:
            e, f, d = c.num_experts, c.ffn_hidden_size, c.d_model
            return (e, d, f) if base.endswith(".w2") else (e, f, d)
        if base.endswith(".attn.Wqkv"):
            return c.qkv_out_features, c.d_model
        if base.endswith(".attn.out_proj"):
            return c.d_model, c.d_model
        return c.vocab_size, c.d_model

    def _stored(self, base: str) -> bool:
        """Whether ``base`` is stored quantized (either layout)."""
        if f"{base}.qweight" in self.r:
            return True
        if self.q is None or self.q.layout != "blocks":
            return False
        if ".ffn.experts.mlp." in base:
            return expert_stack(int(base.split(".")[2])) in self.r
        return f"{base}.{blocks.BLOCKS}" in self.r

    def matrix(self, gguf_name: str, base: str, kind: str, *, experts: bool = False,
               transpose_float: bool = False) -> PlannedTensor:
        """A weight matrix (stack): attention Wqkv/out_proj, lm_head, or an expert tensor."""
        c = self.c
        if self._stored(base):
            mq = self.q.for_kind(kind)
            if f"{base}.qweight" in self.r:
                qshape = self.r.shape(f"{base}.qweight")
                shape = (*qshape[:-1], logical_k(mq.bits, qshape[-1]))
            else:
                shape = self._blocks_shape(base)
            k = shape[-1]
            g = k if mq.group_size == -1 else mq.group_size
            ggml_type = exact_type(mq.bits, mq.symmetric, g, k)
            recipe = f"int{mq.bits} {'sym' if mq.symmetric else 'asym'} " + (
                "per-channel" if mq.group_size == -1 else f"g{mq.group_size}")
            convert = from_codes
            if ggml_type is None:
                if not self.requantize:
                    raise QuantizationError(
                        f"{base} ({recipe}, rows of {k}) has no exact GGML type (Q4_0/Q4_1 need int4 groups "
                        f"of a multiple of 32, Q8_0 int8 symmetric); pass --requantize to write it "
                        f"re-rounded ({'Q8_0' if k % BLOCK == 0 else 'F16'}), or quantize again with "
                        f"{EXACT_OPTIONS[kind]}")
                if k % BLOCK == 0:
                    ggml_type = "Q8_0"
                    convert = lambda qt: ("Q8_0", requantize_q8_0(qt.dequantize()))  # noqa: E731
                else:
                    ggml_type = "F16"
                    convert = lambda qt: ("F16", float_to_type(qt.dequantize(), "F16", base))  # noqa: E731
                self.warnings.append(f"{base}: {recipe} re-rounded to {ggml_type} (--requantize)")

            def chunks():
                for idx in (range(shape[0]) if experts else [None]):
                    got, data = convert(self._qt(base, kind, idx))
                    assert got == ggml_type, (got, ggml_type)
                    yield data
            return PlannedTensor(gguf_name, ggml_type, tuple(shape), chunks, f"{base} ({recipe})")

        # float source
        name = base if experts else f"{base}.weight"
        stored = self.r.shape(name)
        if experts:  # hub layout [E*F, d] (checked by check_checkpoint): w1/v1 -> [E, F, d]; w2 -> [E, d, F]
            e, f, d = c.num_experts, c.ffn_hidden_size, c.d_model
            shape = (e, d, f) if transpose_float else (e, f, d)
        else:
            shape = tuple(stored)
        if gguf_name in self.solved:  # calibrated: the bytes GPTQ chose (dbrxq.export.calibrated)
            ggml_type, path = self.solved[gguf_name]

            def solved_chunks():
                data = np.load(path, mmap_mode="r")
                for part in (data if experts else [data]):
                    yield np.ascontiguousarray(part)
            return PlannedTensor(gguf_name, ggml_type, shape, solved_chunks,
                                 f"{name} (float, GPTQ onto {ggml_type}'s grid, {self.why(gguf_name)})")
        ggml_type = _float_type(self.float_choice, self.r.dtype(name))
        origin = f"{name} (float)"
        mixed = self.mix_type(gguf_name, shape[-1])
        if mixed is not None:  # llama.cpp's mix (the head included), or the allocation
            ggml_type = mixed
            origin = f"{name} (float, dbrxq RTN on {ggml_type}'s grid, {self.why(gguf_name)})"
        elif self.type in QUANT_TYPES and kind != "lm_head":
            if shape[-1] % BLOCK == 0:
                ggml_type = self.type
                origin = f"{name} (float, dbrxq RTN g32 symmetric -> {ggml_type})"
            else:
                self.warnings.append(f"{name}: rows of {shape[-1]} values are not whole 32-blocks; kept {ggml_type}")

        def chunks():
            if not experts:
                for part in self.row_chunks(name):
                    yield float_to_type(part, ggml_type, name)
                return
            f = c.ffn_hidden_size
            for i in range(c.num_experts):
                w = self._finite(self.rows(name, i * f, (i + 1) * f), name)
                yield float_to_type(w.t() if transpose_float else w, ggml_type, name)
        return PlannedTensor(gguf_name, ggml_type, shape, chunks, origin)

    def plan(self) -> list[PlannedTensor]:
        c = self.c
        out = [self.float_matrix("token_embd.weight", "transformer.wte.weight")]
        for i in range(c.n_layers):
            p = f"transformer.blocks.{i}"
            nan = f"{p}.norm_attn_norm"
            out.append(self.f32(f"blk.{i}.attn_norm.weight", f"{nan}.norm_1.weight"))
            out.append(self.matrix(f"blk.{i}.attn_qkv.weight", f"{nan}.attn.Wqkv", "attn"))
            out.append(self.matrix(f"blk.{i}.attn_output.weight", f"{nan}.attn.out_proj", "attn"))
            out.append(self.f32(f"blk.{i}.attn_output_norm.weight", f"{nan}.norm_2.weight"))
            out.append(self.f32(f"blk.{i}.ffn_gate_inp.weight", f"{p}.ffn.router.layer.weight"))
            mlp = f"{p}.ffn.experts.mlp"
            out.append(self.matrix(f"blk.{i}.ffn_gate_exps.weight", f"{mlp}.w1", "experts", experts=True))
            out.append(self.matrix(f"blk.{i}.ffn_up_exps.weight", f"{mlp}.v1", "experts", experts=True))
            out.append(self.matrix(f"blk.{i}.ffn_down_exps.weight", f"{mlp}.w2", "experts", experts=True,
                                   transpose_float=True))
        out.append(self.f32("output_norm.weight", "transformer.norm_f.weight"))
        if c.tie_word_embeddings and "lm_head.weight" not in self.r and not self._stored("lm_head"):
            head = self.float_matrix("output.weight", "transformer.wte.weight")
        else:
            head = self.matrix("output.weight", "lm_head", "lm_head")
        out.append(head)
        return out


# ----------------------------------------------------------------------------- writing

def _file_type(plan: list[PlannedTensor], recipe: str = "auto"):
    """general.file_type: a K-quant mix's own, else the type holding most of the bytes (the experts')."""
    import gguf
    by: dict[str, int] = {}
    for t in plan:
        by[t.ggml_type] = by.get(t.ggml_type, 0) + t.nbytes
    main = max(by, key=by.get)
    names = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_0": "MOSTLY_Q4_0",
             "Q4_1": "MOSTLY_Q4_1", "Q8_0": "MOSTLY_Q8_0", "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M",
             "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K"}  # K-types: their _M mixes
    if recipe in FILE_TYPES and main in K_BLOCK_BYTES:  # the mix, unless every row fell back (the demo's)
        return main, gguf.LlamaFileType[FILE_TYPES[recipe]]
    return main, gguf.LlamaFileType[names[main]]


def _check_supported(config: DbrxConfig, folder: Path) -> None:
    """Refuse configs llama.cpp's DBRX graph would silently compute differently."""
    ffn = config.ffn_config
    if config.activation != "silu":
        raise ConfigError(f"{folder}/config.json: ffn_act_fn {config.activation!r}; llama.cpp's DBRX uses silu")
    if ffn.moe_normalize_expert_weights not in (1, 1.0):
        raise ConfigError(f"{folder}/config.json: moe_normalize_expert_weights "
                          f"{ffn.moe_normalize_expert_weights!r}; llama.cpp's DBRX normalizes the top-k "
                          f"weights to sum 1 (p = 1) only")


def export_gguf(model: str | os.PathLike, out: str | os.PathLike, *, type_: str = "auto",
                float_type: str = "auto", requantize: bool = False, overwrite: bool = False,
                revision: str | None = None, progress: bool = False,
                calibrate: CalibrationOptions | None = None, target_size: int | None = None,
                calibration: CalibrationOptions | None = None) -> ExportResult:
    """Write MODEL (a folder, hub repo id or 'demo') as the GGUF file OUT; see the module docstring.
    ``calibrate``: with a K-quant mix (``type_`` q2_k ... q6_k) or ``target_size``, solve the attention,
    expert and output matrices by GPTQ onto their grids on this calibration data (dbrxq.export.calibrated).
    ``target_size``: a float MODEL's file of at most this many bytes, each matrix in the type that
    dbrxq.export.fisher allocates it (``type_`` auto), measured on ``calibrate`` or else ``calibration``
    (default: the packaged text, 64 sequences of up to 512 tokens).

    Raises:
        CheckpointError, ConfigError, QuantizationError, TokenizerError: one line each; nothing
        named OUT is left behind on failure.
    """


    if type_ not in TYPES:
        raise ConfigError(f"--type {type_!r}: expected one of {', '.join(TYPES)}")
    if float_type not in FLOAT_TYPE_CHOICES:
        raise ConfigError(f"--float-type {float_type!r}: expected one of {', '.join(FLOAT_TYPE_CHOICES)}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise ConfigError(f"{out}: the output file name must end in .gguf")
    if out.is_dir():
        raise ConfigError(f"{out} is a folder; give the path of the .gguf file to write")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise ConfigError(f"{out.parent}: no such folder for the output file")
    src = resolve_model_name(model)
    if is_gguf(src):
        raise ConfigError(f"{src} is a GGUF file already: llama.cpp, Ollama and dbrxq run it as it is (to change its "
                          f"types, export or quantize its float source)")
    folder = resolve_model_dir(src, revision=revision)
    config = DbrxConfig.from_json(Path(folder) / "config.json")
    _check_supported(config, Path(folder))
    qcfg = quantization_of(config, Path(folder) / "config.json")
    if qcfg is not None and qcfg.expert_mix is not None:
        raise ConfigError(f"{src}: its experts have per-expert recipes (expert_mix); a GGUF tensor holds all of a "
                          f"layer's experts in one GGML type, so they cannot be exported as they are; quantize "
                          f"without --target-bits/--target-size (one --expert-bits for every expert), or export "
                          f"the float source with --type q8_0 or q4_0")
    if qcfg is not None and type_ != "auto":
        raise ConfigError(f"--type {type_}: {src} is dbrxq-quantized and its codes map onto GGML types as they "
                          f"are; --type applies to float checkpoints (export the float source instead)")
    if target_size is not None and (qcfg is not None or type_ != "auto"):
        raise ConfigError("--target-size chooses the type of every tensor of a float MODEL: leave --type out"
                          if qcfg is None else f"--target-size: {src} is dbrxq-quantized; export its float source")
    if calibrate is not None and ((type_ not in RECIPES and target_size is None) or qcfg is not None):
        raise ConfigError(f"--calibrate solves a float checkpoint onto a K-quant mix: give --type one of "
                          f"{', '.join(RECIPES)} (or --target-size) and a float MODEL")
    float_choice = type_ if type_ in FLOAT_TYPE_CHOICES and type_ != "auto" else float_type
    tok = DbrxTokenizer.from_pretrained(folder)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        solved, types = None, {}
        if calibrate is not None or target_size is not None:
            with CheckpointReader(folder) as reader:
                check_checkpoint(reader, config, folder, expected_tensors(config, qcfg))  # before hours of work
        if target_size is not None:
            fixed = _unallocated_bytes(out, src, folder, config, tok, target_size)  # refused before measuring
            opts = calibrate or calibration or CalibrationOptions(seq_len=min(512, config.max_seq_len))
            types = _allocate_types(target_size, fixed, measure(folder, opts, progress=progress))
        if calibrate is not None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=out.parent, prefix=f"{out.name}.calib.")))
            solved = calibrate_kquants(str(folder), type_, work, calibrate, types=types, progress=progress)
        return _write(out, src, folder, config, qcfg, tok, type_, float_choice, float_type, requantize, progress,
                      solved, t0, types, target_size)


def _padded(nbytes: int) -> int:
    import gguf
    return -(-nbytes // gguf.GGUF_DEFAULT_ALIGNMENT) * gguf.GGUF_DEFAULT_ALIGNMENT


def _writer(config, tok, file_type, src, qcfg, plan: list[PlannedTensor]):
    """A GGUFWriter holding the metadata and the tensor infos of ``plan``."""
    import gguf
    w = gguf.GGUFWriter(None, "dbrx")
    name = Path(str(src)).name if Path(str(src)).is_dir() else str(src)
    add_metadata(w, config, tok, file_type, name, qcfg)
    for t in plan:
        nb = t.nbytes
        w.add_tensor_info(t.name, (*t.shape[:-1], nb // max(1, int(np.prod(t.shape[:-1], dtype=np.int64)))),
                          np.dtype(np.uint8), nb, raw_dtype=gguf.GGMLQuantizationType[t.ggml_type])
    return w


def _file_bytes(w, plan: list[PlannedTensor], folder: Path) -> int:
    """The exact size of the file ``w`` (see :func:`_writer`) writes: its header, measured by writing it to
    a temporary file, then every tensor padded to the alignment."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=".gguf-header.") as d:
        w.write_header_to_file(path=Path(d) / "h")
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        head = w.fout[0].tell()
        w.close()
    return _padded(head) + sum(_padded(t.nbytes) for t in plan)


def _unallocated_bytes(out: Path, src, folder, config, tok, target: int) -> int:
    """The bytes of a ``target``-sized file that are not the allocated matrices' (the header and the F32
    tensors, counted exactly); QuantizationError when even the smallest types do not fit."""
    with CheckpointReader(folder) as reader:
        planner = _Planner(reader, config, None, type_="AUTO", float_type="auto", requantize=False)
        planner.types = {m.gguf: candidates(config.ffn_hidden_size if m.transpose else config.d_model)[0]
                         for m in matrices(config, set(reader.keys()))}
        plan = planner.plan()
    least = _file_bytes(_writer(config, tok, _file_type(plan)[1], src, None, plan), plan, out.parent)
    if target < least:
        raise QuantizationError(f"--target-size {format_size(target)}: the smallest file of this model ({least} "
                                f"bytes: every matrix Q2_K, or Q8_0 where rows are not whole 256-blocks) is larger")
    return least - sum(_padded(t.nbytes) for t in plan if t.name in planner.types)


def _allocate_types(target: int, fixed: int, sens: Sensitivity) -> dict[str, str]:
    """Each measured matrix's GGML type: the least summed predicted KL within the ``target`` bytes less the
    ``fixed`` ones (dbrxq.export.fisher)."""
    nbytes = lambda t, shape: _padded(int(np.prod(shape[:-1])) * row_bytes(t, shape[-1]))  # noqa: E731
    types, predicted, used = allocate(sens, target - fixed, nbytes)
    counts = {t: sum(1 for v in types.values() if v == t) for t in sorted(set(types.values()))}
    log.info("--target-size %s: %s; predicted mean KL %.3g per token (dbrxq.export.fisher, %d tokens); %d bytes",
             format_size(target), ", ".join(f"{n} x {t}" for t, n in counts.items()), predicted, sens.tokens,
             fixed + used)
    return types


def _write(out: Path, src, folder, config, qcfg, tok, type_, float_choice, float_type, requantize, progress,
           solved, t0, types: dict[str, str] | None = None, limit: int | None = None) -> ExportResult:
    from tqdm.auto import tqdm

    with CheckpointReader(folder) as reader:
        check_checkpoint(reader, config, folder, expected_tensors(config, qcfg))  # before planning
        planner = _Planner(reader, config, qcfg, type_=type_.upper(), float_type=float_choice, requantize=requantize)
        if solved is not None:
            planner.solved = solved.tensors
        planner.types = dict(types or {})
        plan = planner.plan()  # every refusal happens here, before a byte is written
        if type_ in ("q8_0", "q4_0"):
            planner.warnings.insert(0, f"--type {type_}: experts and attention quantized with dbrxq's RTN "
                                       f"(g32, symmetric) from the float weights; embeddings and the output "
                                       f"head stay {_float_type(float_type, reader.dtype('transformer.wte.weight'))}")
        if type_ in RECIPES and solved is None:
            planner.warnings.insert(0, f"--type {type_}: llama.cpp's {type_.upper()} mix of types, each tensor rounded "
                                       f"to nearest on its grid by dbrxq (no calibration data)")
        if solved is not None:
            log.info("--calibrate: output error tr(E H E^T) summed over the solved matrices: GPTQ %.4g, round to "
                     "nearest on the same grids %.4g", solved.gptq_error, solved.rtn_error)
        for msg in planner.warnings:
            log.warning(msg)
        main, file_type = _file_type(plan, type_)
        total = sum(t.nbytes for t in plan)
        remove_stale_temps(out.parent, prefix=out.name + ".tmp.")  # left by a killed export of OUT
        free = shutil.disk_usage(out.parent).free
        if free < total + (1 << 20):
            raise CheckpointError(f"{out.parent}: not enough disk space for {out.name}: needs about "
                                  f"{format_size(total)}, {format_size(free)} free")
        if limit is not None:
            size = _file_bytes(_writer(config, tok, file_type, src, qcfg, plan), plan, out.parent)
            if size > limit:  # the allocation counts the same bytes: a bug, refused before writing
                raise QuantizationError(f"--target-size {limit}: the planned file has {size} bytes")
        tmp = temp_path(out)
        w = _writer(config, tok, file_type, src, qcfg, plan)
        try:
            w.write_header_to_file(path=tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            fout = w.fout[0]
            with tqdm(total=total, unit="B", unit_scale=True, desc="export", disable=not progress) as bar:
                for t in plan:
                    w.write_padding(fout, fout.tell())
                    written = 0
                    for chunk in t.chunks():
                        fout.write(memoryview(np.ascontiguousarray(chunk)).cast("B"))
                        written += chunk.nbytes
                        bar.update(chunk.nbytes)
                    assert written == t.nbytes, (t.name, written, t.nbytes)
                    w.write_padding(fout, written)
            fout.flush()
            os.fsync(fout.fileno())
            w.close()
            os.replace(tmp, out)
        except BaseException as e:
            w.close()
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise CheckpointError(f"{out}: writing failed ({e.strerror or e}); the export needs "
                                      f"{format_size(total)}; nothing was left behind") from None
            raise
        fsync_dir(out.parent)
    types: dict[str, int] = {}
    for t in plan:
        types[t.ggml_type] = types.get(t.ggml_type, 0) + 1
    return ExportResult(out, len(plan), out.stat().st_size, time.perf_counter() - t0, main, types, planner.warnings)
