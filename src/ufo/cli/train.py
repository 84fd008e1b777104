"""`ufo train` and `ufo eval`: train the model a config describes, and evaluate a run or its subnets
(thin calls into `ufo.train` and `ufo.evaluate`)."""

from __future__ import annotations

from pathlib import Path

import typer
import yaml
from rich.table import Table

from ufo.choices import Device, device_value
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

    cfg = load_config_arg(config, set_, data_dir)
    if only:
        cfg = cfg.only(only)
    with run_lock(out):  # before config.yaml: a second `ufo train` on OUT must not rewrite it
        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        summary = Trainer(cfg, out).fit(resume=resume)
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
    device: Device = typer.Option(Device.auto, help="where the model runs (auto: the GPU when there is one)"),
) -> None:
    """Run every task's protocol; writes RUN_DIR/eval.json and eval.md. With --arch / --random,
    evaluates subnets with inherited weights (eval-NAME.* for one, eval-subnets.* and a plot of
    metric against parameters for several)."""
    from ufo.evaluation.run import evaluate_run
    from ufo.runlock import run_lock
    from ufo.train.distributed import device as resolve_device

    dev = resolve_device(device_value(device))
    with run_lock(run_dir, create=False):
        r = evaluate_run(
            run_dir, arch, random, task, None if data_dir is None else str(data_dir), recalibrate_bn, device=dev
        )
    if r.subnets > 1:
        console.print(r.markdown)
        console.print(f"wrote {r.json_path}, .md and .png ({r.subnets} subnets)")
        return
    table = Table(title=f"{run_dir}: {r.json_path.stem}")
    for col in ("task", "kind", "metrics"):
        table.add_column(col)
    for row in r.rows:
        table.add_row(*row)
    console.print(table)
