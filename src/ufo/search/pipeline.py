"""Predict and search on a trained run: fit (and cache) the predictors, search under a budget,
measure the best candidates for real, and save the chosen subnet as a task model.

`fit_predictors(run_dir, task, ...)` evaluates sampled subnets of the run (inherited weights,
the task's eval protocol) and measures sampled subnets' latency on a backend, fits one GP per
target and saves datasets and predictors under RUN_DIR/predictors/ (keyed by task and backend);
a later call reuses them while the run's weights, the space and the settings are unchanged.
`search_task(run_dir, task, max_latency_ms=... | max_params=... | max_flops=..., out_dir=...)`
runs NSGA-II on the predictions (`ufo.search.optimize`), then evaluates and times subnets of the
predicted Pareto front (`ufo.search.recheck`: spread over its cost range, then a bisection on cost
down to where the measured cost meets the budget), chooses the best measured metric among those
that meet it (median latency, the one statistic used throughout), and writes
OUT/model.safetensors (the format `ufo export` / `ufo serve` take), OUT/search.json and
OUT/pareto.png.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from ufo.arch import Arch
from ufo.checkpoint import atomic_write_text, read_manifest
from ufo.errors import CheckpointError, InfeasibleBudget, SearchError
from ufo.flags import predictor_flag
from ufo.optional import require
from ufo.runlock import locks, run_lock
from ufo.search.features import FEATURES, arch_features
from ufo.search.latency import (
    BACKENDS,
    DEFAULT_THREADS,
    Latency,
    LatencyDataset,
    check_backend,
    collect,
    fraction_budget,
    machine_info,
    measure_many,
    sample_archs,
)
from ufo.search.metric import MetricDataset, TrainedRun, collect_metrics, fit_metric_predictor
from ufo.search.optimize import Point, nsga2_search, pareto_front
from ufo.search.predictor import FORMAT as PREDICTOR_FORMAT
from ufo.search.predictor import GPPredictor, fit_latency_predictor
from ufo.search.recheck import Measured, walk_front

LATENCY_REPEATS = 30


def _say(console: Console | None, msg: str) -> None:
    if console is not None:
        console.print(msg)


def predictor_paths(out_dir: Path, task: str, backend: str) -> dict[str, Path]:
    """Where `fit_predictors` keeps each dataset and predictor of `task` (latency per backend)."""
    return {
        "metric_data": out_dir / f"{task}-metric.json",
        "metric": out_dir / f"{task}-metric.safetensors",
        "latency_data": out_dir / f"{task}-latency-{backend}.json",
        "latency": out_dir / f"{task}-latency-{backend}.safetensors",
    }


def _same_machine(machine: dict[str, Any], backend: str) -> bool:
    """Whether timings taken on `machine` (its `machine_info()`) hold here: the same CPU model, and for
    the cuda backend the same GPU too (another GPU model, or a MIG slice of one, times differently)."""
    here = machine_info()
    keys = ("cpu", "gpu") if backend == "cuda" else ("cpu",)
    return all(machine.get(k) == here.get(k) for k in keys)


def _load_cached(path: Path, run: TrainedRun, want: dict[str, Any]) -> GPPredictor | None:
    """The predictor at `path` when its manifest matches `want`; None when absent or stale. A file
    fitted for another search space is refused with a SearchError (never silently refitted)."""
    if not path.is_file():
        return None
    try:
        if read_manifest(path).get("predictor_format") != PREDICTOR_FORMAT:
            return None  # written by an older UFO, whose predictors fit differently: fit again
        gp = GPPredictor.load(path, run.space)
    except CheckpointError:
        return None  # unreadable (an interrupted write of an older version): fit again
    meta = getattr(gp, "meta_", {})
    return gp if all(meta.get(k) == v for k, v in want.items()) else None


def _metric_predictor(
    run: TrainedRun, paths: dict[str, Path], n: int, seed: int, console: Console | None, progress: bool, refit: bool
) -> tuple[GPPredictor, dict[str, Any]]:
    want = {"model_digest": run.digest, "n": n, "seed": seed, "features": FEATURES, "target": run.metric}
    gp = None if refit else _load_cached(paths["metric"], run, want)
    if gp is not None:
        return gp, {**gp.meta_, "cached": True}
    ds = None
    if paths["metric_data"].is_file() and not refit:
        old = MetricDataset.load(paths["metric_data"])
        if old.model_digest == run.digest and old.seed == seed and len(old) == n and old.space == run.space:
            ds = old
    if ds is None:
        _say(console, f"evaluating {n} subnets of {run.run_dir} on {run.task} ({run.metric}, inherited weights)")
        ds = collect_metrics(run, n, seed, progress)
        ds.save(paths["metric_data"])
    gp, meta = fit_metric_predictor(ds, seed=seed)
    meta.update(seed=seed)
    gp.save(paths["metric"], run.space, meta)
    return gp, {**meta, "cached": False}


def _latency_predictor(
    run: TrainedRun,
    paths: dict[str, Path],
    backend: str,
    n: int,
    seed: int,
    threads: int,
    batch: int,
    console: Console | None,
    progress: bool,
    refit: bool,
) -> tuple[GPPredictor, dict[str, Any]]:
    want = {
        "backend": backend,
        "n": n,
        "seed": seed,
        "threads": threads,
        "batch": batch,
        "features": FEATURES,
        "routes": run.routes[run.task],
    }
    gp = None if refit else _load_cached(paths["latency"], run, want)
    if gp is not None and _same_machine(gp.meta_.get("machine", {}), backend):
        return gp, {**gp.meta_, "cached": True}  # timings of another CPU (or GPU) are not reused
    archs = sample_archs(run.space, run.task, n, seed, run.routes)
    ds = None
    if paths["latency_data"].is_file() and not refit:  # same subnets, settings and machine: reuse the timings
        old = LatencyDataset.load(paths["latency_data"])
        same = (old.backend, old.threads, old.batch, old.space, old.archs) == (
            backend,
            threads,
            batch,
            run.space,
            archs,
        )
        if same and _same_machine(old.machine, backend):
            ds = old
    if ds is None:
        _say(console, f"measuring {n} subnets of {run.task} on {backend} (batch {batch}, {threads} threads)")
        ds = collect(
            run.space, run.task, n, backend, seed, batch, threads, LATENCY_REPEATS, progress=progress, archs=archs
        )
        ds.save(paths["latency_data"])
    gp, meta = fit_latency_predictor(ds, seed=seed)
    meta.update(seed=seed, routes=run.routes[run.task])
    gp.save(paths["latency"], run.space, meta)
    return gp, {**meta, "cached": False}


def _summary(meta: dict[str, Any], data: Path, pred: Path) -> dict[str, Any]:
    cv = meta.get("cv") or {}
    return {
        "dataset": str(data),
        "predictor": str(pred),
        "n": meta.get("n"),
        "cached": meta["cached"],
        "cv_kendall_tau": cv.get("kendall_tau"),
        "cv_mape": cv.get("mape"),
    }


def _fit(
    run: TrainedRun,
    *,
    backend: str,
    metric_samples: int,
    latency_samples: int,
    seed: int,
    out_dir: Path,
    console: Console | None,
    latency: bool,
    threads: int,
    batch: int,
    progress: bool,
    refit: bool,
) -> tuple[dict[str, GPPredictor], dict[str, Any]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = predictor_paths(out_dir, run.task, backend)
    gps: dict[str, GPPredictor] = {}
    report: dict[str, Any] = {"task": run.task, "metric_name": run.metric, "backend": backend}
    gps["metric"], meta = _metric_predictor(run, paths, metric_samples, seed, console, progress, refit)
    report["metric"] = _summary(meta, paths["metric_data"], paths["metric"])
    if latency:
        gps["latency"], meta = _latency_predictor(
            run, paths, backend, latency_samples, seed, threads, batch, console, progress, refit
        )
        report["latency"] = _summary(meta, paths["latency_data"], paths["latency"])
    return gps, report


def fit_predictors(
    run_dir: str | Path,
    task: str,
    *,
    backend: str = "torch-cpu",
    metric_samples: int = 50,
    latency_samples: int = 100,
    seed: int = 0,
    out_dir: str | Path | None = None,
    console: Console | None = None,
    latency: bool = True,
    metric: bool = True,
    threads: int = DEFAULT_THREADS,
    batch: int = 1,
    data_root: str | None = None,
    progress: bool = True,
    refit: bool = False,
    device: str = "auto",
) -> dict[str, Any]:
    """Collect (or reuse) the data and fit (or reuse) the metric and latency predictors of `task`
    for a trained run; returns their paths and cross-validated Kendall tau / MAPE.

    Files go to `out_dir` (default RUN_DIR/predictors). With `metric=False` or `latency=False`
    that predictor is skipped. A cached predictor is reused when the run's weights (sha256), the
    search space, the sample count, seed and measurement settings match (and, for latency, the
    machine: its CPU model, and its GPU for the cuda backend); `refit` forces a new one. Subnet
    metrics are evaluated on `device` (as `train.device`; auto: the GPU when there is one).
    """
    if not (metric or latency):
        raise SearchError("fit_predictors: nothing to fit (metric=False and latency=False)")
    if latency:
        check_backend(backend)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "predictors"
    with run_lock(out):
        return _fit_predictors(
            run_dir,
            task,
            out,
            backend=backend,
            metric_samples=metric_samples,
            latency_samples=latency_samples,
            seed=seed,
            console=console,
            latency=latency,
            metric=metric,
            threads=threads,
            batch=batch,
            data_root=data_root,
            progress=progress,
            refit=refit,
            device=device,
        )


def _fit_predictors(
    run_dir: str | Path,
    task: str,
    out: Path,
    *,
    backend: str,
    metric_samples: int,
    latency_samples: int,
    seed: int,
    console: Console | None,
    latency: bool,
    metric: bool,
    threads: int,
    batch: int,
    data_root: str | None,
    progress: bool,
    refit: bool,
    device: str,
) -> dict[str, Any]:
    if not metric:  # latency needs only the space and the routes: no data, no evaluation
        run = TrainedRun(run_dir, task, data_root, with_data=False, device="cpu")
        out.mkdir(parents=True, exist_ok=True)
        paths = predictor_paths(out, task, backend)
        _, meta = _latency_predictor(
            run, paths, backend, latency_samples, seed, threads, batch, console, progress, refit
        )
        return {"task": task, "backend": backend, "latency": _summary(meta, paths["latency_data"], paths["latency"])}
    run = TrainedRun(run_dir, task, data_root, device=device)
    return _fit(
        run,
        backend=backend,
        metric_samples=metric_samples,
        latency_samples=latency_samples,
        seed=seed,
        out_dir=out,
        console=console,
        latency=latency,
        threads=threads,
        batch=batch,
        progress=progress,
        refit=refit,
    )[1]


# ----- search -----


class Candidate(BaseModel):
    """A subnet from the predicted front, with its predictions and what was measured."""

    model_config = ConfigDict(extra="forbid")

    arch: Arch
    params: int
    flops: int
    predicted_metric: float
    predicted_metric_std: float
    predicted_latency_ms: float | None = None
    measured_metric: float | None = None
    measured_latency: Latency | None = None
    meets_budget: bool | None = None
    budget_ms: float | None = None  # the latency budget it was judged against (a relative one is timed with it)
    source: str = "front"  # front | smallest
    front_index: int | None = None  # position on the predicted front (sorted by cost), for source "front"
    step: str = "spread"  # why it was measured: spread | bisect | refine | fallback (ufo.search.recheck)

    def measured(self) -> float:
        """The measured metric: set for every candidate once `_measure` has run."""
        assert self.measured_metric is not None, "the candidate has not been measured"
        return self.measured_metric


class SearchResult(BaseModel):
    """What `search_task` found: the chosen subnet (predicted and measured), the files written,
    the predicted Pareto front and every measured candidate."""

    model_config = ConfigDict(extra="forbid")

    run: str
    task: str
    metric: str
    backend: str
    budget: dict[str, float]  # max_latency_ms / max_params / max_flops given; a max_latency_fraction with the ms it
    # came to when the search started
    objective: str  # the cost minimised beside the metric: latency_ms, params or flops
    arch: Arch
    predicted_metric: float
    measured_metric: float
    predicted_latency_ms: float | None = None
    measured_latency_ms: float | None = None
    params: int
    flops: int
    model_path: str
    png_path: str
    json_path: str
    front: list[Point]
    candidates: list[Candidate]
    trials: int
    distinct_archs: int
    search_s: float  # NSGA-II on the predictors
    measure_s: float  # real evaluation and timing of the candidates
    total_s: float
    predictors: dict[str, Any] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)  # quality flags (`ufo.flags`): a poorly ranking predictor
    latency_speed: float | None = None  # predicted latencies were scaled by this: the machine's speed now vs then


def _check_budgets(
    max_latency_ms: float | None,
    max_params: float | None,
    max_flops: float | None,
    backend: str,
    max_latency_fraction: float | None = None,
) -> dict[str, float]:
    budget = {
        k: float(v)
        for k, v in (("max_latency_ms", max_latency_ms), ("max_params", max_params), ("max_flops", max_flops))
        if v is not None
    }
    if not budget and max_latency_fraction is None:
        raise SearchError(
            "give a budget: max_latency_ms or max_latency_fraction (with a backend), max_params or max_flops"
        )
    for k, v in budget.items():
        if not v > 0:
            raise SearchError(f"{k}={v:g}: a budget must be positive")
    if max_latency_fraction is not None:
        if "max_latency_ms" in budget:
            raise SearchError("max_latency_ms and max_latency_fraction are exclusive: give one latency budget")
        if not 0 <= max_latency_fraction <= 1:
            raise SearchError(f"max_latency_fraction must lie in [0, 1], got {max_latency_fraction:g}")
        budget["max_latency_fraction"] = float(max_latency_fraction)
    if backend not in BACKENDS:
        raise SearchError(f"unknown latency backend {backend!r}; available backends: {', '.join(BACKENDS)}")
    if "max_latency_ms" in budget or "max_latency_fraction" in budget:
        check_backend(backend)
    return budget


def _check_feasible(run: TrainedRun, budget: dict[str, float]) -> Arch:
    """The run's smallest subnet for the task; SearchError when even it exceeds a size budget."""
    small = run.arch(run.space.smallest(run.routes))
    for key, what, value in (
        ("max_params", "parameters", run.space.num_params(small, run.task)),
        ("max_flops", "FLOPs", run.space.flops(small, run.task)),
    ):
        if key in budget and value > budget[key]:
            raise SearchError(
                f"{key.replace('_', '-')} {budget[key]:,.0f} is impossible: no subnet of task "
                f"{run.task!r} meets it; the smallest subnet has {value:,} {what}"
            )
    return small


def _measure(
    run: TrainedRun,
    cands: list[Candidate],
    budget: dict[str, float],
    backend: str,
    threads: int,
    batch: int,
    repeats: int,
    seed: int,
    progress: bool,
    anchors: list[Arch],
) -> None:
    """Evaluate (inherited weights) and, under a latency budget, time every candidate; set meets_budget.

    A latency budget is met when the median of the timed calls is within it: the one statistic
    the budget, the table, the plot and `measured_latency_ms` all use. A relative budget
    (`max_latency_fraction`) is timed again with every measurement: the smallest and the largest
    subnet (`anchors`) run in the same interleaved rounds as the candidates, so a change in the
    machine's speed between two measurements moves the budget with the candidates."""
    for c, m in zip(
        cands, run.evaluate_many([c.arch for c in cands], progress and len(cands) > 1, "evaluate candidates")
    ):
        c.measured_metric = m[run.metric]
    if "max_latency_ms" in budget:
        relative = "max_latency_fraction" in budget
        timed = [*anchors, *(c.arch for c in cands)] if relative else [c.arch for c in cands]
        lats = measure_many(
            run.space, timed, run.task, backend, seed, batch, threads, repeats, progress=progress and len(cands) > 1
        )
        limit = (
            fraction_budget(lats[0], lats[1], budget["max_latency_fraction"]) if relative else budget["max_latency_ms"]
        )
        for c, lat in zip(cands, lats[len(timed) - len(cands) :]):
            c.measured_latency, c.budget_ms = lat, limit
    for c in cands:
        ok = [c.params <= budget.get("max_params", np.inf), c.flops <= budget.get("max_flops", np.inf)]
        if c.measured_latency is not None and c.budget_ms is not None:
            ok.append(c.measured_latency.median_ms <= c.budget_ms)
        c.meets_budget = all(ok)


def _recheck(
    run: TrainedRun,
    front: list[Point],
    small: Arch,
    score: Any,
    budget: dict[str, float],
    use_lat: bool,
    top_k: int,
    console: Console | None,
    **measure_kw: Any,
) -> list[Candidate]:
    """Measure `top_k` subnets of the predicted front (`ufo.search.recheck.walk_front`: spread over
    the cost range, bisection on cost down to the budget's edge, refinement around the best), and
    the smallest subnet only when every front point measured is over the budget."""
    cands: dict[int, Candidate] = {}

    def measure(idx: list[int]) -> list[Measured]:
        new = [
            _candidate(
                run, front[i].arch, front[i].metric, front[i].metric_std, front[i].cost if use_lat else None, "front", i
            )
            for i in idx
        ]
        _measure(run, new, budget, **measure_kw)
        cands.update(zip(idx, new))
        return [Measured(bool(c.meets_budget), float(c.measured())) for c in new]

    order = walk_front([p.cost for p in front], top_k, measure)
    out = []
    for i, step in order:
        cands[i].step = step
        out.append(cands[i])
    if not any(c.meets_budget for c in out) and all(c.arch != small for c in out):
        _say(console, "every measured subnet of the predicted front is over the budget: measuring the smallest")
        mu, sd, c_small, _ = score([small])
        fallback = _candidate(run, small, mu[0], sd[0], c_small[0] if use_lat else None, "smallest")
        fallback.step = "fallback"
        _measure(run, [fallback], budget, **measure_kw)
        out.append(fallback)
    return out


@locks("out_dir")
def search_task(
    run_dir: str | Path,
    task: str,
    *,
    max_latency_ms: float | None = None,
    max_latency_fraction: float | None = None,
    max_params: float | None = None,
    max_flops: float | None = None,
    backend: str = "torch-cpu",
    out_dir: str | Path,
    trials: int = 2000,
    top_k: int = 8,
    seed: int = 0,
    console: Console | None = None,
    metric_samples: int = 50,
    latency_samples: int = 100,
    threads: int = DEFAULT_THREADS,
    batch: int = 1,
    repeats: int = LATENCY_REPEATS,
    population: int = 50,
    predictor_dir: str | Path | None = None,
    data_root: str | None = None,
    progress: bool = True,
    device: str = "auto",
) -> SearchResult:
    """Best subnet of `task` in a trained run under a latency (on `backend`), parameter or FLOP
    budget; see the module docstring. Predictors are fitted on first use and cached in
    `predictor_dir` (default RUN_DIR/predictors).

    `max_latency_fraction` is a latency budget relative to this machine: that fraction of the way
    from the smallest subnet's latency (its upper quartile + 5%) to the largest's, timed together
    with every measurement of candidates (`ufo.search.latency.fraction_budget`). Subnet metrics are
    evaluated on `device` (as `train.device`; auto: the GPU when there is one)."""
    t_start = time.perf_counter()
    require("optuna")  # NSGA-II needs the [search] extra: say so before any work
    budget = _check_budgets(max_latency_ms, max_params, max_flops, backend, max_latency_fraction)
    if trials < 1 or top_k < 1:
        raise SearchError(f"trials={trials}, top_k={top_k}: both must be at least 1")
    out = Path(out_dir)
    run = TrainedRun(run_dir, task, data_root, device=device)
    small = _check_feasible(run, budget)
    anchors = [small, run.arch(run.space.largest(run.routes))]
    use_lat = "max_latency_ms" in budget or "max_latency_fraction" in budget
    if use_lat:  # the smallest and the largest subnet timed now: the machine's speed, and a relative budget
        lo, hi = measure_many(run.space, anchors, task, backend, seed, batch, threads, repeats, progress=False)
        if "max_latency_fraction" in budget:
            budget["max_latency_ms"] = fraction_budget(lo, hi, budget["max_latency_fraction"])
            _say(
                console,
                f"max_latency_fraction {budget['max_latency_fraction']:g} -> {budget['max_latency_ms']:.3f} "
                f"ms on {backend} now (smallest {lo.median_ms:.3f} ms, largest {hi.median_ms:.3f} ms); "
                "timed again with every measurement",
            )
        elif lo.median_ms > budget["max_latency_ms"]:
            raise InfeasibleBudget(
                f"max-latency-ms {budget['max_latency_ms']:g} is impossible on {backend}: no subnet "
                f"of task {task!r} meets it; the smallest subnet measures {lo.median_ms:.3f} ms "
                f"(median of {lo.n} calls, batch {batch}, {threads} threads)",
                lo.median_ms,
            )
    gps, report = _fit(
        run,
        backend=backend,
        metric_samples=metric_samples,
        latency_samples=latency_samples,
        seed=seed,
        out_dir=Path(predictor_dir) if predictor_dir else run.run_dir / "predictors",
        console=console,
        latency=use_lat,
        threads=threads,
        batch=batch,
        progress=progress,
        refit=False,
    )
    m = report["metric"]
    warnings = [w for w in [predictor_flag(task, m["cv_kendall_tau"], m["n"])] if w]
    space = run.space
    objective = "latency_ms" if use_lat else "flops" if "max_flops" in budget else "params"
    speed = None
    if use_lat:  # the predictor learnt the machine's speed when its data was timed; scale it to today's
        p_lo, p_hi = gps["latency"].predict(arch_features(space, anchors, task))
        speed = float((lo.median_ms + hi.median_ms) / (p_lo + p_hi))
    limits = {k: v for k, v in budget.items() if k != "max_latency_fraction"}

    def score(archs: list[Arch]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        X = arch_features(space, archs, task)
        mu, sd = gps["metric"].predict(X, return_std=True)
        costs = {
            "params": np.array([space.num_params(a, task) for a in archs], dtype=np.float64),
            "flops": np.array([space.flops(a, task) for a in archs], dtype=np.float64),
        }
        if use_lat:
            costs["latency_ms"] = gps["latency"].predict(X) * speed
        cons = np.stack([costs[k.removeprefix("max_")] - v for k, v in limits.items()], axis=1)
        return mu, sd, costs[objective], cons

    points, search_s = nsga2_search(space, task, run.routes[task], score, trials, population, seed)
    front = pareto_front(points)
    _say(
        console,
        f"NSGA-II: {trials} trials, {len(points)} distinct subnets, {len(front)} on the predicted front "
        f"({search_s:.1f} s)",
    )
    t_measure = time.perf_counter()
    cands = _recheck(
        run,
        front,
        small,
        score,
        budget,
        use_lat,
        top_k,
        console,
        backend=backend,
        threads=threads,
        batch=batch,
        repeats=repeats,
        seed=seed,
        progress=progress,
        anchors=anchors,
    )
    measure_s = time.perf_counter() - t_measure
    ok = [c for c in cands if c.meets_budget]
    if not ok:
        lowest = min(cands, key=lambda c: c.measured_latency.median_ms if c.measured_latency else np.inf)
        raise InfeasibleBudget(
            f"no measured candidate meets the budget {budget} (lowest measured: "
            f"{lowest.measured_latency}); the machine may be loaded: try again or raise the budget",
            lowest.measured_latency.median_ms if lowest.measured_latency else float("inf"),
        )
    chosen = max(ok, key=lambda c: (c.measured_metric, -c.params))
    out.mkdir(parents=True, exist_ok=True)
    model_path = _save_model(run, chosen.arch, out / "model.safetensors")
    result = SearchResult(
        run=str(run.run_dir),
        task=task,
        metric=run.metric,
        backend=backend,
        budget=budget,
        objective=objective,
        arch=chosen.arch,
        predicted_metric=chosen.predicted_metric,
        measured_metric=float(chosen.measured()),
        predicted_latency_ms=chosen.predicted_latency_ms,
        measured_latency_ms=chosen.measured_latency.median_ms if chosen.measured_latency else None,
        params=chosen.params,
        flops=chosen.flops,
        model_path=str(model_path),
        png_path=str(out / "pareto.png"),
        json_path=str(out / "search.json"),
        front=front,
        candidates=cands,
        trials=trials,
        distinct_archs=len(points),
        search_s=round(search_s, 3),
        measure_s=round(measure_s, 3),
        total_s=round(time.perf_counter() - t_start, 3),
        predictors=report,
        warnings=warnings,
        latency_speed=speed,
    )
    from ufo.search.plot import plot_search

    plot_search(result, points, out / "pareto.png")
    atomic_write_text(out / "search.json", result.model_dump_json(indent=1) + "\n")
    return result


def _candidate(
    run: TrainedRun,
    arch: Arch,
    metric: float,
    std: float,
    latency: float | None,
    source: str,
    front_index: int | None = None,
) -> Candidate:
    return Candidate(
        arch=arch,
        params=run.space.num_params(arch, run.task),
        flops=run.space.flops(arch, run.task),
        predicted_metric=float(metric),
        predicted_metric_std=float(std),
        predicted_latency_ms=None if latency is None else float(latency),
        source=source,
        front_index=front_index,
    )


def _save_model(run: TrainedRun, arch: Arch, path: Path) -> Path:
    """Extract `arch`'s path for the task as a task model (class names, calibrated threshold) and save it."""
    from ufo.taskmodel import extract_task_model, save_task_model

    assert run.data is not None  # a search loads its run with the data (it evaluates the candidates)
    run.model.cpu()  # the search is over: the task model is cut and calibrated on the CPU, as it is saved
    tm = extract_task_model(run.model, arch, [run.task], run.cfg, {run.task: run.data}, source=str(run.run_dir))
    save_task_model(path, tm)
    return path


def result_summary(r: SearchResult) -> dict[str, Any]:
    """A short JSON-able digest of a search (for command output and reports)."""
    return json.loads(
        r.model_dump_json(
            include={
                "task",
                "metric",
                "budget",
                "predicted_metric",
                "measured_metric",
                "predicted_latency_ms",
                "measured_latency_ms",
                "params",
                "flops",
                "model_path",
                "search_s",
                "measure_s",
                "total_s",
                "warnings",
            }
        )
    )
