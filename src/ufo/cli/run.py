"""`ufo run CONFIG --out RUN_DIR`: the whole pipeline, resumable stage by stage (ufo.run)."""

from __future__ import annotations

from pathlib import Path

import typer

from ufo.choices import Stage, value
from ufo.cli.common import DataDirOpt, SetOpt, console, friendly, load_config_arg


def register(app: typer.Typer) -> None:
    """Add run to `app`."""
    app.command("run")(friendly(run))


def run(
    config: Path = typer.Argument(..., help="experiment YAML (its optional `pipeline:` section sets the stages)"),
    out: Path = typer.Option(..., help="run folder: one sub-folder and done.json per stage"),
    from_: Stage | None = typer.Option(None, "--from", help="redo this stage and every later one"),
    until: Stage | None = typer.Option(None, help="stop after this stage"),
    set_: list[str] | None = SetOpt,
    data_dir: Path | None = DataDirOpt,
) -> None:
    """All in One -> task supernet -> chip supernet -> predictors -> search -> extract -> export ->
    report. Finished stages whose inputs have not changed are skipped; an interrupted one resumes."""
    from ufo.run import run_pipeline

    cfg = load_config_arg(config, set_, data_dir)
    run_pipeline(cfg, out, from_stage=value(from_), until=value(until), console=console)
    html = out / "report" / "index.html"
    if html.is_file():
        console.print(f"report: {html}")
