"""Predict and search on a tiny trained chip supernet: budgets met (exactly for params/FLOPs, when
re-measured for latency), impossible budgets, unknown backend, a predictor of another space,
the saved task model, cached predictors, the Pareto front and the commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import tiny_space
from ufo.arch import Arch
from ufo.config import parse_config
from ufo.errors import ConfigError, SearchError
from ufo.evaluation.protocol import evaluate_tasks
from ufo.search.features import arch_features
from ufo.search.metric import TrainedRun
from ufo.search.optimize import Point, nsga2_search, pareto_front
from ufo.search.pipeline import fit_predictors, search_task
from ufo.search.predictor import GPPredictor
from ufo.taskmodel import load_task_model
from ufo.train.loop import Trainer

TASK = "digits"
TINY = {
    "name": "tiny-search",
    "seed": 3,
    "model": {
        "img_size": 16,
        "patch_size": 4,
        "head_dim": 8,
        "depth": [1, 2],
        "embed_dim": [16, 24],
        "num_heads": [1, 2],
        "mlp_ratio": [1.0, 2.0],
        "drop_path_rate": 0.0,
    },
    "tasks": {TASK: {"kind": "classification", "data": {"recipe": "digits"}}},
    "train": {
        "stage": "chip_supernet",
        "steps": 60,
        "batch_size": 32,
        "log_every": 50,
        "ckpt_every": 100,
        "warmup_steps": 5,
        "threads": 1,
        "lr": 3e-3,
    },
    "chip_supernet": {"num_random": 1},
}
FAST = {"trials": 150, "top_k": 3, "metric_samples": 12, "latency_samples": 10, "repeats": 15, "progress": False}


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("search-run")
    Trainer(parse_config(TINY), out, show_progress=False).fit()
    return out


@pytest.fixture(scope="session")
def run(run_dir) -> TrainedRun:
    return TrainedRun(run_dir, TASK)


@pytest.fixture(scope="session")
def params_search(run_dir, tmp_path_factory):
    space = TrainedRun(run_dir, TASK, with_data=False).space
    lo, hi = space.num_params(space.smallest(), TASK), space.num_params(space.largest(), TASK)
    budget = int(np.sqrt(lo * hi))
    return budget, search_task(run_dir, TASK, max_params=budget, out_dir=tmp_path_factory.mktemp("s-params"), **FAST)


def test_subnet_metric_is_the_eval_protocol_with_inherited_weights(run):
    a = run.sample(3, seed=4)[2]
    got = run.evaluate(a)
    run.model.set_arch(run.arch(a))
    want = evaluate_tasks(run.model, {TASK: run.data}, run.cfg, [TASK])[TASK]
    assert got == pytest.approx(want)


def test_params_search_meets_the_budget_exactly(params_search, run):
    budget, r = params_search
    assert r.params <= budget and run.space.num_params(r.arch, TASK) == r.params
    kept = [c for c in r.candidates if c.meets_budget]
    assert r.arch in [c.arch for c in kept]
    assert all(run.space.num_params(c.arch, TASK) <= budget for c in kept)
    assert all(p.feasible and p.cost <= budget for p in r.front)
    assert r.measured_metric == max(c.measured_metric for c in kept)
    assert 0.0 <= r.measured_metric <= 1.0 and r.metric == "top1"
    doc = json.loads(Path(r.json_path).read_text())
    assert Arch.model_validate(doc["arch"]) == r.arch and len(doc["front"]) == len(r.front)
    assert Path(r.png_path).stat().st_size > 10_000


def test_saved_subnet_is_a_task_model_equal_to_the_supernet_at_that_arch(params_search, run):
    _, r = params_search
    tm = load_task_model(r.model_path)
    assert tm.tasks == [TASK] and tm.info.arch == r.arch
    assert run.space.num_params(r.arch, TASK) == sum(p.numel() for p in tm.backbone.parameters())
    x = torch.randn(4, 3, 16, 16)
    run.model.set_arch(r.arch)
    with torch.no_grad():
        assert torch.allclose(tm(x, TASK), run.model(x, TASK), atol=1e-5)


def test_second_search_reuses_the_cached_predictors(params_search, run_dir, tmp_path):
    assert params_search is not None  # the first search fitted and cached the metric predictor
    r = search_task(run_dir, TASK, max_flops=10**9, out_dir=tmp_path, **FAST)
    assert r.predictors["metric"]["cached"] is True
    assert r.predictors["metric"]["predictor"] == str(run_dir / "predictors" / f"{TASK}-metric.safetensors")


def test_latency_search_result_meets_the_budget_when_re_measured(run_dir, run, tmp_path):
    # A relative budget: the smallest and the largest subnet are timed with every measurement, so
    # a change in the machine's load between timings moves the budget with the candidates.
    from ufo.search.latency import fraction_budget, measure_many

    r = search_task(run_dir, TASK, max_latency_fraction=0.5, backend="torch-cpu", out_dir=tmp_path, **FAST)
    assert r.budget["max_latency_fraction"] == 0.5 and r.budget["max_latency_ms"] > 0 and r.latency_speed > 0
    assert r.measured_latency_ms is not None and r.predicted_latency_ms is not None
    assert all(c.measured_latency is not None and c.budget_ms is not None for c in r.candidates)
    # one statistic: a candidate meets the budget by its median, which is also what the result reports
    assert all((c.measured_latency.median_ms <= c.budget_ms) == c.meets_budget for c in r.candidates)
    chosen = next(c for c in r.candidates if c.arch == r.arch)
    assert chosen.meets_budget and r.measured_latency_ms == chosen.measured_latency.median_ms
    # timed again with the two anchors: a burst of other jobs' load can inflate one re-measurement,
    # and the chosen subnet can sit at the budget's edge, so three tries and the re-test noise of
    # batch-1 timings of tiny subnets (bench/search: about 10%)
    small, large = run.arch(run.space.smallest(run.routes)), run.arch(run.space.largest(run.routes))
    again = []
    for _ in range(3):
        lo, hi, lat = measure_many(run.space, [small, large, r.arch], TASK, repeats=30, progress=False)
        again.append(lat.median_ms / fraction_budget(lo, hi, 0.5))
    assert min(again) <= 1.1, again
    assert (run_dir / "predictors" / f"{TASK}-latency-torch-cpu.safetensors").is_file()


@pytest.mark.parametrize(
    "budget, pattern",
    [
        ({"max_params": 100}, r"smallest subnet has 2,264 parameters"),
        ({"max_flops": 1000}, r"smallest subnet has 68,\d{3} FLOPs"),
        ({"max_latency_ms": 1e-4}, r"smallest subnet measures \d+\.\d+ ms"),
    ],
)
def test_impossible_budget_names_the_smallest_achievable_value(run_dir, tmp_path, budget, pattern):
    with pytest.raises(SearchError, match=pattern):
        search_task(run_dir, TASK, out_dir=tmp_path, **budget, **FAST)
    assert not (tmp_path / "model.safetensors").exists()


def test_unknown_backend_and_missing_budget(run_dir, tmp_path):
    with pytest.raises(
        SearchError, match="unknown latency backend 'tpu'; available backends: torch-cpu, ort-cpu, cuda"
    ):
        search_task(run_dir, TASK, max_latency_ms=1.0, backend="tpu", out_dir=tmp_path, **FAST)
    with pytest.raises(SearchError, match="give a budget"):
        search_task(run_dir, TASK, out_dir=tmp_path, **FAST)
    with pytest.raises(SearchError, match="exclusive"):
        search_task(run_dir, TASK, max_latency_ms=1.0, max_latency_fraction=0.5, out_dir=tmp_path, **FAST)
    with pytest.raises(SearchError, match=r"\[0, 1\], got 1.5"):
        search_task(run_dir, TASK, max_latency_fraction=1.5, out_dir=tmp_path, **FAST)
    with pytest.raises(SearchError, match="unknown task 'faces'"):
        search_task(run_dir, "faces", max_params=10**6, out_dir=tmp_path, **FAST)


def test_a_predictor_of_another_space_is_refused(run_dir, tmp_path):
    other = tiny_space(tasks=[TASK])
    rng = np.random.default_rng(0)
    X = np.stack([other.encode(other.sample(rng), [TASK]) for _ in range(8)])
    pred_dir = tmp_path / "predictors"
    pred_dir.mkdir()
    GPPredictor(n_restarts=0).fit(X, rng.random(8)).save(pred_dir / f"{TASK}-metric.safetensors", other)
    with pytest.raises(SearchError, match="another search space"):
        search_task(run_dir, TASK, max_params=10**6, out_dir=tmp_path / "out", predictor_dir=pred_dir, **FAST)


def test_pareto_front_and_nsga2_respect_the_constraint():
    a = Arch(depth=1, embed_dim=16, num_heads=[1], mlp_ratio=[1.0])
    pts = [
        Point(arch=a, metric=m, metric_std=0, cost=c, feasible=f, trial=i)
        for i, (m, c, f) in enumerate([(0.5, 1, True), (0.4, 2, True), (0.7, 3, True), (0.9, 5, False), (0.7, 4, True)])
    ]
    assert [(p.metric, p.cost) for p in pareto_front(pts)] == [(0.5, 1), (0.7, 3)]
    space = tiny_space(tasks=[TASK])

    def score(archs):  # bigger is better, budget on params
        n = np.array([space.num_params(x, TASK) for x in archs], dtype=float)
        return np.log(n), np.zeros(len(n)), n, (n - 3000)[:, None]

    points, _ = nsga2_search(space, TASK, ["shared"] * 3, score, trials=200, population=20, seed=1)
    front = pareto_front(points)
    assert front and all(space.num_params(p.arch, TASK) <= 3000 for p in front)
    assert all(p.feasible == (space.num_params(p.arch, TASK) <= 3000) for p in points)
    assert max(p.metric for p in points if p.feasible) == front[-1].metric


def test_commands_predictor_fit_and_search(run_dir, tmp_path):
    from ufo.cli import app

    cli = CliRunner()
    r = cli.invoke(app, ["predictor", "fit", str(run_dir), "--task", TASK, "--metric", "--samples", "12"])
    assert r.exit_code == 0, r.output
    assert "Kendall tau" in r.output and (run_dir / "predictors" / f"{TASK}-metric.safetensors").is_file()
    r = cli.invoke(
        app,
        [
            "search",
            str(run_dir),
            "--task",
            TASK,
            "--max-params",
            "5000",
            "--out",
            str(tmp_path / "s"),
            "--trials",
            "100",
            "--top-k",
            "2",
            "--metric-samples",
            "12",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s" / "model.safetensors").is_file() and "chose depth" in r.output
    r = cli.invoke(app, ["search", str(run_dir), "--task", TASK, "--max-params", "10", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "smallest subnet has" in r.output
    r = cli.invoke(
        app,
        [
            "search",
            str(run_dir),
            "--task",
            TASK,
            "--max-latency-fraction",
            "0.5",
            "--out",
            str(tmp_path / "f"),
            "--trials",
            "100",
            "--top-k",
            "2",
            "--metric-samples",
            "12",
            "--latency-samples",
            "10",
        ],
    )
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "max_latency_fraction 0.5 ->" in out and "(median)" in out and "chose depth" in out


def test_fit_predictors_reports_cross_validation_and_caches(run_dir):
    # the same settings as the searches above: when they ran first, everything here is reused
    r = fit_predictors(run_dir, TASK, metric_samples=12, latency_samples=10, progress=False)
    assert r["metric"]["n"] == 12 and r["latency"]["n"] == 10
    assert -1.0 <= r["latency"]["cv_kendall_tau"] <= 1.0 and r["latency"]["cv_mape"] > 0
    assert r["metric"]["dataset"] == str(run_dir / "predictors" / f"{TASK}-metric.json")
    again = fit_predictors(run_dir, TASK, metric_samples=12, latency_samples=10, progress=False)
    assert again["metric"]["cached"] and again["latency"]["cached"]
    refit = fit_predictors(run_dir, TASK, metric_samples=12, latency_samples=10, progress=False, latency=False, seed=1)
    assert not refit["metric"]["cached"] and "latency" not in refit


def test_latency_at_fraction_floors_at_the_smallest_and_rejects_bad_fractions(run):
    from ufo.search.latency import latency_at_fraction

    small, large = run.arch(run.space.smallest(run.routes)), run.arch(run.space.largest(run.routes))
    ms0, lo, hi = latency_at_fraction(run.space, small, large, TASK, 0.0, repeats=5)
    assert ms0 == pytest.approx(1.05 * lo.q3_ms)  # fraction 0 still admits the smallest subnet
    ms1, lo, hi = latency_at_fraction(run.space, small, large, TASK, 1.0, repeats=5)
    assert ms1 == pytest.approx(max(1.05 * lo.q3_ms, hi.median_ms))
    with pytest.raises(SearchError, match=r"\[0, 1\], got 1.5"):
        latency_at_fraction(run.space, small, large, TASK, 1.5)


def test_an_optimistic_latency_predictor_walks_down_the_front_instead_of_falling_back(
    run_dir, run, tmp_path, monkeypatch
):
    """The demo's failure: every measured front point was over the budget and the search took the
    smallest subnet. Here latency is a deterministic function of FLOPs (no timing noise) and the
    latency predictor is made to promise 40% less than that for every subnet but the smallest and the
    largest (which calibrate its scale), so the predicted front runs past the budget: the
    re-check must find the budget's edge by bisection and choose from below it."""
    import ufo.search.latency as latency_mod
    import ufo.search.pipeline as pl
    from ufo.search.latency import Latency

    def fake_measure_many(space, archs, task, *a, **k):
        return [Latency(median_ms=0.1 + space.flops(x, task) / 1e6, q1_ms=0.0, q3_ms=9.9, n=3) for x in archs]

    monkeypatch.setattr(latency_mod, "measure_many", fake_measure_many)
    monkeypatch.setattr(pl, "measure_many", fake_measure_many)

    small, large = run.arch(run.space.smallest(run.routes)), run.arch(run.space.largest(run.routes))
    ends = arch_features(run.space, [small, large], TASK)

    class Optimistic:  # right at the smallest and the largest subnet (so its scale is right), 40% low elsewhere
        def __init__(self, gp):
            self.gp = gp

        def predict(self, X, return_std=False):
            at_ends = (np.abs(X[:, None, :] - ends[None]).max(-1) < 1e-9).any(1)
            return self.gp.predict(X) * np.where(at_ends, 1.0, 0.6)

    real = pl._latency_predictor

    def optimistic(*a, **k):
        gp, meta = real(*a, **k)
        return Optimistic(gp), meta

    monkeypatch.setattr(pl, "_latency_predictor", optimistic)
    space = run.space
    flops = sorted(space.flops(run.arch(a), TASK) for a in run.sample(40, seed=5))
    budget = 0.1 + flops[len(flops) // 2] / 1e6  # the median subnet's fake latency
    r = search_task(
        run_dir,
        TASK,
        max_latency_ms=budget,
        out_dir=tmp_path / "s",
        predictor_dir=tmp_path / "pred",
        **{**FAST, "top_k": 4},
    )
    steps = [c.step for c in r.candidates]
    assert "fallback" not in steps and "bisect" in steps, steps
    over = [c for c in r.candidates if not c.meets_budget]
    assert over and all(c.predicted_latency_ms <= budget for c in over)  # predicted within, measured over
    ok = [c for c in r.candidates if c.meets_budget]
    assert r.measured_metric == max(c.measured_metric for c in ok) and r.measured_latency_ms <= budget
    # the edge was closed: no unmeasured front point lies between the costliest measured within the
    # budget and the cheapest measured over it
    idx = {c.front_index: c.meets_budget for c in r.candidates if c.front_index is not None}
    hi = max(i for i, m in idx.items() if m)
    above = [i for i, m in idx.items() if not m and i > hi]
    assert not above or min(above) == hi + 1


def test_a_relative_budget_moves_with_the_machine_speed_between_measurements(run_dir, run, tmp_path, monkeypatch):
    """The machine gets 30% slower with every measurement (fake, deterministic timings): an absolute
    budget soon rejects everything, but a relative one is timed with the candidates and holds."""
    import ufo.search.latency as latency_mod
    import ufo.search.pipeline as pl
    from ufo.search.latency import Latency

    calls = {"n": 0}

    def drifting(space, archs, task, *a, **k):
        calls["n"] += 1
        f = 1.3 ** calls["n"]
        out = []
        for x in archs:
            ms = f * (0.1 + space.flops(x, task) / 1e6)
            out.append(Latency(median_ms=ms, q1_ms=ms, q3_ms=ms, n=3))
        return out

    monkeypatch.setattr(latency_mod, "measure_many", drifting)
    monkeypatch.setattr(pl, "measure_many", drifting)
    r = search_task(
        run_dir,
        TASK,
        max_latency_fraction=0.5,
        out_dir=tmp_path / "s",
        predictor_dir=tmp_path / "pred",
        **{**FAST, "top_k": 4},
    )
    assert "fallback" not in [c.step for c in r.candidates]
    assert len({round(c.budget_ms, 9) for c in r.candidates}) > 1  # the budget was timed again, and moved
    small, large = run.arch(run.space.smallest(run.routes)), run.arch(run.space.largest(run.routes))
    lo, hi = (0.1 + run.space.flops(x, TASK) / 1e6 for x in (small, large))
    floor = 1.05 * lo
    limit = floor + 0.5 * (hi - floor)  # the budget in the speed-free units of the fake timings
    for c in r.candidates:
        assert c.meets_budget == (0.1 + run.space.flops(c.arch, TASK) / 1e6 <= limit + 1e-12)


def test_trained_run_evaluates_on_the_device_it_is_given(run_dir, run, monkeypatch):
    cpu = TrainedRun(run_dir, TASK, device="cpu")
    assert cpu.device == torch.device("cpu") and next(cpu.model.parameters()).device == cpu.device
    a = run.sample(2, seed=5)[1]
    assert cpu.evaluate(a) == pytest.approx(run.evaluate(a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="cuda"):
        TrainedRun(run_dir, TASK, device="cuda")


def test_cached_cuda_latencies_are_reused_only_on_the_same_gpu(run, tmp_path, monkeypatch):
    """Timings key on the machine: the CPU model for every backend, and the GPU for cuda (fake
    timings and a fake machine; no GPU needed)."""
    import ufo.search.latency as latency_mod
    import ufo.search.pipeline as pl
    from ufo.search.latency import Latency

    machine = {"cpu": "CPU-X", "gpu": "GPU-A"}
    calls = []

    def timings(space, archs, task, backend, *args, **kwargs):
        calls.append((backend, machine["gpu"]))
        ms = [0.1 + space.flops(a, task) / 1e6 for a in archs]
        return [Latency(median_ms=m, q1_ms=m, q3_ms=m, n=3) for m in ms]

    for mod in (pl, latency_mod):
        monkeypatch.setattr(mod, "machine_info", lambda: dict(machine))
    monkeypatch.setattr(latency_mod, "measure_many", timings)
    monkeypatch.setattr(latency_mod, "check_backend", lambda backend: None)  # "cuda" without a GPU

    def fit(backend):
        paths = pl.predictor_paths(tmp_path, TASK, backend)
        return pl._latency_predictor(run, paths, backend, 10, 0, 1, 1, None, False, False)[1]["cached"]

    assert [fit("cuda"), fit("cuda"), fit("torch-cpu")] == [False, True, False]
    machine["gpu"] = "GPU-B"  # another GPU in a host with the same CPU
    assert [fit("cuda"), fit("torch-cpu")] == [False, True]
    assert calls == [("cuda", "GPU-A"), ("torch-cpu", "GPU-A"), ("cuda", "GPU-B")]
