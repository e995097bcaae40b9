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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

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
    # The `quantization_config` block of a dbrxq checkpoint, parsed by quantize.config.
    quantization_config: dict | None = None
    # Every other key of config.json, kept so that writing the config back loses nothing.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.validate()

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
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    # -- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        """Reject a config the model cannot be built from, naming the field."""
        pos = {"d_model": self.d_model, "n_heads": self.n_heads, "n_layers": self.n_layers,
               "max_seq_len": self.max_seq_len, "vocab_size": self.vocab_size,
               "attn_config.kv_n_heads": self.kv_n_heads,
               "ffn_config.ffn_hidden_size": self.ffn_hidden_size,
               "ffn_config.moe_num_experts": self.num_experts, "ffn_config.moe_top_k": self.top_k}
        for name, value in pos.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"config field d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"config: head_dim = d_model / n_heads = {self.head_dim} must be even for RoPE")
        if self.n_heads % self.kv_n_heads:
            raise ConfigError(f"config field attn_config.kv_n_heads ({self.kv_n_heads}) must divide "
                              f"n_heads ({self.n_heads})")
        if self.top_k > self.num_experts:
            raise ConfigError(f"config field ffn_config.moe_top_k ({self.top_k}) must not exceed "
                              f"ffn_config.moe_num_experts ({self.num_experts})")
        if self.activation not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"config field ffn_config.ffn_act_fn.name is {self.activation!r}; "
                              f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
        clip = self.attn_config.clip_qkv
        if clip is not None and not clip > 0:
            raise ConfigError(f"config field attn_config.clip_qkv must be positive or null, got {clip!r}")
        if not self.attn_config.rope_theta > 0:
            raise ConfigError(f"config field attn_config.rope_theta must be positive, got "
                              f"{self.attn_config.rope_theta!r}")
        p = self.ffn_config.moe_normalize_expert_weights
        if p is not None and not p > 0:
            raise ConfigError(f"config field ffn_config.moe_normalize_expert_weights must be positive or null, "
                              f"got {p!r}")

    # -- (de)serialisation ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DbrxConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type", "dbrx")
        if model_type != "dbrx":
            raise ConfigError(f"config field model_type is {model_type!r}; dbrxq runs 'dbrx' models only")
        d = dict(d)
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
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | Path) -> DbrxConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config.json not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

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
