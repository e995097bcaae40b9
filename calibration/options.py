"""Calibration settings, the result of a run, and the state one run's steps share.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from calibration.experts import ExpertPolicy
from calibration.progress import Progress
from calibration.source import Source
from dbrxq.formats.shards import TensorSpec
from quantize.config import QuantConfig

DEFAULT_RARE_STRATEGY = "route-all"


# The order in which a layer's matrices are quantized; each step runs with the earlier ones quantized.
LAYER_STEPS = ("norm_attn_norm.attn.Wqkv", "norm_attn_norm.attn.out_proj", "ffn.experts")


@dataclass(frozen=True)
class CalibrationOptions:
    """Calibration settings (all but device/chunk_tokens/save_activations enter the resume hash)."""

    data: str | None = None  # None: calibration/data/calib.txt; see calibration.data for formats
    text_field: str = "text"  # JSON Lines field holding the text
    samples: int = 64  # N sequences ... (64 x 512 fits the shipped text: 32.8K tokens with DBRX's tokenizer)
    seq_len: int = 512  # ... of L tokens
    seed: int = 0
    rare_strategy: str = DEFAULT_RARE_STRATEGY  # for experts routed < min_expert_tokens tokens
    min_expert_tokens: int | None = None  # None: ceil(d_model / 8)
    damp: float = 0.01  # GPTQ relative dampening
    act_order: bool = False  # GPTQ column order by diag(H) (static groups)
    device: str = "cpu"  # where activations, Hessians and solves live
    chunk_tokens: int = 4096  # tokens per attention batch / Hessian update: bounds temporaries
    save_activations: bool = True  # store the resume point's activations (else recompute at resume)
    target_bits: float | None = None  # per-expert recipes for this average width (calibration.allocation)
    target_size: int | None = None  # ... or for this checkpoint size in bytes


@dataclass
class QuantizeResult:
    out: Path
    report: dict[str, Any]
    summary: str


@dataclass
class Run:
    """Everything one run's steps share."""

    source: Source
    qconfig: QuantConfig
    opts: CalibrationOptions
    policy: ExpertPolicy
    out: Path
    device: torch.device
    progress: Progress
    specs: dict[str, list[TensorSpec]]  # part ("embed", "layer.i", "head") -> its tensors
    shard: dict[str, str]  # part -> shard file name
    show: bool
    predicted: list[float] | None = None  # per expert (layer-major): its predicted error (calibration.allocation)

    @property
    def config(self):
        return self.source.config
