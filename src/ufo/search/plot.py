"""The search's plot: every predicted subnet, the predicted Pareto front, the measured
candidates and the chosen one, against the budget."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ufo.search.optimize import Point
    from ufo.search.pipeline import SearchResult

LABELS = {"latency_ms": "latency (ms)", "params": "parameters", "flops": "FLOPs"}


def _cost(result: SearchResult, c) -> float:
    if result.objective == "latency_ms":
        return c.measured_latency.median_ms if c.measured_latency is not None else float("nan")
    return float(c.params if result.objective == "params" else c.flops)


def plot_search(result: SearchResult, points: Sequence[Point], path: str | Path) -> Path:
    """Write the metric-vs-cost plot of a search to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    feas = [p for p in points if p.feasible]
    infeas = [p for p in points if not p.feasible]
    ax.scatter([p.cost for p in infeas], [p.metric for p in infeas], s=5, c="0.85", label="predicted, over budget")
    ax.scatter([p.cost for p in feas], [p.metric for p in feas], s=5, c="0.6", label="predicted, within budget")
    ax.plot(
        [p.cost for p in result.front],
        [p.metric for p in result.front],
        "-o",
        ms=3,
        c="tab:blue",
        label="predicted Pareto front",
    )
    for c in result.candidates:
        pc = c.predicted_latency_ms if result.objective == "latency_ms" else _cost(result, c)
        ax.annotate(
            "",
            (_cost(result, c), c.measured_metric),
            (pc, c.predicted_metric),
            arrowprops={"arrowstyle": "->", "color": "tab:orange", "alpha": 0.5},
        )
    ok = [c for c in result.candidates if c.meets_budget]
    bad = [c for c in result.candidates if not c.meets_budget]
    ax.scatter(
        [_cost(result, c) for c in ok],
        [c.measured() for c in ok],
        c="tab:orange",
        s=30,
        label="measured, meets budget",
    )
    if bad:
        ax.scatter(
            [_cost(result, c) for c in bad],
            [c.measured() for c in bad],
            c="tab:orange",
            marker="x",
            s=30,
            label="measured, over budget",
        )
    chosen = next(c for c in result.candidates if c.arch == result.arch)
    ax.scatter([_cost(result, chosen)], [chosen.measured()], marker="*", s=250, c="tab:red", zorder=5, label="chosen")
    key = {"latency_ms": "max_latency_ms", "params": "max_params", "flops": "max_flops"}[result.objective]
    ax.axvline(result.budget[key], ls="--", c="k", lw=1, label="budget")
    ax.set_xlabel(LABELS[result.objective] + (f" on {result.backend}" if result.objective == "latency_ms" else ""))
    ax.set_ylabel(f"{result.task} {result.metric}")
    ax.set_title(f"search: {result.task}, {result.trials} trials; arrows: predicted -> measured")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
