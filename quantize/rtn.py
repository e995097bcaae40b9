"""Round-to-nearest (RTN) quantization, and the DBRX expert layout conversion.

RTN is :func:`quantize.primitives.quantize_tensor`; this file adds the step from the hub's
fused expert tensors to :mod:`quantize.format`'s per-expert (out, in) orientation:

    hub  ffn.experts.mlp.{w1,v1,w2}: [E*F, D] each
    w1, v1: view [E, F, D]               (already (out=F, in=D): y = x @ w1[e].T)
    w2:     view [E, F, D] -> [E, D, F]  (the hub computes x @ w2[e]; as a Linear, W = w2[e].T)

and back (:func:`experts_to_hub`), used by the reference path and the tests.
"""

from __future__ import annotations

import torch

from dbrxq.core.errors import QuantizationError
from quantize.primitives import QuantizedTensor, quantize_tensor

EXPERT_KINDS = ("w1", "v1", "w2")


@torch.no_grad()
def quantize_rtn(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True
) -> QuantizedTensor:
    """RTN-quantize ``w [..., N, K]`` (nn.Linear orientation); see quantize_tensor."""
    return quantize_tensor(w, bits, group_size, symmetric)


def _check_kind(kind: str) -> None:
    if kind not in EXPERT_KINDS:
        raise QuantizationError(f"expert tensor kind {kind!r} is not one of {EXPERT_KINDS}")


def experts_to_canonical(w_hub: torch.Tensor, kind: str, num_experts: int) -> torch.Tensor:
    """Hub ``[E*F, D]`` -> ``[E, F, D]`` (w1, v1) or ``[E, D, F]`` (w2), contiguous."""
    _check_kind(kind)
    if w_hub.dim() != 2 or num_experts <= 0 or w_hub.shape[0] % num_experts != 0:
        raise QuantizationError(
            f"expert tensor {kind} of shape {tuple(w_hub.shape)} is not [E*F, D] with "
            f"E={num_experts}"
        )
    w = w_hub.reshape(num_experts, w_hub.shape[0] // num_experts, w_hub.shape[1])  # [E, F, D]
    if kind == "w2":
        w = w.transpose(1, 2)  # [E, D, F]
    return w.contiguous()


def experts_to_hub(w: torch.Tensor, kind: str) -> torch.Tensor:
    """Inverse of :func:`experts_to_canonical`: ``[E, out, in]`` -> hub ``[E*F, D]``."""
    _check_kind(kind)
    assert w.dim() == 3, tuple(w.shape)
    if kind == "w2":
        w = w.transpose(1, 2)  # [E, D, F] -> [E, F, D]
    return w.reshape(-1, w.shape[-1]).contiguous()


@torch.no_grad()
def quantize_experts_rtn(
    w_hub: torch.Tensor,
    kind: str,
    num_experts: int,
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = True,
) -> QuantizedTensor:
    """RTN-quantize one fused expert tensor into the canonical ``[E, out, in]`` layout.

    Returns a QuantizedTensor of logical shape ``[E, F, D]`` (w1, v1) or ``[E, D, F]`` (w2);
    groups run along each expert's input dim (D for w1/v1, F for w2).
    """
    return quantize_tensor(experts_to_canonical(w_hub, kind, num_experts), bits, group_size,
                           symmetric)


@torch.no_grad()
def dequantize_experts_to_hub(
    qt: QuantizedTensor, kind: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The dequantized fused expert tensor back in the hub layout ``[E*F, D]``."""
    return experts_to_hub(qt.dequantize(dtype), kind)
