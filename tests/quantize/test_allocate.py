"""Bits per expert under a byte budget (quantize.allocate): exact against brute force, never over."""

import itertools
import random

import pytest

from dbrxq.core.errors import QuantizationError
from quantize.allocate import solve_exact, solve_greedy


def brute(costs, errors, budget):
    best = None
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        b = sum(c[j] for c, j in zip(costs, choice))
        e = sum(x[j] for x, j in zip(errors, choice))
        if b <= budget and (best is None or (e, b) < best[:2]):
            best = (e, b, list(choice))
    return best


def random_problem(rng, n, unit=1):
    """Expert-like items: the costs of 2, 3, 4, 8 bits at G=128 (17, 25, 33, 65 units), errors falling
    roughly 4x per bit with a per-item weight (a routing share), some items nearly unused."""
    costs = [[17 * unit, 25 * unit, 33 * unit, 65 * unit] for _ in range(n)]
    errors = []
    for _ in range(n):
        w = rng.choice([0.001, rng.random(), 3 * rng.random()])
        errors.append([w * 16 * rng.uniform(0.8, 1.2), w * 4 * rng.uniform(0.8, 1.2), w * rng.uniform(0.8, 1.2),
                       w * 0.004])
    return costs, errors


def test_a_hand_made_problem_has_its_known_optimum():
    costs = [[1, 2, 4], [1, 2, 4], [1, 2, 4]]
    errors = [[10, 4, 0], [8, 7, 1], [5, 1, 0.5]]
    # within 7 units the candidates that spend them all: A4 B1 C2 = 0 + 8 + 1 = 9, A2 B4 C1 = 10,
    # A4 B2 C1 = 12, A1 B4 C2 = 12, A2 B1 C4 = 12.5; with 6 units at most 12 (A2 B2 C2). Best: 9.
    r = solve_exact(costs, errors, 7)
    assert (r.choice, r.error, r.bytes) == ([2, 0, 1], 9.0, 7)
    # the greedy: B's hull skips its 2-unit option (not convex); A up (6 per unit), C up (4), then
    # B's jump (7/3 per unit) no longer fits and A up again (2): the optimum here too
    assert solve_greedy(costs, errors, 7).choice == [2, 0, 1]
    assert solve_exact(costs, errors, 12).choice == [2, 2, 2]  # all at the top when it all fits
    assert solve_exact(costs, errors, 3).choice == [0, 0, 0]


@pytest.mark.parametrize("seed", range(30))
def test_exact_equals_brute_force_and_never_exceeds_the_budget(seed):
    rng = random.Random(seed)
    costs, errors = random_problem(rng, rng.randint(2, 6), unit=rng.choice([1, 3, 1 << 20]))
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    budget = rng.randint(lo, hi + 5)
    want = brute(costs, errors, budget)
    for solve in (solve_exact, solve_greedy):
        r = solve(costs, errors, budget)
        assert r.bytes <= budget
        assert r.bytes == sum(c[j] for c, j in zip(costs, r.choice))
    r = solve_exact(costs, errors, budget)
    assert r.error == pytest.approx(want[0], rel=1e-12, abs=1e-12)
    assert solve_greedy(costs, errors, budget).error >= r.error - 1e-12


def test_greedy_is_close_on_a_dbrx_sized_problem():
    """640 experts (DBRX: 40 layers x 16) at an average of 3 bits: the greedy's error over the exact
    one's. (On the demo model's own errors, scripts/plan_bits.py compares the two.)"""
    rng = random.Random(0)
    costs, errors = random_problem(rng, 640, unit=6 * 10752 * 6144 // 128 // 16)
    budget = 640 * costs[0][1]  # everything at 3 bits
    exact, greedy = solve_exact(costs, errors, budget), solve_greedy(costs, errors, budget)
    assert exact.bytes <= budget and greedy.bytes <= budget
    assert exact.error <= greedy.error <= exact.error * 1.01


def test_refusals_are_one_line():
    with pytest.raises(QuantizationError, match="below the smallest possible total"):
        solve_exact([[10, 20]], [[1.0, 0.5]], 9)
    with pytest.raises(QuantizationError, match="item 0 has 2 costs and 1 errors"):
        solve_exact([[10, 20]], [[1.0]], 30)
    with pytest.raises(QuantizationError, match="errors finite"):
        solve_greedy([[10, 20]], [[1.0, float("nan")]], 30)
