"""Bits per expert under a byte budget: a multiple-choice knapsack, solved exactly.

Each item (one expert's w1, v1, w2) takes one option (a bit width) with a byte cost and a
predicted error; we choose one option per item to minimise the summed error with the summed bytes
at most the budget. In general that is NP-hard, but the costs here are small integers in disguise:
every expert of a model has the same shape, so an option's bytes are ``3 F D (b/8 + s/G)`` for
every item, and all the costs share a large common divisor (at G = 128, F D / 128 x 6 bytes: the
costs of 2, 3, 4 and 8 bits are then 17, 25, 33 and 65 units). :func:`solve_exact` divides every
cost by the greatest common divisor and runs the textbook dynamic program over the budget in those
units, vectorised over the budget axis: items x options x units steps (real DBRX: 640 x 4 x 41,600;
tests/quantize/test_allocate.py solves a problem of that size). :func:`solve_greedy` is the classic alternative (start every item at its
cheapest option, then take the upgrade with the largest error saved per byte while it fits, on each
item's lower convex hull); it is here to be compared with the exact answer, not to replace it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dbrxq.core.errors import QuantizationError

MAX_UNITS = 50_000_000  # items x budget units the exact program may take (memory: one int8 choice each)


@dataclass
class Allocation:
    choice: list[int]  # per item, the index of its option
    bytes: int
    error: float


def _check(costs: list[list[int]], errors: list[list[float]], budget: int) -> None:
    if len(costs) != len(errors) or not costs:
        raise QuantizationError(f"allocation: {len(costs)} items with costs, {len(errors)} with errors")
    for i, (c, e) in enumerate(zip(costs, errors)):
        if not c or len(c) != len(e):
            raise QuantizationError(f"allocation: item {i} has {len(c)} costs and {len(e)} errors")
        if any(not isinstance(x, int) or x < 0 for x in c) or any(not math.isfinite(x) for x in e):
            raise QuantizationError(f"allocation: item {i}: costs must be non-negative integers and errors finite")
    least = sum(min(c) for c in costs)
    if budget < least:
        raise QuantizationError(f"allocation: the budget of {budget} bytes is below the smallest possible total "
                                f"({least} bytes, every item at its cheapest option)")


def _result(choice: list[int], costs, errors) -> Allocation:
    return Allocation(choice, sum(c[j] for c, j in zip(costs, choice)), float(sum(e[j] for e, j in zip(errors, choice))))


def solve_exact(costs: list[list[int]], errors: list[list[float]], budget: int) -> Allocation:
    """The allocation of least summed error with summed cost <= ``budget`` (ties: fewer bytes).

    costs[i][j], errors[i][j]: option j of item i. Raises QuantizationError when no allocation fits
    or the dynamic program would be too large (more than MAX_UNITS items x budget units)."""
    _check(costs, errors, budget)
    unit = 0
    for c in costs:
        for x in c:
            unit = math.gcd(unit, x)
    unit = unit or 1
    cap = min(budget, sum(max(c) for c in costs)) // unit  # more budget than the dearest total buys nothing
    if len(costs) * (cap + 1) > MAX_UNITS:
        raise QuantizationError(f"allocation: {len(costs)} items x {cap + 1} budget units is too large to solve "
                                f"exactly (costs share no large divisor)")
    inf = np.inf
    best = np.full(cap + 1, inf)  # best[u]: least error of the items so far using exactly u units
    best[0] = 0.0
    picks = np.zeros((len(costs), cap + 1), dtype=np.int8)
    for i, (c, e) in enumerate(zip(costs, errors)):
        nxt = np.full(cap + 1, inf)
        for j, (x, err) in enumerate(zip(c, e)):
            u = x // unit
            if u > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[u:] = best[: cap + 1 - u] + err
            better = cand < nxt
            nxt[better] = cand[better]
            picks[i, better] = j
        best = nxt
    end = int(np.argmin(best))  # argmin keeps the first (fewest units) of equal errors
    if not np.isfinite(best[end]):
        raise QuantizationError("allocation: no combination of options fits the budget")
    choice = [0] * len(costs)
    for i in range(len(costs) - 1, -1, -1):
        j = int(picks[i, end])
        choice[i] = j
        end -= costs[i][j] // unit
    return _result(choice, costs, errors)


def solve_greedy(costs: list[list[int]], errors: list[list[float]], budget: int) -> Allocation:
    """Marginal-error-per-byte greedy: every item at its cheapest option, then repeatedly the upgrade
    (to the next point of the item's lower convex hull of (cost, error)) saving the most error per
    byte that still fits. Optimal when the budget falls on a hull vertex; otherwise close."""
    _check(costs, errors, budget)
    hulls = []
    for c, e in zip(costs, errors):
        pts = sorted(range(len(c)), key=lambda j: (c[j], e[j]))
        hull: list[int] = []
        for j in pts:
            if hull and e[j] >= e[hull[-1]]:
                continue  # dearer and not better
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                # drop b if it lies on or above the segment a -> j (not convex)
                if (e[a] - e[b]) * (c[j] - c[b]) <= (e[b] - e[j]) * (c[b] - c[a]):
                    hull.pop()
                else:
                    break
            hull.append(j)
        hulls.append(hull)
    pos = [0] * len(costs)
    total = sum(c[h[0]] for c, h in zip(costs, hulls))
    while True:
        best, pick = 0.0, None
        for i, (c, e, h) in enumerate(zip(costs, errors, hulls)):
            if pos[i] + 1 >= len(h):
                continue
            a, b = h[pos[i]], h[pos[i] + 1]
            extra = c[b] - c[a]
            if total + extra > budget:
                continue
            gain = (e[a] - e[b]) / max(extra, 1)
            if gain > best:
                best, pick = gain, i
        if pick is None:
            break
        h = hulls[pick]
        total += costs[pick][h[pos[pick] + 1]] - costs[pick][h[pos[pick]]]
        pos[pick] += 1
    return _result([h[p] for h, p in zip(hulls, pos)], costs, errors)
