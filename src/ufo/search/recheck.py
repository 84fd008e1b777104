"""Which subnets of a predicted Pareto front a search measures for real, and in what order.

The predictors are wrong by a margin near any budget edge, so the measured re-check must not bet
on the few front points with the best predicted metric (they all sit at the edge, and a latency
budget can reject every one of them). `walk_front` spends a measurement budget of `k` subnets:

1. spread: about half of them evenly over the front's cost range, from the costliest point down;
2. bisection on cost: while an unmeasured front point lies between the costliest point measured
   within the budget and the cheapest one above it measured over the budget, measure the point
   nearest the middle of that cost gap. When nothing measured so far meets the budget, the gap
   reaches down to the cheapest front point, so the walk steps down the front, halving the cost
   range each time, until something meets it. The bisection runs until the gap is closed, even
   past `k` (about log2 of the front's length more at most): the budget's edge is where the
   best predicted subnets that still meet it lie;
3. refine: while fewer than `k` were measured, unmeasured points below that edge nearest (by
   front position) the best measured metric within the budget.

The front comes sorted by cost with the predicted metric rising along it. Only measured
feasibility and measured metric decide; the caller falls back to the smallest subnet only when
every point of the front was measured over the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Measured:
    """What measuring one front point found."""

    feasible: bool
    metric: float


# (front indices) -> what was measured for each, in the same order
MeasureFn = Callable[[list[int]], list[Measured]]


def spread(costs: Sequence[float], k: int) -> list[int]:
    """Up to `k` distinct indices of `costs` (ascending) nearest `k` evenly spaced costs, the
    costliest first and a step above the cheapest last (the cheapest subnets score worst, and the
    bisection reaches them when it must)."""
    n = len(costs)
    if n == 0 or k <= 0:
        return []
    c = np.asarray(costs, dtype=np.float64)
    k = min(k, n)
    out: list[int] = []
    for t in c[-1] - (c[-1] - c[0]) * np.arange(k) / k:
        free = [i for i in range(n) if i not in out]
        out.append(min(free, key=lambda i: (abs(c[i] - t), -i)))
    return out


def _gap(measured: dict[int, Measured]) -> tuple[int, int]:
    """(costliest index measured within the budget or -1, cheapest index above it measured over
    the budget or len): the unmeasured points strictly between them decide where the budget cuts."""
    hi = max((i for i, m in measured.items() if m.feasible), default=-1)
    lo_bad = min((i for i, m in measured.items() if not m.feasible and i > hi), default=None)
    return hi, lo_bad if lo_bad is not None else -1


def next_index(costs: Sequence[float], measured: dict[int, Measured]) -> tuple[int, str] | None:
    """The next front point to measure and why ("bisect" or "refine"); None when nothing is left
    that could change the choice."""
    n = len(costs)
    hi, lo_bad = _gap(measured)
    top = lo_bad if lo_bad >= 0 else n
    gap = [i for i in range(hi + 1, top) if i not in measured]
    if gap and lo_bad >= 0:  # the budget cuts somewhere in the gap: bisect it on cost
        low = costs[hi] if hi >= 0 else costs[0]
        mid = (low + costs[lo_bad]) / 2
        return min(gap, key=lambda i: (abs(costs[i] - mid), -i)), "bisect"
    ok = [i for i, m in measured.items() if m.feasible]
    if not ok:
        return None  # every measured point is over the budget and none is left below them
    best = max(ok, key=lambda i: (measured[i].metric, -i))
    below = [i for i in range(top) if i not in measured]
    if not below:
        return None
    return min(below, key=lambda i: (abs(i - best), -i)), "refine"


def walk_front(costs: Sequence[float], k: int, measure: MeasureFn) -> list[tuple[int, str]]:
    """Measure front points (costs ascending) through `measure`: `k` of them, or more while the
    bisection has not closed the budget's edge; returns (index, step) in the order they were measured,
    step being "spread", "bisect" or "refine"."""
    if k < 1:
        raise ValueError(f"k={k}: at least one subnet must be measured")
    measured: dict[int, Measured] = {}
    order: list[tuple[int, str]] = []
    first = spread(costs, max(1, (k + 1) // 2))
    for i, m in zip(first, measure(first)):
        measured[i] = m
        order.append((i, "spread"))
    while True:
        nxt = next_index(costs, measured)
        if nxt is None:
            break
        i, step = nxt
        if len(order) >= k and step == "refine":
            break
        measured[i] = measure([i])[0]
        order.append((i, step))
    return order
