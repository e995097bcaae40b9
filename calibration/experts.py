"""Quantizing one matrix or one expert against its calibration inputs, and the rare-expert rule.

Each expert is calibrated on the tokens the (float) router actually sends it: the Hessian of
w1 and v1 (shared, ``[D, D]``) comes from those tokens' inputs, the Hessian of w2 (``[F, F]``)
from their intermediate activations ``act(x w1^T) * (x v1^T)`` computed with the ALREADY
quantized w1/v1 (what w2 will see at inference).

Rare experts. An expert routed fewer than ``min_tokens`` calibration tokens has a Hessian of rank
< min_tokens: most input directions are then known to GPTQ only through its dampening, and it
overfits the few tokens it saw. Default rule: ``min_tokens = ceil(d_model / 8)`` (768 for DBRX,
16 for the demo model), i.e. the expert's Hessian must have rank >= 1/8 of its input dim. Such an
expert is quantized by one of two strategies (``RARE_STRATEGIES``):

- ``"route-all"`` (default): its Hessians are collected from EVERY calibration token, as if the
  router sent them all to it (propagation still uses the routed outputs only). A dense-model
  Hessian is a better prior than a rank-deficient one; measured on the demo model it is as good
  as or better than RTN (table in calibration/pipeline.py's docstring).
- ``"rtn"``: round to nearest, no Hessian.

Every matrix's stats give ``rel_error = ||X (W - W_hat)^T||_F / ||X W^T||_F`` on the inputs it
was measured on (the routed tokens; all tokens for route-all), from GPTQ's exact
``output_error = tr(E H E^T)`` and ``tr(W H W^T)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from calibration.capture import chunks
from quantize.config import ModuleQuant
from quantize.gptq import GPTQ, quadratic_energy
from quantize.primitives import QuantizedTensor, quantize_tensor

RARE_STRATEGIES = ("route-all", "rtn")

__all__ = ["RARE_STRATEGIES", "ExpertPolicy", "default_min_tokens", "expert_strategy", "quantize_matrix",
           "quantize_expert"]


def default_min_tokens(d_model: int) -> int:
    """The rare-expert threshold: ceil(d_model / 8) routed tokens."""
    return max(1, math.ceil(d_model / 8))


@dataclass(frozen=True)
class ExpertPolicy:
    """How matrices are quantized: method ("gptq"|"rtn"), GPTQ knobs, rare-expert rule, row chunk."""

    method: str = "gptq"
    rare_strategy: str = "route-all"
    min_tokens: int = 1
    damp: float = 0.01
    act_order: bool = False
    chunk: int = 4096  # rows per Hessian update: bounds the (chunk, F) intermediate


def expert_strategy(tokens: int, policy: ExpertPolicy) -> str:
    """"gptq" | "route-all" | "rtn" for an expert routed ``tokens`` calibration tokens."""
    if policy.method == "rtn":
        return "rtn"
    return "gptq" if tokens >= policy.min_tokens else policy.rare_strategy


@torch.no_grad()
def quantize_matrix(w: torch.Tensor, solver: GPTQ, mq: ModuleQuant, use_gptq: bool,
                    policy: ExpertPolicy) -> tuple[QuantizedTensor, dict[str, Any]]:
    """Quantize ``w [N, K]`` (GPTQ against ``solver``'s Hessian, or RTN) and measure it.

    Returns ``(qt on CPU, stats)`` with stats ``method``, ``rel_error`` (None without tokens),
    ``output_error``, ``nsamples``.
    """
    n = solver.nsamples
    if use_gptq:
        qt, st = solver.quantize(w, mq.bits, mq.group_size, mq.symmetric, damp=policy.damp,
                                 act_order=policy.act_order)
        err = st["output_error"]
    else:
        qt = quantize_tensor(w.to(solver.device, torch.float32), mq.bits, mq.group_size, mq.symmetric)
        err = solver.output_error(w, qt) if n else None
    rel = None
    if n:
        ref = quadratic_energy(w.to(solver.device, torch.float32), solver.H)  # tr(W H W^T) = 2/n ||X W^T||^2
        rel = math.sqrt(max(err, 0.0) / ref) if ref > 0 else 0.0
    qt = QuantizedTensor(qt.qweight.cpu(), qt.scales.cpu(), None if qt.qzeros is None else qt.qzeros.cpu(),
                         qt.bits, qt.group_size, qt.shape)
    return qt, {"method": "gptq" if use_gptq else "rtn", "rel_error": rel, "output_error": err, "nsamples": n}


@torch.no_grad()
def quantize_expert(w1: torch.Tensor, v1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, mq: ModuleQuant,
                    strategy: str, policy: ExpertPolicy, act: Callable[[torch.Tensor], torch.Tensor]
                    ) -> tuple[dict[str, QuantizedTensor], dict[str, dict]]:
    """Quantize one expert in the canonical orientation.

    Args:
        w1, v1: ``[F, D]``; w2: ``[D, F]`` (so ``y = h @ w2.T``); any float dtype.
        x: ``(n, D)`` float32 calibration inputs on the compute device: the routed tokens
            ("gptq", "rtn") or all tokens ("route-all"); n may be 0 for "rtn".
        strategy: from :func:`expert_strategy`.
    Returns:
        ``({"w1", "v1", "w2": QuantizedTensor on CPU}, {kind: stats})``.
    """
    use_gptq = strategy != "rtn"
    dev = x.device
    s1 = GPTQ(x.shape[1], device=dev)
    for sl in chunks(x.shape[0], policy.chunk):
        s1.add_batch(x[sl])
    q1, st1 = quantize_matrix(w1, s1, mq, use_gptq, policy)
    qv, stv = quantize_matrix(v1, s1, mq, use_gptq, policy)
    s1.free()
    # w2 sees the intermediate of the QUANTIZED w1/v1: (n, F) = act(x w1q^T) * (x v1q^T).
    w1q, v1q = q1.dequantize().to(dev), qv.dequantize().to(dev)
    s2 = GPTQ(w2.shape[1], device=dev)
    for sl in chunks(x.shape[0], policy.chunk):
        s2.add_batch(act(x[sl] @ w1q.T) * (x[sl] @ v1q.T))
    q2, st2 = quantize_matrix(w2, s2, mq, use_gptq, policy)
    s2.free()
    return {"w1": q1, "v1": qv, "w2": q2}, {"w1": st1, "v1": stv, "w2": st2}
