"""`ufo search`: the best subnet of a task in a trained run under a latency, parameter or FLOP
budget (a thin call into `ufo.search.pipeline.search_task`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ufo.choices import LatencyBackend


def register(app: typer.Typer) -> None:
    from rich.table import Table

    from ufo.cli import console, friendly

    @app.command()
    @friendly
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
        lat = "" if r.measured_latency_ms is None else f", {r.measured_latency_ms:.3f} ms on {r.backend}"
        console.print(
            f"chose depth {r.arch.depth}, embed {r.arch.embed_dim}: {r.metric} {r.measured_metric:.4f} "
            f"(predicted {r.predicted_metric:.4f}), {r.params:,} parameters{lat}; search {r.search_s:.1f} s, "
            f"measuring {r.measure_s:.1f} s, total {r.total_s:.1f} s"
        )
        console.print(f"wrote {r.model_path}, {r.json_path}, {r.png_path}")
        for w in r.warnings:
            console.print(f"[yellow]warning[/]: {w}")
