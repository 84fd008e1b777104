"""Constrained multi-objective search over a search space with optuna's NSGA-II.

Each trial proposes depth, width and per-block heads and FFN ratio (values for blocks past the
depth are ignored); the task's FFN paths are the run's frozen routes. Trials are asked for a
generation at a time so the predictors score a whole population in one batched call. The two
objectives are the predicted metric (maximised) and a cost (minimised: predicted latency, or
exact parameters / FLOPs); the budget is an NSGA-II constraint (cost - budget <= 0), so
infeasible trials lose every comparison to feasible ones but still guide the search
(`Trial.set_constraint`, which optuna 5 reads in place of a `constraints_func`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict

from ufo.arch import Arch, SearchSpace
from ufo.optional import require

if TYPE_CHECKING:
    import optuna

# (archs) -> (predicted metric, its std, cost, constraint values (<= 0 is feasible)) per arch
Scorer = Callable[[list[Arch]], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


class Point(BaseModel):
    """One distinct subnet the search scored."""

    model_config = ConfigDict(extra="forbid")

    arch: Arch
    metric: float  # predicted
    metric_std: float
    cost: float  # predicted latency (ms), or exact params / FLOPs
    feasible: bool
    trial: int


def propose(trial: optuna.trial.Trial, space: SearchSpace, paths: Sequence[str], task: str) -> Arch:
    """The arch an optuna trial proposes; `paths` is the task's route over the largest depth."""
    d = trial.suggest_categorical("depth", space.depth)
    e = trial.suggest_categorical("embed_dim", space.embed_dim)
    heads = [trial.suggest_categorical(f"heads_{i}", space.num_heads) for i in range(space.max_depth)]
    ratios = [trial.suggest_categorical(f"mlp_ratio_{i}", space.mlp_ratio) for i in range(space.max_depth)]
    return Arch(
        depth=d,
        embed_dim=e,
        num_heads=heads[:d],
        mlp_ratio=[float(r) for r in ratios[:d]],
        paths={task: list(paths[:d])},
    )


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """Feasible points that no other feasible point beats on both metric (higher) and cost (lower),
    sorted by cost."""
    best: list[Point] = []
    for p in sorted((p for p in points if p.feasible), key=lambda p: (p.cost, -p.metric)):
        if not best or p.metric > best[-1].metric:
            best.append(p)
    return best


def nsga2_search(
    space: SearchSpace, task: str, paths: Sequence[str], score: Scorer, trials: int, population: int = 50, seed: int = 0
) -> tuple[list[Point], float]:
    """Run `trials` NSGA-II trials; returns every distinct arch scored (first trial that proposed
    it) and the wall time in seconds."""
    optuna = require("optuna")  # the [search] extra
    optuna.logging.set_verbosity(logging.WARNING)

    sampler = optuna.samplers.NSGAIISampler(population_size=population, seed=seed)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    seen: dict[str, Point] = {}
    t0 = time.perf_counter()
    done = 0
    while done < trials:
        batch = [study.ask() for _ in range(min(population, trials - done))]
        archs = [propose(t, space, paths, task) for t in batch]
        mu, sd, cost, cons = score(archs)
        for t, a, m, s, c, k in zip(batch, archs, mu, sd, cost, cons):
            for j, v in enumerate(np.atleast_1d(k)):
                t.set_constraint(f"budget_{j}", float(v))
            study.tell(t, [float(m), float(c)])
            key = a.model_dump_json()
            if key not in seen:
                seen[key] = Point(
                    arch=a,
                    metric=float(m),
                    metric_std=float(s),
                    cost=float(c),
                    feasible=bool(np.all(np.atleast_1d(k) <= 0)),
                    trial=t.number,
                )
        done += len(batch)
    return list(seen.values()), time.perf_counter() - t0
