"""`ufo data show` and `ufo data pack`: the data a config declares, and packing a data set into
webdataset shards (thin calls into `ufo.data.build` and `ufo.data.shards`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from ufo.choices import OnError
from ufo.cli.common import ConfigArg, DataDirOpt, SetOpt, console, friendly, load_config_arg
from ufo.errors import UFOError

if TYPE_CHECKING:
    from ufo.data.readers import OnError as OnErrorMode


def register(app: typer.Typer) -> None:
    """Add the `data` group (show, pack) to `app`."""
    data_app = typer.Typer(no_args_is_help=True, help="Inspect the data a config declares.")
    data_app.command("show")(friendly(data_show))
    data_app.command("pack")(friendly(data_pack))
    app.add_typer(data_app, name="data")


def data_show(config: Path = ConfigArg, set_: list[str] | None = SetOpt, data_dir: Path | None = DataDirOpt) -> None:
    """Table of the config's tasks: kind, data, sizes, classes/identities and splits."""
    from ufo.data.build import build_task_data

    cfg = load_config_arg(config, set_, data_dir)
    table = Table(title=f"{cfg.name}: tasks and data")
    for col in ("task", "kind", "data", "train", "classes / ids", "eval", "split"):
        table.add_column(col)
    for name, t in cfg.tasks.items():
        d = build_task_data(name, t, cfg)
        h, w = cfg.input_size(name)
        src = (t.data.recipe or f"{t.data.reader}:{t.data.path}") + f" @ {h}x{w}"
        ev = ", ".join(f"{k} {len(v)}" for k, v in d.eval.items())
        n_eval_cls = "/".join(str(len(set(v.labels.tolist()))) for v in d.eval.values())
        extra = f"; {len(d.extra['oneshot_runs'])} one-shot runs" if "oneshot_runs" in d.extra else ""
        table.add_row(
            name,
            t.kind,
            src,
            str(len(d.train)),
            f"{len(set(d.train.labels.tolist()))} train / {n_eval_cls} eval",
            ev + extra,
            "; ".join(d.notes),
        )
    console.print(table)


_PACK_READERS = {".csv": "csv", ".zip": "zip", ".npz": "npz", ".mat": "alphadigits_mat", ".tar": "webdataset"}


def data_pack(
    src: Path = typer.Argument(..., help="the data: a folder or file that --reader understands"),
    out: Path = typer.Argument(..., help="output folder for shard-NNNNNN.tar and index.json"),
    reader: str | None = typer.Option(
        None,
        help="reader name, as `data.reader` in a config (default: image_folder "
        "for a folder, else by extension: csv, zip, npz, mat, tar)",
    ),
    max_count: int = typer.Option(10_000, "--max-count", "--maxcount", help="samples per shard"),
    max_size_mb: float = typer.Option(1000.0, "--max-size-mb", "--maxsize-mb", help="image bytes per shard, in MB"),
    on_error: OnError = typer.Option(OnError.raise_, "--on-error", help="raise, or skip unreadable images (counted)"),
    overwrite: bool = typer.Option(False, help="replace the shards of an earlier pack in OUT"),
) -> None:
    """Pack a data set into webdataset tar shards (the `webdataset` reader reads them back by random
    access). Image files keep their own bytes; in-memory sets (npz, mat) are written as PNG."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ufo.data.build import READERS, STREAMING
    from ufo.data.build import reader as get_reader
    from ufo.data.shards import write_shards

    name = reader or ("image_folder" if src.is_dir() else _PACK_READERS.get(src.suffix.lower()))
    if name not in READERS:
        raise UFOError(
            f"--reader {name!r}: expected one of {', '.join(READERS)}"
            if name
            else f"cannot tell the reader of {src}; pass --reader ({', '.join(READERS)})"
        )
    mode: OnErrorMode = "skip" if on_error is OnError.skip else "raise"
    if not src.exists():
        raise UFOError(f"{src} does not exist")
    fn = get_reader(name)
    ds = fn(src, on_error=mode, lazy=True) if name in STREAMING else fn(src, on_error=mode)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        job = bar.add_task(f"packing {ds.name}", total=len(ds))
        index = write_shards(
            ds,
            out,
            maxcount=max_count,
            maxsize=max_size_mb * 1e6,
            on_error=mode,
            overwrite=overwrite,
            progress=lambda n: bar.advance(job, n),
        )
    console.print(
        f"wrote {len(index['shards'])} shard(s) with {index['num_samples']:,} images "
        f"({len(index['class_names'])} classes) and index.json to {out}; read them with "
        f"`data: {{reader: webdataset, path: {out}}}`"
    )
