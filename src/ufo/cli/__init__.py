"""`ufo` command line. Each command is a thin call into the library; errors caused by user input
(`UFOError`) are printed as one clear line with exit code 2, never as a traceback.

`app` is the typer app (the `ufo` console script). Each module of this package adds its commands
with `register(app)`; `ufo.cli.common` holds what they share (consoles, `friendly`, the --set and
--data-dir options)."""

from __future__ import annotations

import typer

from ufo.cli import data, demo, distill, extend, models, report, run, search, train
from ufo.cli.common import console

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    help="UFO: one multi-task ViT supernet, exact subnets for every task and device.",
)


def version_line() -> str:
    """The versions of ufo, torch and timm, on one line."""
    import timm
    import torch

    import ufo

    return f"ufo {ufo.__version__}  torch {torch.__version__}  timm {timm.__version__}"


def _print_version(show: bool) -> None:
    if show:
        console.print(version_line())
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="print the versions of ufo, torch and timm and exit",
    ),
) -> None:
    """Options of `ufo` itself, before the command."""


@app.command()
def version() -> None:
    """Print the versions of ufo, torch and timm."""
    console.print(version_line())


for _module in (models, data, train, search, demo, distill, extend, report, run):
    _module.register(app)
