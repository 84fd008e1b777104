"""bench/search.py's trust checks (issue 22): the metric predictor against ridge regression and a
parameter-count ranking at several training sizes, and demo-shaped `ufo run`s repeated from
scratch, each search's choice judged against every subnet of its predicted front (and a random
pool) measured independently.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from sklearn.linear_model import RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ufo.arch import Arch
from ufo.config import load_config, parse_config
from ufo.search.features import LOG_PARAMS
from ufo.search.latency import fraction_budget, measure_many
from ufo.search.metric import MetricDataset, MetricRecord, TrainedRun, metric_estimator
from ufo.search.predictor import kendall_tau

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "src" / "ufo" / "configs" / "demo.yaml"


# ----- predictor against ridge and parameter count -----


def ridge() -> Any:
    """The linear baseline: ridge regression on the standardised features, alpha by leave-one-out CV."""
    return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))


def predictor_comparison(
    run: TrainedRun, n_pool: int, sizes: list[int], n_test: int, repeats: int, out: Path
) -> dict[str, Any]:
    """Evaluate `n_pool` subnets of `run` once; then for each training size and `repeats` seeded
    splits (the same `n_test` held-out subnets per split for every method), Kendall tau on the
    held-out subnets of: the GP predictor as `ufo search` fits it (`metric_estimator`), ridge
    regression on the same features, and the ranking by parameter count. Fit times too."""
    archs = run.sample(n_pool, seed=11)
    t0 = time.perf_counter()
    ms = run.evaluate_many(archs, description=f"evaluate {n_pool} subnets ({run.metric})")
    eval_s = time.perf_counter() - t0
    y = np.array([m[run.metric] for m in ms])
    ds = MetricDataset(
        space=run.space,
        task=run.task,
        metric=run.metric,
        run=str(run.run_dir),
        model_digest=run.digest,
        records=[MetricRecord(arch=a, value=v) for a, v in zip(archs, y)],
    )
    ds.save(out / "predictor-pool.json")
    X = ds.features()
    rows: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for n in sizes:
        taus: dict[str, list[float]] = {"gp": [], "ridge": [], "params": []}
        fit_s: list[float] = []
        for _ in range(repeats):
            perm = rng.permutation(len(y))
            tr, te = perm[:n], perm[len(y) - n_test :]
            est = metric_estimator(y[tr], seed=0)  # what `ufo search` fits on its metric data
            t0 = time.perf_counter()
            est.fit(X[tr], y[tr])
            fit_s.append(time.perf_counter() - t0)
            taus["gp"].append(kendall_tau(y[te], est.predict(X[te])))
            taus["ridge"].append(kendall_tau(y[te], ridge().fit(X[tr], y[tr]).predict(X[te])))
            taus["params"].append(kendall_tau(y[te], X[te, LOG_PARAMS]))
        rows[str(n)] = {
            "kendall_tau": {k: float(np.mean(v)) for k, v in taus.items()},
            "kendall_tau_sd": {k: float(np.std(v)) for k, v in taus.items()},
            "gp_fit_s_median": float(np.median(fit_s)),
            "gp_fit_s_max": float(np.max(fit_s)),
        }
        print(
            f"   n={n}: tau GP {rows[str(n)]['kendall_tau']['gp']:.3f}, ridge "
            f"{rows[str(n)]['kendall_tau']['ridge']:.3f}, params {rows[str(n)]['kendall_tau']['params']:.3f}; "
            f"GP fit {rows[str(n)]['gp_fit_s_median']:.2f} s"
        )
    return {
        "subnets": n_pool,
        "features": int(X.shape[1]),
        "n_test": n_test,
        "repeats": repeats,
        "metric_range": [float(y.min()), float(y.max())],
        "eval_s": round(eval_s, 1),
        "sizes": rows,
    }


# ----- demo-shaped runs, each search judged against its whole front -----


def demo_config(seed: int, pipeline_overrides: list[str]) -> Any:
    """The built-in demo config (the `make demo` shape) with its seed set and no single-task baselines
    (they do not feed the search)."""
    extra = [f"seed={seed}", "pipeline.baselines.enabled=false", *pipeline_overrides]
    d = load_config(DEMO_CONFIG, extra).model_dump(mode="json")
    d["name"] = f"demo-seed{seed}"
    return parse_config(d, f"{DEMO_CONFIG} (seed {seed})")


def judge_search(run_dir: Path, task: str, pool: int, seed: int, repeats: int) -> dict[str, Any]:
    """The search's choice for `task` against every subnet of its predicted front plus `pool` random
    subnets, all evaluated afresh and, under a latency budget, timed afresh together in interleaved
    rounds (median, batch 1, 1 thread: the search's own settings; a relative budget timed again in
    the same rounds). `gap` is the best measured metric
    among those that meet the budget minus the chosen subnet's measured metric."""
    from ufo.search.pipeline import SearchResult

    res = SearchResult.model_validate_json((run_dir / "search" / task / "search.json").read_text())
    run = TrainedRun(run_dir / "chip_supernet", task)
    seen: dict[str, Arch] = {}
    for a in [res.arch, *(p.arch for p in res.front), *run.sample(pool, seed=100 + seed)]:
        seen.setdefault(a.model_dump_json(), run.arch(a))
    archs = list(seen.values())
    metric = np.array([m[run.metric] for m in run.evaluate_many(archs, progress=False)])
    space, b = run.space, res.budget
    ok = np.array(
        [
            space.num_params(a, task) <= b.get("max_params", np.inf)
            and space.flops(a, task) <= b.get("max_flops", np.inf)
            for a in archs
        ]
    )
    lat = None
    if "max_latency_ms" in b:  # a relative budget is timed again with the judged subnets, as the search does
        anchors = [run.arch(space.smallest(run.routes)), run.arch(space.largest(run.routes))]
        timed = measure_many(space, [*anchors, *archs], task, res.backend, seed, 1, 1, repeats, progress=False)
        limit = (
            fraction_budget(timed[0], timed[1], b["max_latency_fraction"])
            if "max_latency_fraction" in b
            else b["max_latency_ms"]
        )
        lat = np.array([x.median_ms for x in timed[2:]])
        ok &= lat <= limit
    best = int(np.argmax(np.where(ok, metric, -np.inf))) if ok.any() else None
    chosen = next(c for c in res.candidates if c.arch == res.arch)
    row = {
        "budget": b,
        "chosen_metric": float(metric[0]),
        "chosen_metric_in_search": res.measured_metric,
        "chosen_step": chosen.step,
        "chosen_meets_budget_again": bool(ok[0]),
        "chosen_latency_ms_again": None if lat is None else float(lat[0]),
        "measured_in_search": len(res.candidates),
        "front_size": len(res.front),
        "judged": len(archs),
        "judged_meeting_budget": int(ok.sum()),
        "best_metric": None if best is None else float(metric[best]),
        "best_on_front": best is not None and list(seen)[best] in {p.arch.model_dump_json() for p in res.front},
        "gap": None if best is None else float(metric[best] - metric[0]),
        "fell_back_to_smallest": any(c.step == "fallback" for c in res.candidates),
    }
    return row


def demo_runs(work: Path, runs: int, pool: int, repeats: int, overrides: list[str]) -> dict[str, Any]:
    """`runs` demo-shaped `ufo run`s (seeds 0..runs-1, from scratch, through the search stage), each
    task's search judged by `judge_search`."""
    from ufo.run import run_pipeline

    out: dict[str, Any] = {}
    for seed in range(runs):
        cfg = demo_config(seed, overrides)
        run_dir = work / f"demo-seed{seed}"
        t0 = time.perf_counter()
        print(f"== demo-shaped run, seed {seed}: all_in_one .. search")
        run_pipeline(cfg, run_dir, until="search", console=Console(quiet=True))
        run_s = time.perf_counter() - t0
        tasks = {t: judge_search(run_dir, t, pool, seed, repeats) for t in cfg.tasks}
        for t, r in tasks.items():
            print(
                f"   {t}: chosen {r['chosen_metric']:.4f} ({r['chosen_step']}), best meeting the budget "
                f"{r['best_metric']}, gap {r['gap']}; measured {r['measured_in_search']} of a front of "
                f"{r['front_size']}"
            )
        out[f"seed{seed}"] = {
            "run_s": round(run_s, 1),
            "tasks": tasks,
            "predictors": json.loads((run_dir / "predictors" / "predictors.json").read_text()),
        }
    return out


def trust_plot(pc: dict[str, Any], runs: dict[str, Any], path: Path) -> None:
    """Left: held-out Kendall tau against training size for the GP, ridge and parameter count.
    Right: per demo run and task, the chosen subnet's measured metric against the best measured one
    that meets the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    sizes = sorted(int(k) for k in pc["sizes"])
    for key, label, style in (
        ("gp", "GP predictor (ufo search)", "-o"),
        ("ridge", "ridge regression", "--s"),
        ("params", "parameter count", ":^"),
    ):
        mean = [pc["sizes"][str(n)]["kendall_tau"][key] for n in sizes]
        sd = [pc["sizes"][str(n)]["kendall_tau_sd"][key] for n in sizes]
        ax[0].errorbar(sizes, mean, yerr=sd, fmt=style, capsize=3, label=label)
    ax[0].set_xscale("log")
    ax[0].minorticks_off()
    ax[0].set_xticks(sizes, [str(n) for n in sizes])
    ax[0].set_xlabel("subnets the predictor is fitted on")
    ax[0].set_ylabel(f"Kendall tau, {pc['n_test']} held-out subnets")
    ax[0].set_title(f"metric predictors, {pc['features']} features ({pc['repeats']} splits per size)", fontsize=10)
    ax[0].legend(fontsize=8)
    tasks = sorted({t for r in runs.values() for t in r["tasks"]})
    for j, t in enumerate(tasks):
        xs = [r["tasks"][t]["best_metric"] for r in runs.values() if t in r["tasks"]]
        ys = [r["tasks"][t]["chosen_metric"] for r in runs.values() if t in r["tasks"]]
        ax[1].scatter(xs, ys, s=30, label=t, marker="os^"[j % 3])
    lo = min(min(r["tasks"][t]["chosen_metric"] for t in r["tasks"]) for r in runs.values()) - 0.02
    hi = max(max((r["tasks"][t]["best_metric"] or 0) for t in r["tasks"]) for r in runs.values()) + 0.02
    ax[1].plot([lo, hi], [lo, hi], "k-", lw=1)
    ax[1].plot([lo, hi], [lo - 0.01, hi - 0.01], "k--", lw=1, label="1 point below")
    ax[1].set_xlabel("best measured metric meeting the budget (front + random pool)")
    ax[1].set_ylabel("chosen subnet's measured metric")
    ax[1].set_title(f"{len(runs)} demo-shaped runs from scratch: what the search chose", fontsize=10)
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
