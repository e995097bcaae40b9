"""Capturing what each quantized matrix sees during calibration.

- :func:`feed_inputs`: forward pre-hooks that stream a Linear's inputs into a GPTQ solver's
  Hessian while the attention runs (nothing is stored: H is ``[K, K]`` whatever the token count).
- :class:`Routing`: one layer's routing decision for all calibration tokens, grouped by expert,
  so expert e is calibrated on exactly the tokens the router sends it (and the report's token
  counts are the router's).
- :func:`chunks`: row chunks, so a Hessian update never materialises more than ``chunk`` rows of
  an expert's ``(n, F)`` intermediate.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from dbrxq.model.moe import group_by_expert, route
from quantize.gptq import GPTQ


@contextlib.contextmanager
def feed_inputs(targets: dict[str, tuple[nn.Module, GPTQ]]) -> Iterator[None]:
    """While active, every input ``x [..., K]`` of each module goes into its solver's add_batch."""
    handles = []
    for module, solver in targets.values():
        def hook(_mod, args, solver=solver):
            solver.add_batch(args[0])
        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def chunks(n: int, chunk: int) -> Iterator[slice]:
    for i in range(0, n, chunk):
        yield slice(i, min(n, i + chunk))


@dataclass
class Routing:
    """Routing of all N*L calibration tokens of one layer.

    ids, weights: (N*L, k) expert ids and normalised weights (float32) from the float router;
    counts: tokens routed to each expert (a token counts once per expert it visits);
    order, token_of: :func:`dbrxq.model.moe.group_by_expert`'s grouping of the (token, slot) pairs.
    """

    ids: torch.Tensor
    weights: torch.Tensor
    counts: list[int]
    order: torch.Tensor
    token_of: torch.Tensor

    @classmethod
    def of(cls, router_logits: torch.Tensor, top_k: int, norm_p: float | None, num_experts: int) -> Routing:
        """router_logits (N*L, E) -> the model's own routing (dbrxq.model.moe.route)."""
        weights, ids = route(router_logits, top_k, norm_p)
        order, token_of, counts = group_by_expert(ids, num_experts)
        return cls(ids, weights, counts, order, token_of)

    def tokens_of(self, e: int) -> torch.Tensor:
        """Indices (n_e,) of the tokens routed to expert e, ascending."""
        start = sum(self.counts[:e])
        return self.token_of[start:start + self.counts[e]]

    def weights_of(self, e: int) -> torch.Tensor:
        """Routing weights (n_e,) of those tokens for expert e, float32."""
        start = sum(self.counts[:e])
        return self.weights.reshape(-1)[self.order[start:start + self.counts[e]]]


@torch.no_grad()
def router_logits(router: nn.Module, h: torch.Tensor, chunk: int) -> torch.Tensor:
    """h (M, D) -> (M, E) logits, chunked so the float32 temporaries stay small."""
    return torch.cat([router(h[s]) for s in chunks(h.shape[0], chunk)]) if h.shape[0] else \
        router(h)
