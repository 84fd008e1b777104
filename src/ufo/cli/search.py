"""`ufo latency`, `ufo predictor fit` and `ufo search`: latency datasets, GP-NAS predictors and the
subnet search under a budget (thin calls into `ufo.search`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from ufo.choices import Device, LatencyBackend, device_value
from ufo.cli.common import DataDirOpt, console, friendly
from ufo.errors import UFOError


def register(app: typer.Typer) -> None:
    """Add latency, the `predictor` group (fit) and search to `app`."""
    app.command()(friendly(latency))
    predictor_app = typer.Typer(no_args_is_help=True, help="Fit GP-NAS predictors of subnet metric and latency.")
    predictor_app.command("fit")(friendly(predictor_fit))
    app.add_typer(predictor_app, name="predictor")
    app.command()(friendly(search))


def latency(
    source: Path = typer.Argument(
        ...,
        help="where the search space comes from: a run folder or checkpoint, a "
        "config YAML, or a space / latency-dataset JSON",
    ),
    task: str = typer.Option(..., "--task", "-t", help="the task whose path is timed"),
    out: Path = typer.Option(..., help="output latency dataset (.json)"),
    samples: int = typer.Option(60, "--samples", "--n", help="archs to measure (the largest and smallest included)"),
    backend: LatencyBackend = typer.Option(LatencyBackend.torch_cpu, help="where to time"),
    batch_size: int = typer.Option(1, "--batch-size", "--batch", help="images per forward pass"),
    threads: int = typer.Option(1, help="torch intra-op / ORT intra_op_num_threads"),
    repeats: int = typer.Option(30, help="timed rounds per arch"),
    warmup: int = typer.Option(5, help="untimed calls per arch first"),
    seed: int = typer.Option(0, help="seed of the arch sample and the round order"),
) -> None:
    """Measure the latency of SAMPLES sampled subnets of a search space on a backend (for `ufo predictor fit`)."""
    from ufo.search.latency import collect, space_from

    space = space_from(source)
    ds = collect(space, task, samples, backend.value, seed, batch_size, threads, repeats, warmup)
    ds.save(out)
    y = ds.targets()
    console.print(
        f"wrote {out}: {len(ds)} archs of task {task!r} on {backend.value} (batch {batch_size}, "
        f"{threads} threads), "
        f"median latency {y.min():.3g} to {y.max():.3g} ms"
    )


def predictor_fit(
    source: Path = typer.Argument(
        ..., help="a run folder (collect, then fit) or a latency dataset written by `ufo latency`"
    ),
    out: Path | None = typer.Option(
        None,
        help="output predictor (.safetensors) for a latency dataset; for a run "
        "folder, the output folder (default RUN_DIR/predictors)",
    ),
    task: str | None = typer.Option(None, "--task", "-t", help="run folder: the task"),
    metric: bool = typer.Option(False, "--metric", help="run folder: fit the task-metric predictor"),
    latency: bool = typer.Option(False, "--latency", help="run folder: fit the latency predictor"),
    backend: LatencyBackend = typer.Option(LatencyBackend.torch_cpu, help="run folder: where to time"),
    metric_samples: int | None = typer.Option(
        None, help="run folder: subnets evaluated for the metric predictor (default 50)"
    ),
    latency_samples: int | None = typer.Option(
        None, help="run folder: subnets timed for the latency predictor (default 100)"
    ),
    samples: int | None = typer.Option(None, help="run folder: both of the above at once"),
    threads: int = typer.Option(1, help="run folder: threads for latency measurement"),
    refit: bool = typer.Option(False, help="run folder: collect and fit again even if a cached predictor matches"),
    device: Device = typer.Option(
        Device.auto, help="run folder: where subnet metrics are evaluated (auto: the GPU when there is one)"
    ),
    data_dir: Path | None = DataDirOpt,
    folds: int = typer.Option(5, help="cross-validation folds (latency dataset)"),
    seed: int = typer.Option(0, help="seed of the subnet sample, folds and the kernel optimiser"),
    log_target: bool = typer.Option(True, "--log/--no-log", help="latency dataset: fit log latency"),
) -> None:
    """Cross-validate and fit GP predictors; prints Kendall tau and MAPE. From a run folder
    (`--task T --metric` and/or `--latency --backend B`, `--metric-samples N`, `--latency-samples N`)
    the subnets are first evaluated with inherited weights or timed, and everything is cached under
    RUN_DIR/predictors."""
    if source.is_dir():
        from ufo.search.pipeline import fit_predictors

        if task is None:
            raise UFOError(f"{source} is a run folder: give --task and --metric and/or --latency")
        if not (metric or latency):
            raise UFOError("give --metric and/or --latency: which predictor to fit")
        metric_samples = samples if metric_samples is None else metric_samples
        latency_samples = samples if latency_samples is None else latency_samples
        n: dict[str, Any] = {  # only the counts given: fit_predictors keeps its own defaults
            k: v for k, v in (("metric_samples", metric_samples), ("latency_samples", latency_samples)) if v is not None
        }
        r = fit_predictors(
            source,
            task,
            backend=backend.value,
            seed=seed,
            out_dir=out,
            console=console,
            metric=metric,
            latency=latency,
            threads=threads,
            refit=refit,
            data_root=None if data_dir is None else str(data_dir),
            device=device_value(device),
            **n,
        )
        for k in ("metric", "latency"):
            if k in r:
                p = r[k]
                tau = "n/a" if p["cv_kendall_tau"] is None else f"{p['cv_kendall_tau']:.3f}"
                mp = "n/a" if p["cv_mape"] is None else f"{100 * p['cv_mape']:.1f}%"
                what = f"{task} {r['metric_name']}" if k == "metric" else f"{task} latency on {backend.value}"
                console.print(
                    f"{'reused' if p['cached'] else 'wrote'} {p['predictor']}: {what}, {p['n']} subnets; "
                    f"5-fold CV Kendall tau {tau}, MAPE {mp}"
                )
        return
    from ufo.search.latency import LatencyDataset
    from ufo.search.predictor import fit_latency_predictor

    if out is None:
        raise UFOError("--out: give the output predictor file (.safetensors)")
    ds = LatencyDataset.load(source)
    gp, meta = fit_latency_predictor(ds, folds, seed, log_target)
    gp.save(out, ds.space, meta)
    cv = meta["cv"]
    console.print(
        f"wrote {out}: GP latency predictor for task {ds.task!r} on {ds.backend}, {len(ds)} archs; "
        f"{folds}-fold CV Kendall tau {cv['kendall_tau']:.3f}, MAPE {100 * cv['mape']:.1f}%"
    )


def search(
    run_dir: Path = typer.Argument(..., help="a run folder written by `ufo train` (a chip supernet, or any run)"),
    task: str = typer.Option(..., "--task", "-t", help="the task to search a subnet for"),
    out: Path = typer.Option(..., "--out", help="output folder: model.safetensors, search.json, pareto.png"),
    max_latency_ms: float | None = typer.Option(None, "--max-latency-ms", help="latency budget on --backend"),
    max_latency_fraction: float | None = typer.Option(
        None,
        "--max-latency-fraction",
        help="latency budget relative to this machine: that fraction of the way "
        "from the smallest subnet's latency to the largest's, timed with every measurement",
    ),
    max_params: float | None = typer.Option(None, "--max-params", help="parameter budget (exact count)"),
    max_flops: float | None = typer.Option(None, "--max-flops", help="FLOP budget per image (exact count)"),
    backend: LatencyBackend = typer.Option(LatencyBackend.torch_cpu, help="where latency is timed"),
    trials: int = typer.Option(2000, help="NSGA-II trials on the predictors"),
    top_k: int = typer.Option(
        8, "--top-k", help="subnets of the predicted front measured for real (more when none meets the budget)"
    ),
    metric_samples: int = typer.Option(50, help="subnets evaluated for the metric predictor (first use)"),
    latency_samples: int = typer.Option(100, help="subnets timed for the latency predictor (first use)"),
    threads: int = typer.Option(1, help="threads for latency measurement"),
    batch_size: int = typer.Option(
        1, "--batch-size", "--batch", help="images per forward pass for latency measurement"
    ),
    seed: int = typer.Option(0, help="seed of the subnet samples and of NSGA-II"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="datasets folder (default: the run's)"),
    device: Device = typer.Option(
        Device.auto, help="where subnet metrics are evaluated (auto: the GPU when there is one)"
    ),
) -> None:
    """Search the run's subnets for the best predicted metric under the budget (NSGA-II on GP
    predictors, fitted on first use and cached in RUN_DIR/predictors), measure the top
    candidates for real, keep those that meet the budget and save the best as a task model."""
    from ufo.search.pipeline import search_task

    r = search_task(
        run_dir,
        task,
        max_latency_ms=max_latency_ms,
        max_latency_fraction=max_latency_fraction,
        max_params=max_params,
        max_flops=max_flops,
        backend=backend.value,
        out_dir=out,
        trials=trials,
        top_k=top_k,
        seed=seed,
        console=console,
        metric_samples=metric_samples,
        latency_samples=latency_samples,
        threads=threads,
        batch=batch_size,
        data_root=None if data_dir is None else str(data_dir),
        device=device_value(device),
    )
    table = Table(title=f"{task}: measured candidates (budget {r.budget})")
    for col in ("step", "depth/embed", "params", f"{r.metric} pred/meas", "ms pred/meas (median)", "meets"):
        table.add_column(col)
    for c in r.candidates:
        lat = c.measured_latency
        ms = "" if lat is None else f"{c.predicted_latency_ms:.3f}/{lat.median_ms:.3f}"
        table.add_row(
            c.step + (" *" if c.arch == r.arch else ""),
            f"{c.arch.depth}/{c.arch.embed_dim}",
            f"{c.params:,}",
            f"{c.predicted_metric:.4f}/{c.measured_metric:.4f}",
            ms,
            "yes" if c.meets_budget else "no",
        )
    console.print(table)
    for k, p in r.predictors.items():
        if isinstance(p, dict) and "predictor" in p:
            tau = "n/a" if p["cv_kendall_tau"] is None else f"{p['cv_kendall_tau']:.3f}"
            console.print(
                f"{k} predictor: {p['n']} subnets, CV Kendall tau {tau}"
                f"{' (cached)' if p['cached'] else ''}: {p['predictor']}"
            )
    chosen_ms = "" if r.measured_latency_ms is None else f", {r.measured_latency_ms:.3f} ms on {r.backend}"
    console.print(
        f"chose depth {r.arch.depth}, embed {r.arch.embed_dim}: {r.metric} {r.measured_metric:.4f} "
        f"(predicted {r.predicted_metric:.4f}), {r.params:,} parameters{chosen_ms}; search {r.search_s:.1f} s, "
        f"measuring {r.measure_s:.1f} s, total {r.total_s:.1f} s"
    )
    console.print(f"wrote {r.model_path}, {r.json_path}, {r.png_path}")
    for w in r.warnings:
        console.print(f"[yellow]warning[/]: {w}")
