"""Batch invariance: a batch's rows computed bit for bit as each would be alone.

The server's batched decode step (dbrxq.serve.engine) puts different requests in one batch; within
:func:`batch_invariant`, any weight whose kernel is not row-independent is applied one row at a
time. Float matmuls are not row-independent; dbrxq's C kernels are (quantize.kernels.CpuQWeight).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable

import torch
from torch import nn


class _Mode(threading.local):
    invariant = False


_MODE = _Mode()


def invariant() -> bool:
    """Whether this thread is inside :func:`batch_invariant`."""
    return _MODE.invariant


@contextlib.contextmanager
def batch_invariant(on: bool = True):
    """Within this block (on this thread), every row of a batch is computed bit for bit as it would
    be alone: a weight whose kernel is not row-independent (:func:`row_independent`) is applied
    to one row at a time, the same call a batch of one makes. Float matmuls are not
    row-independent (torch picks gemv or differently blocked gemm kernels by the number of rows,
    so a row's rounding depends on how many rows came with it); dbrxq's C kernels are (exact
    integer dot products per row; quantize.kernels.CpuQWeight), and keep one pass over the weights
    for the whole batch. Used by the server's batched decode step (dbrxq.engine), where the rows
    are different requests."""
    old, _MODE.invariant = _MODE.invariant, on
    try:
        yield
    finally:
        _MODE.invariant = old


def row_independent(module) -> bool:
    """Whether ``module``'s output row i is a function of its input row i alone, bit for bit, for
    any number of rows (a ``row_independent`` attribute; False when absent, e.g. nn.Linear)."""
    return bool(getattr(module, "row_independent", False))


def by_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, independent: bool) -> torch.Tensor:
    """fn(x), or, under :func:`batch_invariant` when fn is not row-independent, fn of each row of
    x (its first dimension) concatenated."""
    if not _MODE.invariant or independent or x.shape[0] <= 1:
        return fn(x)
    return torch.cat([fn(x[i:i + 1]) for i in range(x.shape[0])])


def apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) under the batch-invariance rule of :func:`by_rows`."""
    if not _MODE.invariant:  # the common case first: a decode step applies several modules per layer
        return module(x)
    return by_rows(module, x, row_independent(module))
