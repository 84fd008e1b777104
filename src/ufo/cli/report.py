"""`ufo report RUN_DIR`: the HTML and Markdown report of a `ufo run` folder (ufo.report)."""

from __future__ import annotations

from pathlib import Path

import typer

from ufo.cli.common import console, friendly


def register(app: typer.Typer) -> None:
    """Add report to `app`."""
    app.command("report")(friendly(report))


def report(run_dir: Path = typer.Argument(..., help="a folder written by `ufo run` or `ufo demo`")) -> None:
    """Write RUN_DIR/report/index.html (self-contained, images inline) and report.md."""
    from ufo.report import write_report

    html, md = write_report(run_dir)
    console.print(f"wrote {html} and {md}")
