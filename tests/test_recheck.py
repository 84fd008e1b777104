"""The measured re-check's walk over a predicted Pareto front (`ufo.search.recheck`): spread over
the cost range, bisection on cost to the budget's edge, refinement near the best measured metric,
and never settling for less while an unmeasured, better feasible subnet could remain."""

from __future__ import annotations

import pytest

from ufo.search.recheck import Measured, spread, walk_front


class Front:
    """A fake front: costs 1..n, true feasibility cost <= limit, a metric per point."""

    def __init__(self, n: int, limit: float, metric=None) -> None:
        self.costs = [float(i + 1) for i in range(n)]
        self.limit = limit
        self.metric = metric or (lambda i: 0.5 + 0.02 * i)
        self.calls: list[list[int]] = []

    def measure(self, idx: list[int]) -> list[Measured]:
        self.calls.append(list(idx))
        return [Measured(self.costs[i] <= self.limit, self.metric(i)) for i in idx]


def best_feasible(front: Front, order) -> int:
    ok = [i for i, _ in order if front.costs[i] <= front.limit]
    return max(ok, key=front.metric)


def test_spread_covers_the_cost_range_costliest_first():
    costs = [1.0, 1.1, 1.2, 5.0, 9.0, 10.0]
    idx = spread(costs, 3)
    assert idx[0] == 5 and len(set(idx)) == 3
    assert min(costs[i] for i in idx) <= 5.0  # the range is covered down to a third above the cheapest
    assert spread(costs, 2) == [5, 3]  # the costliest and the middle of the range
    assert spread(costs, 10) == sorted(spread(costs, 10), key=lambda i: -costs[i]) and len(spread(costs, 10)) == 6
    assert spread([], 3) == [] and spread(costs, 0) == []


def test_the_walk_finds_the_budget_edge_by_bisection():
    f = Front(40, limit=13.0)
    order = walk_front(f.costs, 8, f.measure)
    measured = {i for i, _ in order}
    assert 12 in measured and 13 in measured  # the costliest feasible and the cheapest infeasible both measured
    assert best_feasible(f, order) == 12
    assert any(step == "bisect" for _, step in order)
    assert len(order) == 8  # the edge was closed within the k measurements: the rest refined


def test_the_walk_steps_down_past_k_until_something_meets_the_budget():
    # Only the cheapest front point meets the budget; with k = 2 the spread measures two points over it.
    f = Front(64, limit=1.0)
    order = walk_front(f.costs, 2, f.measure)
    assert (0, "bisect") in order or (0, "spread") in order
    assert best_feasible(f, order) == 0
    assert len(order) <= 2 + 7  # bisection: about log2(64) steps, not a walk over all 64 points


def test_nothing_feasible_on_the_front_ends_the_walk_for_the_fallback():
    f = Front(30, limit=0.0)
    order = walk_front(f.costs, 4, f.measure)
    assert all(f.costs[i] > f.limit for i, _ in order)
    assert 0 in {i for i, _ in order}  # it reached the cheapest point before giving up
    assert len(order) <= 4 + 6


def test_exact_budgets_refine_around_the_best_measured_metric():
    # Every point is feasible (a parameter budget) but the predictor overrated the top of the front:
    # the true metric peaks at index 9 of 30.
    f = Front(30, limit=1e9, metric=lambda i: 1.0 - abs(i - 9) * 0.01)
    order = walk_front(f.costs, 8, f.measure)
    steps = dict(order)
    assert 9 in steps and steps[9] in ("spread", "refine")
    assert [s for _, s in order].count("refine") == 8 - 4
    assert not any(s == "bisect" for _, s in order)


@pytest.mark.parametrize("limit", [1.0, 5.0, 17.0, 31.0, 64.0])
def test_the_walk_always_measures_the_costliest_feasible_point_when_cost_is_monotone(limit):
    f = Front(64, limit=limit)
    order = walk_front(f.costs, 6, f.measure)
    assert best_feasible(f, order) == int(limit) - 1  # the edge is closed even past k ...
    assert len(order) <= 6 + 6  # ... in about log2(64) more measurements at most


def test_k_must_be_positive():
    with pytest.raises(ValueError, match="k=0"):
        walk_front([1.0], 0, lambda idx: [])
