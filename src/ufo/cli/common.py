"""What every `ufo` command shares: the consoles, `friendly` (user errors as one line, exit code 2),
the shared options (--set, --data-dir, the config argument) and loading a config with them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from ufo.errors import UFOError
from ufo.optional import missing_extra

if TYPE_CHECKING:
    from ufo.config import Config

console = Console()
err_console = Console(stderr=True)

ConfigArg = typer.Argument(..., help="experiment YAML")
SetOpt = typer.Option(None, "--set", help="override a config value, e.g. --set train.steps=100 (repeatable)")
DataDirOpt = typer.Option(None, "--data-dir", help="folder holding the local datasets (default ../shared/data)")

F = TypeVar("F", bound=Callable[..., Any])


def _fail(msg: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def friendly(fn: F) -> F:
    """Turn UFOError, a missing optional package (naming its extra) and OSError (disk full,
    permission denied, ...) into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UFOError as e:
            raise _fail(str(e)) from None
        except ModuleNotFoundError as e:  # an optional package imported without ufo.optional.require
            extra = missing_extra(e)
            if extra is None:
                raise
            raise _fail(str(extra)) from None
        except OSError as e:  # the system's reason, with the file when the error names one
            where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
            raise _fail(f"{where}: {e.strerror or e}" if where else str(e) or type(e).__name__) from None

    return wrapper  # type: ignore[return-value]  # functools.wraps keeps the signature typer reads


def load_config_arg(config: Path, overrides: list[str] | None, data_dir: Path | None) -> Config:
    """The config a command was given, with its --set overrides and --data-dir applied."""
    from ufo.config import load_config

    cfg = load_config(config, overrides)
    if data_dir is not None:
        cfg.data_root = str(data_dir)
    return cfg
