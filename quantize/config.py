"""QuantConfig: what was quantized how; the ``quantization_config`` block of config.json.

One :class:`ModuleQuant` per module kind ("experts", "attn", "lm_head", "embed"); the block
is versioned with :data:`quantize.format.FORMAT_VERSION` so a reader can refuse layouts it
does not know. Example (the defaults)::

    {"quant_method": "dbrxq", "format_version": 1, "method": "rtn",
     "experts": {"bits": 4, "group_size": 128, "symmetric": true},
     "attn":    {"bits": 8, "group_size": -1,  "symmetric": true},
     "lm_head": {"bits": null, "group_size": -1, "symmetric": true},
     "embed":   {"bits": null, "group_size": -1, "symmetric": true}}

plus an optional free-form ``"calibration"`` summary (data set, token count, seed, ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from dbrxq.core.errors import QuantizationError
from dbrxq.core.untrusted import is_int
from quantize.format import (
    FORMAT_VERSION,
    LAYOUTS,
    READABLE_FORMAT_VERSIONS,
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
)

QUANT_METHOD = "dbrxq"
METHODS = ("rtn", "gptq")
MODULE_KINDS = ("experts", "attn", "lm_head", "embed")
# Format versions this dbrxq can read (a newer writer may add versions; an old reader refuses).


@dataclass(frozen=True)
class ModuleQuant:
    """How one kind of module is stored.

    bits: 2, 3, 4 or 8 (2 and 3 need format_version 2); None (or 16) keeps the module unquantized.
    group_size: one of SUPPORTED_GROUP_SIZES; -1 = per-channel (ignored when unquantized).
    symmetric: implicit zero point 2**(bits-1) if True, stored uint8 zero points otherwise.
    """

    bits: int | None = None
    group_size: int = -1
    symmetric: bool = True

    def __post_init__(self) -> None:
        # 16 is accepted as a spelling of "keep bf16"; normalise so equality is by meaning.
        if self.bits == 16:
            object.__setattr__(self, "bits", None)
        _check(self.bits is None or self.bits in SUPPORTED_BITS, "bits", self.bits,
               f"one of {SUPPORTED_BITS}, 16 or null (unquantized)")
        _check(self.group_size in SUPPORTED_GROUP_SIZES, "group_size", self.group_size,
               f"one of {SUPPORTED_GROUP_SIZES} (-1 = per-channel)")
        _check(isinstance(self.symmetric, bool), "symmetric", self.symmetric, "true or false")

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    @classmethod
    def from_dict(cls, d: dict[str, Any], kind: str = "") -> ModuleQuant:
        if not isinstance(d, dict):
            raise QuantizationError(f"quantization_config.{kind} must be an object, got {d!r}")
        unknown = set(d) - {"bits", "group_size", "symmetric"}
        if unknown:
            raise QuantizationError(
                f"quantization_config.{kind} has unknown field(s) {sorted(unknown)}"
            )
        bits, group, sym = d.get("bits"), d.get("group_size", -1), d.get("symmetric", True)
        # exact JSON types: 4.0 == 4 in Python, but a float here reaches ctypes and the kernels
        for name, value, ok in (("bits", bits, bits is None or is_int(bits)), ("group_size", group, is_int(group)),
                                ("symmetric", sym, isinstance(sym, bool))):
            if not ok:
                raise QuantizationError(f"quantization_config.{kind}.{name}={value!r:.40} has the wrong JSON type; "
                                        f"expected {'true or false' if name == 'symmetric' else 'an integer'}")
        try:
            return cls(bits, group, sym)
        except QuantizationError as e:
            # Name the module kind in the one-line message.
            raise QuantizationError(f"quantization_config.{kind}.{e}") from None


def _check(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise QuantizationError(f"{name}={value!r} is not supported; expected {expected}")


@dataclass(frozen=True)
class ExpertMix:
    """Per-expert recipes, chosen under a size budget (``dbrxq quantize --target-bits/--target-size``):
    expert e of layer i is stored as ``options[choice[i][e]]``. In config.json::

        "expert_mix": {"options": [{"bits": 2, "group_size": 64, "symmetric": false}, ...],
                       "choice": [[1, 0, 2, ...], ...]}           # n_layers rows of num_experts
    """

    options: tuple[ModuleQuant, ...]
    choice: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if not self.options or not all(o.quantized for o in self.options):
            raise QuantizationError("quantization_config.expert_mix.options must list quantized recipes")
        for i, row in enumerate(self.choice):
            bad = next((c for c in row if not 0 <= c < len(self.options)), None)
            if bad is not None:
                raise QuantizationError(f"quantization_config.expert_mix.choice[{i}] holds {bad!r}; expected an "
                                        f"index into the {len(self.options)} options")

    def recipe(self, layer: int, expert: int) -> ModuleQuant:
        return self.options[self.choice[layer][expert]]

    def members(self, layer: int, option: int) -> list[int]:
        """The experts of ``layer`` stored with ``options[option]``, in increasing id (their stack order)."""
        return [e for e, c in enumerate(self.choice[layer]) if c == option]

    def to_dict(self) -> dict[str, Any]:
        return {"options": [o.to_dict() for o in self.options], "choice": [list(r) for r in self.choice]}

    @classmethod
    def from_dict(cls, d: Any) -> ExpertMix:
        where = "quantization_config.expert_mix"
        if not isinstance(d, dict) or set(d) != {"options", "choice"}:
            raise QuantizationError(f"{where} must be an object with exactly the fields options and choice")
        options, choice = d["options"], d["choice"]
        if not isinstance(options, list) or not 1 <= len(options) <= 16:
            raise QuantizationError(f"{where}.options must be a list of 1 to 16 recipes")
        if not isinstance(choice, list) or not all(isinstance(r, list) and all(is_int(c) for c in r) for r in choice):
            raise QuantizationError(f"{where}.choice must be a list (one per layer) of lists of integers")
        return cls(tuple(ModuleQuant.from_dict(o, f"expert_mix.options[{j}]") for j, o in enumerate(options)),
                   tuple(tuple(r) for r in choice))


@dataclass(frozen=True)
class QuantConfig:
    """The whole quantization recipe of a checkpoint. Defaults: docs/architecture.md ("Quantized weights and kernels").

    Experts are ~96% of the bytes and are read per token, so int4 g128 there; attention is
    small and sensitive, so int8 per-channel; embeddings and lm_head stay bf16.
    """

    method: str = "rtn"
    experts: ModuleQuant = ModuleQuant(bits=4, group_size=128, symmetric=True)
    attn: ModuleQuant = ModuleQuant(bits=8, group_size=-1, symmetric=True)
    lm_head: ModuleQuant = ModuleQuant(bits=None)
    embed: ModuleQuant = ModuleQuant(bits=None)
    # Free-form summary of the calibration run (data, tokens, seed, fallbacks), for humans.
    calibration: dict[str, Any] = field(default_factory=dict)
    format_version: int = field(default=FORMAT_VERSION, compare=False)  # as read; written: required_version
    # Per-expert recipes (format_version 3); then ``experts`` is the recipe the allocation started from.
    expert_mix: ExpertMix | None = None
    # How the quantized weights are stored (quantize.format.LAYOUTS): "blocks", the CPU kernel's own layout
    # (format_version 4: loading is a memory map, and offloading reads experts straight from the
    # checkpoint), "canonical" (qweight/scales/qzeros, repacked for the kernel at every load), or "auto":
    # blocks wherever the kernel's blocks hold every weight of the model (quantize.specs.resolve_layout).
    layout: str = "auto"
    # Symmetric 2-4 bit scales over all 2**bits levels, their sign putting the grid's long side on each
    # group's extreme (quantize.primitives.compute_qparams; format_version 5). False as read from a
    # checkpoint that does not say so: those scales are all positive (amax / (2**(bits-1) - 1)).
    full_range: bool = field(default=True, compare=False)

    def __post_init__(self) -> None:
        _check(self.method in METHODS, "method", self.method, f"one of {METHODS}")
        _check(self.layout in LAYOUTS + ("auto",), "layout", self.layout, f"one of {LAYOUTS} or auto")
        _check(isinstance(self.full_range, bool), "full_range", self.full_range, "true or false")
        _check(self.format_version in READABLE_FORMAT_VERSIONS, "format_version",
               self.format_version,
               f"one of {READABLE_FORMAT_VERSIONS} (the versions this dbrxq reads)")

    @property
    def signed_scales(self) -> bool:
        """Whether some stored scale may be negative: full-range symmetric weights of 2-4 bits."""
        recipes = [self.for_kind(k) for k in MODULE_KINDS]
        if self.expert_mix is not None:
            recipes += list(self.expert_mix.options)
        return self.full_range and any(r.symmetric and r.bits in (2, 3, 4) for r in recipes)

    @property
    def required_version(self) -> int:
        """The format_version this recipe's tensors need: 5 with signed (full-range) scales, 4 in the
        blocks layout, 3 with per-expert recipes, 2 with 2- or 3-bit codes, else 1 (so a canonical
        4/8-bit checkpoint of positive scales stays readable by a dbrxq that knows only version 1)."""
        if self.signed_scales:
            return 5
        if self.layout == "blocks":
            return 4
        if self.expert_mix is not None:
            return 3
        return 2 if any(self.for_kind(k).bits in (2, 3) for k in MODULE_KINDS) else 1

    def check_writable(self) -> None:
        """A quantizer writes full-range symmetric scales only: the positive-only grid of format_version 1-4
        (``full_range`` False) is read, no longer written, so a config saying so would misdescribe them."""
        if not self.full_range:
            raise QuantizationError("quantization_config.full_range=false (positive-only symmetric scales) is "
                                    "read but no longer written; quantize with full_range (the default)")

    def expert_recipe(self, layer: int, expert: int) -> ModuleQuant:
        """How expert ``expert`` of ``layer`` is stored."""
        return self.experts if self.expert_mix is None else self.expert_mix.recipe(layer, expert)

    def check_model(self, n_layers: int, num_experts: int) -> None:
        """expert_mix must give every expert of the model a recipe."""
        mix = self.expert_mix
        if mix is not None and (len(mix.choice) != n_layers or any(len(r) != num_experts for r in mix.choice)):
            raise QuantizationError(f"quantization_config.expert_mix.choice has {len(mix.choice)} rows of "
                                    f"{sorted({len(r) for r in mix.choice})} experts; the model has {n_layers} "
                                    f"layers of {num_experts}")

    def for_kind(self, kind: str) -> ModuleQuant:
        """The ModuleQuant of ``kind`` (one of MODULE_KINDS)."""
        assert kind in MODULE_KINDS, (kind, MODULE_KINDS)
        return getattr(self, kind)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready ``quantization_config`` block (its layout resolved: quantize.specs.resolve_layout)."""
        assert self.layout != "auto", "resolve the layout for the model first (quantize.specs.resolve_layout)"
        d: dict[str, Any] = {
            "quant_method": QUANT_METHOD,
            "format_version": self.required_version,
            "method": self.method,
        }
        for kind in MODULE_KINDS:
            d[kind] = self.for_kind(kind).to_dict()
        if self.expert_mix is not None:
            d["expert_mix"] = self.expert_mix.to_dict()
        if self.layout != "canonical":
            d["layout"] = self.layout
        if self.signed_scales:
            d["full_range"] = True
        if self.calibration:
            d["calibration"] = dict(self.calibration)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """Parse a ``quantization_config`` block; QuantizationError names the bad field."""
        if not isinstance(d, dict):
            raise QuantizationError(
                f"quantization_config must be an object, got {type(d).__name__}"
            )
        if d.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise QuantizationError(
                f"quantization_config.quant_method={d.get('quant_method')!r} is not "
                f"{QUANT_METHOD!r}; this checkpoint was not written by dbrxq"
            )
        version = d.get("format_version")
        if not is_int(version) or version not in READABLE_FORMAT_VERSIONS:
            raise QuantizationError(
                f"quantization_config.format_version={version!r} is not supported; this dbrxq "
                f"reads format_version {', '.join(map(str, READABLE_FORMAT_VERSIONS))}"
            )
        method = d.get("method", "rtn")
        if not isinstance(method, str) or method not in METHODS:
            raise QuantizationError(
                f"quantization_config.method={method!r} is not supported; expected one of {METHODS}"
            )
        calibration = d.get("calibration") or {}
        if not isinstance(calibration, dict):
            raise QuantizationError("quantization_config.calibration must be an object")
        kinds = {k: ModuleQuant.from_dict(d[k], k) for k in MODULE_KINDS if k in d}
        mix = ExpertMix.from_dict(d["expert_mix"]) if d.get("expert_mix") is not None else None
        layout = d.get("layout", "canonical")
        if not isinstance(layout, str) or layout not in LAYOUTS:
            raise QuantizationError(f"quantization_config.layout={layout!r:.40} is not supported; expected one of "
                                    f"{LAYOUTS}")
        full_range = d.get("full_range", False)
        if not isinstance(full_range, bool):
            raise QuantizationError(f"quantization_config.full_range={full_range!r:.40} is not true or false")
        cfg = cls(method=method, calibration=calibration, format_version=version, expert_mix=mix, layout=layout,
                  full_range=full_range, **kinds)
        if version < cfg.required_version:
            what = ("signed (full-range) scales" if cfg.signed_scales else "the blocks layout" if layout == "blocks"
                    else "per-expert recipes" if mix is not None else "2- or 3-bit codes")
            raise QuantizationError(f"quantization_config.format_version={version} cannot hold {what} "
                                    f"(format_version {cfg.required_version} can); the checkpoint is damaged")
        return cfg


def quantization_of(config, where: str | os.PathLike) -> QuantConfig | None:
    """The ``quantization_config`` block of a model config (a dbrxq.model.config.DbrxConfig) parsed and
    checked against the model (every expert of expert_mix has a recipe), or None for a float checkpoint.
    The model's config only knows the block is an object: its fields are checked here, by the
    quantizer that owns them, before any weight is read (transformers' quantizers do the same).

    Raises:
        QuantizationError: one line starting with ``where`` (the config file), naming the field.
    """
    if config.quantization_config is None:
        return None
    try:
        qc = QuantConfig.from_dict(config.quantization_config)
        qc.check_model(config.n_layers, config.num_experts)
    except QuantizationError as e:
        raise QuantizationError(f"{where}: {e}") from None
    return qc
