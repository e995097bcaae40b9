"""Reading a DBRX GGUF file (dbrxq's own export, or any llama.cpp quant of DBRX): its hyperparameters,
tensors and vocabulary, each checked before use.

A GGUF file is untrusted input like a checkpoint folder: the container is parsed by llama.cpp's own
``gguf`` package (its reader maps the file and checks the header, the metadata and the tensor table
against the file's size); everything dbrxq takes from it is then checked here: the architecture is
``dbrx``, every hyperparameter an integer (or number) in range, the tensors exactly DBRX's names, each of
the shape the hyperparameters give and of a type listed in :data:`RUNNABLE` (else one line naming the
tensor and its type). Nothing is read from the tensors' data until the loader asks for one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dbrxq.core.errors import CheckpointError, ConfigError
from dbrxq.core.untrusted import check_int, check_number
from dbrxq.model.config import AttnConfig, DbrxConfig, FfnConfig

GGUF_MAGIC = b"GGUF"
ARCH = "dbrx"
LAYER_NORM_EPS = 1e-5  # DBRX's LayerNorms (dbrxq.model); a file giving another is refused
FLOAT_TYPES = ("F32", "F16", "BF16")
# What dbrxq's runtime computes with exactly (the weight llama.cpp's dequantization gives): floats as they
# are, Q8_0 and Q4_0 in dbrxq's int8/int4 symmetric g32 kernels, the K-quants in their own kernel path
QUANT_TYPES = ("Q8_0", "Q4_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")
RUNNABLE = FLOAT_TYPES + QUANT_TYPES


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` is a file starting with GGUF's magic."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            return p.is_file() and f.read(4) == GGUF_MAGIC
    except OSError:
        return False


@dataclass
class GGUFTensor:
    """One tensor: ``shape`` in torch's order (rows last-dimension-major, e.g. ``[E, F, D]``),
    ``data`` the mapped bytes (uint8, rows of ``shape[-1]`` values) or float values; ``offset`` where
    they start in the file (the reader checked the tensor lies inside it)."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    data: np.ndarray
    offset: int = 0


class GGUFModelFile:
    """A DBRX GGUF file, opened and checked: ``config`` (a DbrxConfig), ``tensors`` by name,
    ``vocab()`` for the tokenizer. Holds the file mapped until :meth:`close`."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        try:
            self._r = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the reader raises ValueError, IndexError, struct errors... on a malformed file
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:160] if str(e) else 'no detail'})") from None
        arch = self._str("general.architecture")
        if arch != ARCH:
            raise CheckpointError(f"{self.path}: general.architecture is {arch!r}; dbrxq runs DBRX ({ARCH!r}) only")
        self.tensors: dict[str, GGUFTensor] = {}
        for t in self._r.tensors:
            if t.name in self.tensors:
                raise CheckpointError(f"{self.path}: tensor {t.name} appears twice")
            shape = tuple(int(n) for n in reversed([int(v) for v in t.shape]))
            self.tensors[t.name] = GGUFTensor(t.name, t.tensor_type.name, shape, t.data, int(t.data_offset))
        self.config = self._config()
        self._check_tensors()

    # -- metadata
    def _field(self, key: str, *, required: bool = True) -> Any:
        f = self._r.fields.get(key)
        if f is None:
            if required:
                raise CheckpointError(f"{self.path}: metadata {key} is missing")
            return None
        try:
            return f.contents()
        except Exception:
            raise CheckpointError(f"{self.path}: metadata {key} cannot be read") from None

    def _str(self, key: str) -> str:
        v = self._field(key)
        if not isinstance(v, str):
            raise CheckpointError(f"{self.path}: metadata {key} is {type(v).__name__}, expected a string")
        return v

    def _int(self, key: str, hi: int, lo: int = 1) -> int:
        v = self._field(key)
        return check_int(v, key, str(self.path), lo=lo, hi=hi, error=CheckpointError)

    def _config(self) -> DbrxConfig:
        k = f"{ARCH}."
        eps = check_number(self._field(k + "attention.layer_norm_epsilon"), k + "attention.layer_norm_epsilon",
                           str(self.path), positive=True, error=CheckpointError)
        if not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-6):
            raise CheckpointError(f"{self.path}: {k}attention.layer_norm_epsilon is {eps}; DBRX's LayerNorms use "
                                  f"{LAYER_NORM_EPS}")
        clip = check_number(self._field(k + "attention.clamp_kqv"), k + "attention.clamp_kqv", str(self.path),
                            positive=True, error=CheckpointError)
        emb = self.tensors.get("token_embd.weight")
        if emb is None or len(emb.shape) != 2:
            raise CheckpointError(f"{self.path}: tensor token_embd.weight is missing or not 2-D")
        try:
            return DbrxConfig(
                d_model=self._int(k + "embedding_length", 1 << 16),
                n_heads=self._int(k + "attention.head_count", 1 << 10),
                n_layers=self._int(k + "block_count", 1 << 10),
                max_seq_len=self._int(k + "context_length", 1 << 24),
                vocab_size=emb.shape[0],
                attn_config=AttnConfig(
                    clip_qkv=None if clip >= float(np.finfo(np.float32).max) else float(clip),
                    kv_n_heads=self._int(k + "attention.head_count_kv", 1 << 10),
                    rope_theta=check_number(self._field(k + "rope.freq_base"), k + "rope.freq_base", str(self.path),
                                            positive=True, error=CheckpointError)),
                ffn_config=FfnConfig(
                    ffn_hidden_size=self._int(k + "feed_forward_length", 1 << 20),
                    moe_num_experts=self._int(k + "expert_count", 1 << 12),
                    moe_top_k=self._int(k + "expert_used_count", 1 << 12)),
                tie_word_embeddings="output.weight" not in self.tensors,
                where=str(self.path))
        except ConfigError as e:
            raise CheckpointError(str(e)) from None

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor a DBRX GGUF holds, with its shape (torch order)."""
        c = self.config
        D, F, E = c.d_model, c.ffn_hidden_size, c.num_experts
        out = {"token_embd.weight": (c.vocab_size, D), "output_norm.weight": (D,)}
        if not c.tie_word_embeddings:
            out["output.weight"] = (c.vocab_size, D)
        for i in range(c.n_layers):
            b = f"blk.{i}."
            out.update({b + "attn_norm.weight": (D,), b + "attn_qkv.weight": (c.qkv_out_features, D),
                        b + "attn_output.weight": (D, D), b + "attn_output_norm.weight": (D,),
                        b + "ffn_gate_inp.weight": (E, D), b + "ffn_gate_exps.weight": (E, F, D),
                        b + "ffn_up_exps.weight": (E, F, D), b + "ffn_down_exps.weight": (E, D, F)})
        return out

    def _check_tensors(self) -> None:
        want = self.expected_shapes()
        missing = [n for n in want if n not in self.tensors]
        extra = [n for n in self.tensors if n not in want]
        if missing or extra:
            what = f"lacks {', '.join(missing[:3])}" if missing else f"has tensors DBRX does not: {', '.join(extra[:3])}"
            raise CheckpointError(f"{self.path}: {what}")
        for n, shape in want.items():
            t = self.tensors[n]
            if t.shape != shape:
                raise CheckpointError(f"{self.path}: tensor {n} has shape {list(t.shape)}, expected {list(shape)}")
            norm = len(shape) == 1 or n.endswith("ffn_gate_inp.weight")
            if (t.ggml_type not in FLOAT_TYPES) if norm else (t.ggml_type not in RUNNABLE):
                allowed = "F32, F16 or BF16" if norm else ", ".join(RUNNABLE)
                raise CheckpointError(f"{self.path}: tensor {n} is {t.ggml_type}; dbrxq's runtime computes with "
                                      f"{allowed} (llama.cpp's i-quants and Q4_1/Q5_0/Q5_1 have no exact dbrxq kernel)")

    # -- vocabulary
    def vocab(self) -> dict[str, Any]:
        """The tokenizer's metadata: ``tokens``, ``types`` (lists), ``pre``, ``eos``, ``eot``, ``pad`` (ids or None)."""
        model = self._field("tokenizer.ggml.model")
        if model != "gpt2":
            raise CheckpointError(f"{self.path}: tokenizer.ggml.model is {model!r}; DBRX's is byte-level BPE ('gpt2')")
        tokens, types = self._field("tokenizer.ggml.tokens"), self._field("tokenizer.ggml.token_type")
        if not isinstance(tokens, list) or not isinstance(types, list) or len(tokens) != len(types):
            raise CheckpointError(f"{self.path}: tokenizer.ggml.tokens / token_type are not two lists of one length")
        n = len(tokens)
        ids = {}
        for key in ("eos", "eot", "padding"):
            v = self._field(f"tokenizer.ggml.{key}_token_id", required=False)
            ids[key] = None if v is None else check_int(v, f"tokenizer.ggml.{key}_token_id", str(self.path), lo=0,
                                                        hi=n - 1, error=CheckpointError)
        return {"tokens": tokens, "types": types, "pre": self._field("tokenizer.ggml.pre", required=False),
                "eos": ids["eos"], "eot": ids["eot"], "pad": ids["padding"]}

    def close(self) -> None:
        """Drop the mapping (the tensors' data views die with it)."""
        self.tensors = {}
        mm = getattr(self._r, "data", None)
        self._r = None
        if mm is not None and hasattr(mm, "_mmap") and mm._mmap is not None:
            try:
                mm._mmap.close()
            except (BufferError, ValueError):  # views still alive elsewhere: the GC unmaps it later
                pass
