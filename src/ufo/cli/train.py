"""`ufo train` and `ufo eval`: train the model a config describes, and evaluate a run or its subnets
(thin calls into `ufo.train` and `ufo.evaluate`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
import yaml
from rich.table import Table

from ufo.cli.common import ConfigArg, DataDirOpt, SetOpt, console, friendly, load_config_arg


def register(app: typer.Typer) -> None:
    """Add train and eval to `app`."""
    app.command()(friendly(train))
    app.command("eval")(friendly(eval_))


def train(
    config: Path = ConfigArg,
    out: Path = typer.Option(..., help="run folder (checkpoints, logs, model.safetensors)"),
    resume: bool = typer.Option(False, help="continue exactly from the run folder's latest checkpoint"),
    only: str | None = typer.Option(None, help="train on this one task alone (single-task baseline)"),
    set_: list[str] | None = SetOpt,
    data_dir: Path | None = DataDirOpt,
) -> None:
    """Train the model the config describes (All in One by default)."""
    from ufo.checkpoint import atomic_write_text
    from ufo.runlock import run_lock
    from ufo.train.loop import Trainer
    from ufo.train.mim import MimTrainer
    from ufo.train.routing import RoutingTrainer
    from ufo.train.slimming import ChipTrainer

    cfg = load_config_arg(config, set_, data_dir)
    if only:
        cfg = cfg.only(only)
    with run_lock(out):  # before config.yaml: a second `ufo train` on OUT must not rewrite it
        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        trainer = {"pretrain_mim": MimTrainer, "task_supernet": RoutingTrainer, "chip_supernet": ChipTrainer}.get(
            cfg.train.stage, Trainer
        )(cfg, out)
        summary = trainer.fit(resume=resume)
    console.print(
        f"trained {summary['steps']} steps at {summary['images_per_s']:.0f} images/s; "
        f"model: {out / 'model.safetensors'}"
    )


def eval_(
    run_dir: Path = typer.Argument(..., help="a run folder written by `ufo train`"),
    arch: list[str] | None = typer.Option(
        None,
        help="evaluate this subnet with inherited weights: ARCH.json, "
        "largest, smallest or random:SEED; repeat for several",
    ),
    random: int = typer.Option(0, help="also evaluate N more random subnets (metric against parameters)"),
    task: list[str] | None = typer.Option(None, "--task", "-t", help="only these tasks"),
    data_dir: Path | None = DataDirOpt,
    recalibrate_bn: bool = typer.Option(
        True,
        "--recalibrate-bn/--no-recalibrate-bn",
        help="for subnets: re-estimate the heads' BatchNorm statistics for each one "
        "on training images first (as Once-for-All does)",
    ),
) -> None:
    """Run every task's protocol; writes RUN_DIR/eval.json and eval.md. With --arch / --random,
    evaluates subnets with inherited weights (eval-NAME.* for one, eval-subnets.* and a plot of
    metric against parameters for several)."""
    from ufo.runlock import run_lock

    with run_lock(run_dir, create=False):
        _eval(run_dir, arch, random, task, data_dir, recalibrate_bn)


def _eval(
    run_dir: Path,
    arch: list[str] | None,
    random: int,
    task: list[str] | None,
    data_dir: Path | None,
    recalibrate_bn: bool,
) -> None:
    from ufo.checkpoint import atomic_write_text
    from ufo.data.build import build_task_data
    from ufo.train.evaluate import evaluate_tasks
    from ufo.train.store import load_model
    from ufo.train.subnets import evaluate_subnets, plot_subnets, subnet_specs, subnets_markdown

    model, cfg, _manifest = load_model(run_dir / "model.safetensors")
    if data_dir is not None:
        cfg.data_root = str(data_dir)
    tasks = task or cfg.task_names
    specs = subnet_specs(model.space, model.backbone.routes(), list(arch or []), random, seed=cfg.seed)
    data = {n: build_task_data(n, cfg.tasks[n], cfg) for n in tasks}
    if len(specs) > 1:
        rows = evaluate_subnets(model, cfg, data, specs, tasks, recalibrate_bn)
        payload = {"run": str(run_dir), "recalibrate_bn": recalibrate_bn, "subnets": rows}
        atomic_write_text(run_dir / "eval-subnets.json", json.dumps(payload, indent=2))
        md = subnets_markdown(rows, cfg, tasks)
        atomic_write_text(run_dir / "eval-subnets.md", md)
        plot_subnets(rows, cfg, tasks, run_dir / "eval-subnets.png", f"{run_dir.name}: subnets, inherited weights")
        console.print(md)
        console.print(f"wrote {run_dir / 'eval-subnets.json'}, .md and .png ({len(rows)} subnets)")
        return
    if specs:
        ((name, a),) = specs.items()
        results = evaluate_subnets(model, cfg, data, specs, tasks, recalibrate_bn, show_progress=False)[0]["metrics"]
        name = f"eval-{Path(name).stem.replace(':', '-')}"
    else:
        a, name = model.arch, "eval"
        results = evaluate_tasks(model, data, cfg, tasks)
    payload = {"run": str(run_dir), "arch": a.model_dump(), "metrics": results}
    atomic_write_text(run_dir / f"{name}.json", json.dumps(payload, indent=2))
    table = Table(title=f"{run_dir}: {name}")
    table.add_column("task")
    table.add_column("kind")
    table.add_column("metrics")
    lines = ["| task | kind | metrics |", "|---|---|---|"]
    for n, m in results.items():
        txt = ", ".join(f"{k} {v:.4f}" for k, v in m.items())
        table.add_row(n, cfg.tasks[n].kind, txt)
        lines.append(f"| {n} | {cfg.tasks[n].kind} | {txt} |")
    atomic_write_text(run_dir / f"{name}.md", "\n".join(lines) + "\n")
    console.print(table)
