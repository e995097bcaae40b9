"""The GPTQ solver (Frantar et al. 2022): one small class, no I/O, no model knowledge.

Usage, for one linear weight W ``[N, K]`` (``y = x @ W.T``) and its calibration inputs::

    solver = GPTQ(K, device=w.device)
    for x in batches:             # x: [..., K], the inputs this layer actually sees
        solver.add_batch(x)
    qt, stats = solver.quantize(w, bits=4, group_size=128, symmetric=True)
    solver.free()

Several weights that share inputs (w1 and v1 of an expert, Wqkv's slices) can be quantized
from one solver: :meth:`GPTQ.quantize` does not consume the Hessian.

Math. H = 2/n * sum_i x_i^T x_i (``[K, K]``, float32, kept as a running average so batches of
any size can be added). Columns are quantized left to right; the rounding error of column j,
divided by the j-th diagonal of U (the upper Cholesky factor of H^-1), is propagated onto the
not-yet-quantized columns through row j of U, which minimises ``||X W^T - X Q^T||^2`` greedily.
Updates are applied lazily per block of ``block_size`` columns (same result, fewer passes over W).

Groups. Without act_order, each group's scales are computed when the solver reaches its first
column, from the weights as updated so far (as the reference implementation does). With
act_order the columns are visited in descending diag(H) order; the groups' qparams are then
computed up front from the original weights in the original column order ("static groups"),
so the stored ``[N, K // G]`` scales stay valid and no permutation needs storing.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from dbrxq.core.errors import QuantizationError
from quantize import kquants
from quantize.primitives import (
    QuantizedTensor,
    compute_qparams,
    pack_codes,
    quantize_tensor,
    resolve_group_size,
)

# Each retry multiplies the relative dampening by this, up to MAX_DAMP_TRIES attempts.
DAMP_GROWTH = 10.0
MAX_DAMP_TRIES = 4


class GPTQ:
    """Accumulates the input Hessian of one linear layer and quantizes weights against it.

    Args:
        columns: K, the layer's input features.
        device: where H lives and the solve runs (weights are moved there).
    """

    def __init__(self, columns: int, device: torch.device | str | None = None) -> None:
        assert columns > 0, columns
        self.columns = columns
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.H: torch.Tensor | None = torch.zeros(
            columns, columns, dtype=torch.float32, device=self.device
        )
        self.nsamples = 0

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Accumulate ``x [..., K]`` (flattened to ``[n, K]``): H <- 2/n_total * sum x^T x."""
        assert self.H is not None, "add_batch after free()"
        if x.shape[-1] != self.columns:
            raise QuantizationError(
                f"calibration input has {x.shape[-1]} features, this layer has {self.columns}"
            )
        x = x.reshape(-1, self.columns).to(self.device, torch.float32)
        n = x.shape[0]
        if n == 0:
            return
        # Running average: rescale the old sum to the new count before adding, which keeps the
        # magnitude of H independent of how many tokens were seen.
        self.H *= self.nsamples / (self.nsamples + n)
        self.nsamples += n
        x = math.sqrt(2.0 / self.nsamples) * x
        self.H += x.T @ x

    def free(self) -> None:
        """Release the Hessian."""
        self.H = None

    @torch.no_grad()
    def quantize(
        self,
        w: torch.Tensor,
        bits: int,
        group_size: int,
        symmetric: bool = True,
        *,
        damp: float = 0.01,
        block_size: int = 128,
        act_order: bool = False,
        static_groups: bool | None = None,
    ) -> tuple[QuantizedTensor, dict[str, Any]]:
        """GPTQ-quantize ``w [N, K]`` against the accumulated Hessian.

        Args:
            w: ``[N, K]`` weights in nn.Linear orientation (any float dtype).
            bits, group_size, symmetric: as in :func:`quantize.primitives.compute_qparams`.
            damp: relative dampening; ``damp * mean(diag H)`` is added to diag H.
            block_size: columns per lazy-update block (adjusted so groups never straddle one).
            act_order: visit columns by descending diag(H) (helps at low bits).
            static_groups: compute all groups' qparams up front from the original weights.
                None = "when act_order"; act_order with static_groups=False is refused since
                the stored layout has no permutation.

        Returns:
            ``(qt, stats)``: the QuantizedTensor (on the solver's device) and a dict with
            ``output_error`` = tr(E H E^T), E = W - W_hat, undamped H, i.e.
            2/n * ||X W^T - X W_hat^T||_F^2 on the calibration data (exact up to ERROR_ROWS rows,
            estimated from a row subsample above);
            ``loss``, GPTQ's running proxy sum_j ||err_j||^2 / (2 U_jj^2), which approximates
            output_error / 2 (it ignores dampening and clamping);
            ``damp`` (the relative dampening that worked), ``dead_columns``, ``nsamples``,
            ``seconds``.

        Raises:
            QuantizationError: no calibration data, non-finite Hessian, act_order without
                static groups, unsupported settings, or a Hessian that stays indefinite.
        """
        t0 = time.perf_counter()
        W, H, dead = self._prepare(w)
        if static_groups is None:
            static_groups = act_order
        if act_order and not static_groups:
            raise QuantizationError(
                "act_order=True needs static_groups=True: the stored format keeps groups in "
                "the original column order and stores no permutation"
            )
        n_rows, k = w.shape
        g = resolve_group_size(group_size, k, bits)
        maxq, sym_zero = 2**bits - 1, float(2 ** (bits - 1))

        scales = torch.empty(n_rows, k // g, dtype=torch.float16, device=self.device)
        zeros = None if symmetric else torch.empty_like(scales, dtype=torch.uint8)
        # Per-column scale and zero in visiting order, [N, K] float32; filled up front for static
        # groups, at each group's first column otherwise. Symmetric zeros are one constant.
        col_s = torch.empty_like(W)
        col_z = None if symmetric else torch.empty_like(W)
        if static_groups:
            scales, zeros = compute_qparams(W, bits, group_size, symmetric)
            col_s = scales.float().repeat_interleave(g, dim=1)
            if not symmetric:
                col_z = zeros.float().repeat_interleave(g, dim=1)

        perm = None
        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True)
            W, H = W[:, perm], H[perm][:, perm]
            col_s = col_s[:, perm].contiguous()
            col_z = None if symmetric else col_z[:, perm].contiguous()

        hinv, used_damp = _upper_cholesky_of_inverse(H, damp)

        # A group must start at a block start or lie inside one block, so that its qparams
        # (dynamic groups) see every update made so far.
        if not static_groups and g < k and g % block_size and block_size % g:
            block_size = math.gcd(g, block_size)

        codes = torch.empty(n_rows, k, dtype=torch.uint8, device=self.device)
        losses = torch.zeros(n_rows, device=self.device, dtype=torch.float32)
        for i1 in range(0, k, block_size):
            i2 = min(i1 + block_size, k)
            W1 = W[:, i1:i2].clone()
            err1 = torch.zeros_like(W1)
            hinv1 = hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                j = i1 + i
                if not static_groups and j % g == 0:
                    # W[:, i1:] is current up to this block; W1 holds this block's updates.
                    src = W[:, j : j + g] if i == 0 else W1[:, i : i + g]
                    assert src.shape[1] == g, (j, g, i1, i2, block_size)
                    s, z = compute_qparams(src, bits, g, symmetric)
                    scales[:, j // g] = s[:, 0]
                    col_s[:, j : j + g] = s.float()
                    if z is not None:
                        zeros[:, j // g] = z[:, 0]
                        col_z[:, j : j + g] = z.float()
                col = W1[:, i]
                s = col_s[:, j]
                z = sym_zero if col_z is None else col_z[:, j]
                q = torch.clamp(torch.round(col / s) + z, 0, maxq)
                codes[:, j] = q.to(torch.uint8)
                d = hinv1[i, i]
                e = (col - (q - z) * s) / d
                losses += e.square() / 2
                W1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
                err1[:, i] = e
            # Lazy batch update: the rest of W receives this block's errors in one matmul.
            W[:, i2:] -= err1 @ hinv[i1:i2, i2:]

        if perm is not None:
            codes = codes[:, torch.argsort(perm)]
        qt = QuantizedTensor(
            pack_codes(codes, bits), scales, zeros, bits, group_size, w.shape
        )
        stats = {
            "loss": float(losses.sum()),
            "output_error": _output_error(w.to(self.device), qt, self.H),
            "damp": used_damp,
            "dead_columns": int(dead.sum()),
            "nsamples": self.nsamples,
            "seconds": time.perf_counter() - t0,
        }
        return qt, stats

    def _prepare(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W float32 copy, H copy, dead columns) after the checks every solve makes. Inputs that
        never fire carry no information: their diagonal is pinned so H stays invertible, and their
        weights are zeroed, which cannot affect the output on this data."""
        if self.H is None:
            raise QuantizationError("GPTQ.quantize called after free(); the Hessian is gone")
        if w.dim() != 2 or w.shape[1] != self.columns:
            raise QuantizationError(
                f"GPTQ expects a weight [N, {self.columns}], got {tuple(w.shape)}"
            )
        if self.nsamples == 0:
            raise QuantizationError("GPTQ has no calibration inputs (add_batch was never fed)")
        if not torch.isfinite(self.H).all():
            raise QuantizationError(
                "GPTQ Hessian has NaN/inf entries: the calibration inputs are not finite"
            )
        W = w.to(self.device, torch.float32).clone()
        H = self.H.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
        return W, H, dead

    @torch.no_grad()
    def quantize_grid(self, w: torch.Tensor, name: str, *, damp: float = 0.01,
                      block_size: int = 128) -> tuple[kquants.KQuantized, dict[str, Any]]:
        """GPTQ onto llama.cpp's grid ``name`` (quantize.kquants: Q8_0, Q4_K, Q5_K, Q6_K): at each
        block's first column its quantized scales (and mins) are chosen from the weights as updated so
        far, weighted by the Hessian's diagonal (llama.cpp's importance-matrix weighting), and the
        columns are then rounded onto exactly that grid, so what is written is what GPTQ solved for.
        Returns ``(KQuantized, stats)`` with ``output_error`` as in :meth:`quantize`."""
        t0 = time.perf_counter()
        grid = kquants.grid(name)
        kquants.check_shape(w, grid)
        W, H, dead = self._prepare(w)
        n_rows, k = W.shape
        hinv, used_damp = _upper_cholesky_of_inverse(H, damp)
        B = grid.block
        if B % block_size and block_size % B:
            block_size = math.gcd(B, block_size)
        fields = kquants.empty_fields(grid, n_rows, k // B)
        codes = torch.empty(n_rows, k, dtype=torch.int16)
        col_s, col_o = torch.empty_like(W), torch.zeros_like(W)
        importance = torch.diag(self.H)
        for i1 in range(0, k, block_size):
            i2 = min(i1 + block_size, k)
            W1, err1, hinv1 = W[:, i1:i2].clone(), torch.zeros(n_rows, i2 - i1, device=W.device), hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                j = i1 + i
                if j % B == 0:  # the block's grid, from the weights as updated so far
                    src = W[:, j:j + B] if i == 0 else W1[:, i:i + B]
                    p = grid.params(src, kquants.importance_weights(src, importance[j:j + B]))
                    for key, v in p.items():
                        fields[key][:, j // B] = v.view(n_rows, -1).cpu()
                    S, O = grid.scale_offset(p)
                    col_s[:, j:j + B] = S.repeat_interleave(grid.sub, dim=1)
                    if O is not None:
                        col_o[:, j:j + B] = O.repeat_interleave(grid.sub, dim=1)
                col = W1[:, i]
                q = grid.codes(col, col_s[:, j], col_o[:, j] if grid.asym else None)
                codes[:, j] = q.to(torch.int16).cpu()
                e = (col - (col_s[:, j] * q - col_o[:, j])) / hinv1[i, i]
                W1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
                err1[:, i] = e
            W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
        kq = kquants.KQuantized(grid, codes, fields)
        stats = {"output_error": quadratic_energy(w.to(self.device).float() - kquants.dequantize(kq).to(self.device),
                                                  self.H),
                 "damp": used_damp, "dead_columns": int(dead.sum()), "nsamples": self.nsamples,
                 "seconds": time.perf_counter() - t0}
        return kq, stats

    @torch.no_grad()
    def output_error(self, w: torch.Tensor, qt: QuantizedTensor) -> float:
        """tr(E H E^T), E = w - qt.dequantize(): 2/n * ||X w^T - X w_hat^T||^2 on the seen data.

        Handy to compare any quantization of ``w`` (e.g. RTN) with what :meth:`quantize` gives.
        """
        assert self.H is not None, "output_error after free()"
        return _output_error(w.to(self.device, torch.float32), qt, self.H)

    @torch.no_grad()
    def rtn_output_error(self, w: torch.Tensor, bits: int, group_size: int,
                         symmetric: bool = True) -> float:
        """The :meth:`output_error` of plain round-to-nearest, the baseline GPTQ must beat."""
        return self.output_error(w, quantize_tensor(w.to(self.device), bits, group_size, symmetric))


# Output errors are tr(E H E^T): an [N, K] x [K, K] product as costly as the GPTQ solve itself.
# Above this many rows they are estimated from every step-th row (scaled by the step): the rows of
# a weight are interchangeable for this sum, and 512 rows give a relative error well inside the
# spread between quantization methods. Exact for N <= 512.
ERROR_ROWS = 512


def row_step(n_rows: int, max_rows: int = ERROR_ROWS) -> int:
    return -(-n_rows // max_rows)


def quadratic_energy(m: torch.Tensor, H: torch.Tensor) -> float:
    """tr(M H M^T) for M [N, K], estimated from every row_step(N)-th row when N > ERROR_ROWS."""
    step = row_step(m.shape[0])
    rows = m[::step].float()
    return float(((rows @ H) * rows).sum()) * step


def _output_error(w: torch.Tensor, qt: QuantizedTensor, H: torch.Tensor) -> float:
    return quadratic_energy(w.float() - qt.dequantize(torch.float32), H)  # E = W - W_hat, [N, K]


def _upper_cholesky_of_inverse(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """U with U^T U = (H + lambda I)^-1, lambda = damp * mean(diag H), retrying larger damps.

    Returns ``(U, relative damp used)``; raises QuantizationError when every try fails.
    """
    assert damp >= 0, damp
    mean_diag = torch.diag(H).mean()
    rel = damp
    idx = torch.arange(H.shape[0], device=H.device)
    for attempt in range(MAX_DAMP_TRIES):
        if attempt:
            rel = rel * DAMP_GROWTH if rel > 0 else 0.01
        Hd = H.clone()
        Hd[idx, idx] += rel * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U, rel
    raise QuantizationError(
        f"GPTQ Hessian not positive definite after damping up to {rel:g} "
        f"x mean(diag H) (mean diag = {float(mean_diag):.3g}); check the calibration inputs"
    )
