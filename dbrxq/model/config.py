"""DbrxConfig: the model's shape, read from a Hugging Face DBRX ``config.json``.

The hub's config nests attention and FFN settings in ``attn_config`` and ``ffn_config``; we keep
that nesting (so a config round-trips unchanged) and compute derived fields once. Defaults are
transformers' (``DbrxConfig``, ``DbrxAttentionConfig``, ``DbrxFFNConfig``), except that the RoPE
base is read from ``attn_config.rope_theta`` -- the field the hub's DBRX configs carry -- and
falls back to transformers 5.x's ``rope_parameters.rope_theta`` only when that is absent.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dbrxq.core.errors import ConfigError
from dbrxq.core.untrusted import (
    MAX_CONFIG_BYTES,
    check_bool,
    check_int,
    check_number,
    check_type,
    read_json,
)

log = logging.getLogger(__name__)

MAX_TOKEN_ID = (1 << 31) - 1  # special ids beyond vocab_size are allowed (transformers' DbrxConfig does), not beyond this

# Activations the expert GLU may use; DBRX itself uses silu.
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "gelu_new", "relu")


@dataclass
class AttnConfig:
    attn_pdrop: float = 0.0  # training only
    clip_qkv: float | None = None  # clamp of the fused qkv output; 8 for DBRX
    kv_n_heads: int = 1  # GQA: 8 for DBRX
    rope_theta: float = 10000.0  # 500000 for DBRX


@dataclass
class FfnConfig:
    ffn_act_fn: dict = field(default_factory=lambda: {"name": "silu"})
    ffn_hidden_size: int = 3584  # per expert; 10752 for DBRX
    moe_num_experts: int = 4  # 16 for DBRX
    moe_top_k: int = 1  # 4 for DBRX
    moe_jitter_eps: float | None = None  # training only
    moe_loss_weight: float = 0.01  # 0.05 for DBRX: weight of aux_loss in the loss
    moe_normalize_expert_weights: float | None = 1.0  # p of the p-norm dividing the top-k weights


@dataclass
class DbrxConfig:
    d_model: int = 2048
    n_heads: int = 16
    n_layers: int = 24
    max_seq_len: int = 2048
    vocab_size: int = 32000
    resid_pdrop: float = 0.0
    emb_pdrop: float = 0.0
    attn_config: AttnConfig = field(default_factory=AttnConfig)
    ffn_config: FfnConfig = field(default_factory=FfnConfig)
    use_cache: bool = True
    initializer_range: float = 0.02
    output_router_logits: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # The `quantization_config` block of a dbrxq checkpoint: an object here; its fields are the
    # quantizer's to check (quantize.config.quantization_of, called by whoever loads the weights).
    quantization_config: dict | None = None
    # Every other key of config.json, kept so that writing the config back loses nothing.
    extra: dict = field(default_factory=dict, repr=False)
    # The file the values came from, for error messages only (not a field).
    where: dataclasses.InitVar[str] = "config"

    def __post_init__(self, where: str) -> None:
        self.validate(where)

    # -- derived fields -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_n_heads(self) -> int:
        return self.attn_config.kv_n_heads

    @property
    def qkv_out_features(self) -> int:
        """Rows of the fused Wqkv: q (d_model) then k and v (kv_n_heads * head_dim each)."""
        return self.d_model + 2 * self.kv_n_heads * self.head_dim

    @property
    def num_experts(self) -> int:
        return self.ffn_config.moe_num_experts

    @property
    def top_k(self) -> int:
        return self.ffn_config.moe_top_k

    @property
    def ffn_hidden_size(self) -> int:
        return self.ffn_config.ffn_hidden_size

    @property
    def activation(self) -> str:
        return self.ffn_config.ffn_act_fn.get("name", "silu")

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        ids = [] if e is None else ([e] if isinstance(e, int) else list(e))
        return [i for i in ids if i < self.vocab_size]  # an id beyond the vocabulary is never generated

    # -- validation -----------------------------------------------------------------------
    def validate(self, where: str = "config") -> None:
        """Reject a config the model cannot be built from (types, ranges, relations), naming the
        field; ``where`` (the file) starts the message. Bounds are far above any real model's
        (DBRX: d_model 6144, 40 layers, 100352 tokens) and keep a hostile config.json from
        asking for absurd allocations."""

        def ci(v, f, hi, lo=1):
            return check_int(v, f, where, lo=lo, hi=hi, error=ConfigError)

        for f, hi in (("d_model", 1 << 16), ("n_heads", 1 << 10), ("n_layers", 1 << 10),
                      ("max_seq_len", 1 << 24), ("vocab_size", 1 << 22)):
            ci(getattr(self, f), f, hi)
        a, m = self.attn_config, self.ffn_config
        ci(a.kv_n_heads, "attn_config.kv_n_heads", 1 << 10)
        ci(m.ffn_hidden_size, "ffn_config.ffn_hidden_size", 1 << 20)
        ci(m.moe_num_experts, "ffn_config.moe_num_experts", 1 << 12)
        ci(m.moe_top_k, "ffn_config.moe_top_k", m.moe_num_experts)
        check_number(a.rope_theta, "attn_config.rope_theta", where, positive=True, error=ConfigError)
        check_number(a.clip_qkv, "attn_config.clip_qkv", where, positive=True, null=True, error=ConfigError)
        check_number(m.moe_normalize_expert_weights, "ffn_config.moe_normalize_expert_weights", where,
                     positive=True, null=True, error=ConfigError)
        check_number(m.moe_jitter_eps, "ffn_config.moe_jitter_eps", where, lo=0.0, hi=1.0, null=True, error=ConfigError)
        check_number(m.moe_loss_weight, "ffn_config.moe_loss_weight", where, error=ConfigError)
        check_number(self.initializer_range, "initializer_range", where, error=ConfigError)
        for f in ("resid_pdrop", "emb_pdrop"):
            check_number(getattr(self, f), f, where, lo=0.0, hi=1.0, error=ConfigError)
        check_number(a.attn_pdrop, "attn_config.attn_pdrop", where, lo=0.0, hi=1.0, error=ConfigError)
        for f in ("use_cache", "output_router_logits", "tie_word_embeddings"):
            check_bool(getattr(self, f), f, where, error=ConfigError)
        ids = {f: getattr(self, f) for f in ("pad_token_id", "bos_token_id")}
        eos = self.eos_token_id
        ids.update({"eos_token_id" + (f"[{i}]" if isinstance(eos, list) else ""): e
                    for i, e in enumerate(eos if isinstance(eos, list) else [eos])})
        for f, v in ids.items():
            check_int(v, f, where, lo=0, hi=MAX_TOKEN_ID, null=not f.endswith("]"), error=ConfigError)
        outside = [f"{f} {v}" for f, v in ids.items() if v is not None and v >= self.vocab_size]
        if outside:  # transformers loads these; the forward never meets them: say so, and treat them as absent
            log.warning("%s: %s outside the vocabulary (vocab_size %d); treated as absent", where, ", ".join(outside),
                        self.vocab_size)
        check_type(m.ffn_act_fn, dict, "ffn_config.ffn_act_fn", where, "an object", error=ConfigError)
        check_type(m.ffn_act_fn.get("name", "silu"), str, "ffn_config.ffn_act_fn.name", where, "a string",
                   error=ConfigError)
        check_type(self.quantization_config, dict, "quantization_config", where, "an object", null=True,
                   error=ConfigError)
        if self.d_model % self.n_heads:
            raise ConfigError(f"{where}: field d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"{where}: head_dim = d_model / n_heads = {self.head_dim} must be even for RoPE")
        if self.n_heads % self.kv_n_heads:
            raise ConfigError(f"{where}: field attn_config.kv_n_heads ({self.kv_n_heads}) must divide "
                              f"n_heads ({self.n_heads})")
        if self.activation not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"{where}: field ffn_config.ffn_act_fn.name is {self.activation!r}; "
                              f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}")

    # -- (de)serialisation ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> DbrxConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: must be a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "dbrx")
        if model_type != "dbrx":
            raise ConfigError(f"{where}: field model_type is {model_type!r}; dbrxq runs 'dbrx' models only")
        d = dict(d)
        for f in ("attn_config", "ffn_config", "rope_parameters"):
            check_type(d.get(f), dict, f, where, "an object", null=True, error=ConfigError)
        attn = dict(d.pop("attn_config", None) or {})
        ffn = dict(d.pop("ffn_config", None) or {})
        rope_params = d.pop("rope_parameters", None) or {}
        if "rope_theta" not in attn and "rope_theta" in rope_params:
            attn["rope_theta"] = rope_params["rope_theta"]
        ffn.pop("hidden_size", None)  # transformers mirrors d_model here
        kw: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)} - {"attn_config", "ffn_config", "extra"}
        for key in list(d):
            if key in names:
                kw[key] = d.pop(key)
        try:
            kw["attn_config"] = AttnConfig(**_known(AttnConfig, attn, "attn_config"))
            kw["ffn_config"] = FfnConfig(**_known(FfnConfig, ffn, "ffn_config"))
        except TypeError as e:  # pragma: no cover - _known filters keys
            raise ConfigError(f"config: {e}") from None
        if kw["ffn_config"].ffn_act_fn is None:
            kw["ffn_config"].ffn_act_fn = {"name": "silu"}
        kw["extra"] = {k: v for k, v in d.items()
                       if k not in ("attn_config", "ffn_config")}
        return cls(**kw, where=where)

    @classmethod
    def from_json(cls, path: str | Path) -> DbrxConfig:
        """Read a config.json: a regular file of at most 4 MiB inside its folder (dbrxq.core.untrusted),
        strict JSON, every field type- and range-checked; ConfigError names the file and field."""
        path = Path(path)
        d = read_json(path, MAX_CONFIG_BYTES, folder=path.parent, error=ConfigError)
        return cls.from_dict(d, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The hub-style dict (nested attn/ffn configs), with rope_parameters for transformers 5.x."""
        d = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "attn_config", "ffn_config"):
                continue
            value = getattr(self, f.name)
            if f.name == "quantization_config" and value is None:
                continue
            d[f.name] = value
        d["attn_config"] = dataclasses.asdict(self.attn_config)
        d["ffn_config"] = dataclasses.asdict(self.ffn_config)
        d["model_type"] = "dbrx"
        d.setdefault("architectures", ["DbrxForCausalLM"])
        # transformers 5.x reads RoPE's base from here and silently uses 10000 without it.
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.attn_config.rope_theta}
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _known(cls: type, d: dict, where: str) -> dict:
    """Keep the fields `cls` knows; values of known fields are type-checked loosely by validate()."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}
