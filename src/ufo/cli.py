"""`ufo` command line. Each command is a thin call into the library; errors caused by user input
(`UFOError`) are printed as one clear line with exit code 2, never as a traceback."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ufo.choices import ExportFormat, Int8, LatencyBackend, OnError, ServeBackend, value
from ufo.errors import UFOError
from ufo.optional import missing_extra

app = typer.Typer(
    add_completion=True,
    no_args_is_help=True,
    help="UFO: one multi-task ViT supernet, exact subnets for every task and device.",
)
console = Console()
err_console = Console(stderr=True)


def _fail(msg: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def friendly(fn: Callable) -> Callable:
    """Turn UFOError, a missing optional package (naming its extra) and OSError (disk full,
    permission denied, ...) into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
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

    return wrapper


def _version_line() -> str:
    import timm
    import torch

    import ufo

    return f"ufo {ufo.__version__}  torch {torch.__version__}  timm {timm.__version__}"


def _print_version(show: bool) -> None:
    if show:
        console.print(_version_line())
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
    console.print(_version_line())


@app.command()
@friendly
def inspect(checkpoint: Path = typer.Argument(..., help="a .safetensors checkpoint written by ufo")) -> None:
    """Show a checkpoint's manifest: kind, tasks, arch, routes and parameter count."""
    from ufo.checkpoint import read_manifest

    m = read_manifest(checkpoint)
    table = Table(title=str(checkpoint), show_header=False)
    for key in ("kind", "ufo_version", "torch_version", "tasks", "num_params"):
        if key in m:
            table.add_row(key, str(m[key]))
    if "arch" in m:
        table.add_row("arch", json.dumps(m["arch"]))
    for task, route in (m.get("routes") or {}).items():
        table.add_row(f"route {task}", " ".join(route))
    console.print(table)


def resolve_arch_arg(arch: str, space, routes=None):
    """ARCH.json, or one of largest | smallest | random:SEED."""
    from ufo.train.store import arch_from_spec

    return arch_from_spec(arch, space, routes)


@app.command()
@friendly
def extract(
    checkpoint: Path = typer.Argument(
        ..., help="a run folder or its model.safetensors (trained model), or a bare supernet checkpoint"
    ),
    task: list[str] = typer.Option(..., "--task", "-t", help="task to keep; repeat for a multi-task model"),
    arch: str | None = typer.Option(
        None,
        help="ARCH.json, largest, smallest or random:SEED (default: the run's "
        "training arch; largest for a bare supernet)",
    ),
    out: Path = typer.Option(
        ...,
        help="output .safetensors file, or a folder (a path without a suffix, or with "
        "--format hf): config.json + model.safetensors",
    ),
    format: str | None = typer.Option(
        None,
        "--format",
        help="file (one .safetensors) or hf (a Hugging Face-style "
        "folder); default: hf when --out has no suffix or is "
        "a folder",
    ),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="datasets folder, for class names and verification thresholds"
    ),
) -> None:
    """Extract a standalone model for one or more tasks. From a trained run: a task model (backbone
    plus sliced heads, preprocessing, classes, thresholds), as one file or a Hugging Face-style
    folder; from a bare supernet: the backbone only."""
    from ufo.checkpoint import load_supernet, read_manifest, save_extracted
    from ufo.nn import extract as do_extract

    if format not in (None, "file", "hf"):
        raise UFOError(f"--format {format!r}: expected file or hf")
    folder = format == "hf" or (format is None and (out.is_dir() or not out.suffix))
    if read_manifest(checkpoint / "model.safetensors" if checkpoint.is_dir() else checkpoint).get("kind") != "supernet":
        from ufo.deploy.package import save_task_model, task_model_from_run

        tm = task_model_from_run(checkpoint, task, arch, data_root=None if data_dir is None else str(data_dir))
        if folder:
            tm.save_pretrained(out)
        else:
            save_task_model(out, tm)
        a = tm.info.arch
        console.print(
            f"wrote {out}{'/' if folder else ''}: task model for {task}, {tm.num_params():,} parameters, "
            f"depth {a.depth}, embed {a.embed_dim}"
        )
        for t, h in tm.info.heads.items():
            extra = f", threshold {h.threshold:.4f}" if h.threshold is not None else ""
            console.print(f"  {t}: {h.kind} -> {h.output} ({h.num_classes} classes{extra})")
        return
    if format == "hf":
        raise UFOError(
            "--format hf writes a task model, which needs a trained run; a bare supernet extracts to "
            "a backbone-only .safetensors file"
        )
    model = load_supernet(checkpoint / "model.safetensors" if checkpoint.is_dir() else checkpoint).eval()
    a = resolve_arch_arg(arch or "largest", model.space, model.routes())
    sub = do_extract(model, a, task)
    save_extracted(out, sub, model.space, extra={"source": str(checkpoint)})
    n = model.space.num_params(sub.ufo_arch, task)
    console.print(f"wrote {out}: tasks {task}, {n:,} parameters, depth {a.depth}, embed {a.embed_dim}")


@app.command()
@friendly
def export(
    model: Path = typer.Argument(..., help="a task_model file (ufo extract), or a run folder with --task/--arch"),
    format: ExportFormat = typer.Option(ExportFormat.onnx, "--format", help="export format"),
    out: Path = typer.Option(..., help="output .onnx file"),
    task: list[str] | None = typer.Option(None, "--task", "-t", help="the task to export (one per file)"),
    arch: str | None = typer.Option(None, help="for a run folder: ARCH.json, largest, smallest or random:SEED"),
    int8: Int8 | None = typer.Option(
        None,
        "--int8",
        help="also quantize: dynamic, or static (calibrated on training images); the fp32 model goes to OUT.fp32.onnx",
    ),
    opset: int = typer.Option(18, help="ONNX opset (17 or newer)"),
    tol: float = typer.Option(1e-4, help="parity tolerance: max |ONNX Runtime - torch| on real inputs"),
    calib_size: int = typer.Option(256, help="training images for static INT8 calibration"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="datasets folder (parity inputs, metrics)"),
) -> None:
    """Export one task's path to ONNX (dynamic batch, metadata), check it against torch, and
    optionally quantize it to INT8 and report the task metric before and after."""
    from ufo.deploy.onnx_export import export_from

    r = export_from(
        model,
        out,
        task,
        arch,
        value(int8),
        opset=opset,
        tol=tol,
        calib_size=calib_size,
        data_root=None if data_dir is None else str(data_dir),
    )
    console.print(
        f"wrote {r['fp32']}: task {r['task']} ({r['output_kind']}), opset {r['opset']}, dynamic batch; "
        f"parity on {r['parity_n']} {r['parity_inputs']}: max abs diff {r['parity_max_abs_diff']:.2e} "
        f"<= {r['parity_tol']:g}"
    )
    if "int8" in r:
        q = r["int8"]
        console.print(
            f"wrote {q['path']}: INT8 {q['mode']}, {q['size_bytes']:,} bytes (fp32 {q['fp32_size_bytes']:,}),"
            f" max abs diff vs torch {q['max_abs_diff_vs_torch']:.3g}; batch 1, 1 thread: "
            f"{q['latency_ms']['int8']:.3f} ms (fp32 {q['latency_ms']['fp32']:.3f} ms)"
        )
        for w in r.get("warnings", []):
            console.print(f"[yellow]warning[/]: {w}")
    if "metrics_fp32" in r:
        key = r["primary"]
        line = f"{key}: fp32 {r['metrics_fp32'][key]:.4f}"
        if "metrics_int8" in r:
            line += f", int8 {r['metrics_int8'][key]:.4f}"
        console.print(line)
    else:
        console.print("no task data found: metrics not computed")


@app.command()
@friendly
def serve(
    models: list[Path] = typer.Argument(..., help="run folders, task_model files or .onnx files (tasks must differ)"),
    host: str = typer.Option("127.0.0.1", help="interface to bind (loopback by default)"),
    port: int = typer.Option(8000, help="TCP port"),
    backend: ServeBackend = typer.Option(
        ServeBackend.torch, help="onnx: run folders and task models are exported on start"
    ),
    max_batch: int = typer.Option(32, help="largest micro-batch per task"),
    max_wait_ms: float = typer.Option(5.0, help="longest wait for a micro-batch to fill"),
    max_upload_mb: float = typer.Option(8.0, help="largest request body"),
    max_pixels: int | None = typer.Option(None, help="largest decoded image (default: PIL's MAX_IMAGE_PIXELS)"),
    max_pixels_in_flight: int | None = typer.Option(
        None, help="decoded pixels of all requests at once (default: 2 x max-pixels); more waits, then 503"
    ),
    body_timeout_s: float = typer.Option(
        30.0, help="longest wait for each chunk of a request body; then 408 and the connection is closed"
    ),
    keep_alive_s: float = typer.Option(5.0, help="idle keep-alive connections are closed after this"),
    threads: int | None = typer.Option(None, help="intra-op threads for torch / ONNX Runtime"),
) -> None:
    """Serve task models over HTTP (FastAPI): predict, compare, task list, health and Prometheus metrics."""
    from ufo.deploy.server import Settings
    from ufo.deploy.server import serve as run_server

    limits = {
        k: v for k, v in (("max_pixels", max_pixels), ("max_pixels_in_flight", max_pixels_in_flight)) if v is not None
    }
    if max_pixels is not None and max_pixels_in_flight is None:
        limits["max_pixels_in_flight"] = 2 * max_pixels
    settings = Settings(
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_upload_mb=max_upload_mb,
        body_timeout_s=body_timeout_s,
        keep_alive_s=keep_alive_s,
        **limits,
    )
    run_server(models, host, port, backend.value, settings, threads, announce=console.print)


data_app = typer.Typer(no_args_is_help=True, help="Inspect the data a config declares.")
app.add_typer(data_app, name="data")

ConfigArg = typer.Argument(..., help="experiment YAML")
SetOpt = typer.Option(None, "--set", help="override a config value, e.g. --set train.steps=100 (repeatable)")
DataDirOpt = typer.Option(None, "--data-dir", help="folder holding the local datasets (default ../shared/data)")


def _load(config: Path, overrides: list[str] | None, data_dir: Path | None):
    from ufo.config import load_config

    cfg = load_config(config, overrides)
    if data_dir is not None:
        cfg.data_root = str(data_dir)
    return cfg


@data_app.command("show")
@friendly
def data_show(config: Path = ConfigArg, set_: list[str] | None = SetOpt, data_dir: Path | None = DataDirOpt) -> None:
    """Table of the config's tasks: kind, data, sizes, classes/identities and splits."""
    from ufo.data.build import build_task_data

    cfg = _load(config, set_, data_dir)
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


@data_app.command("pack")
@friendly
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
    on_error = on_error.value
    if not src.exists():
        raise UFOError(f"{src} does not exist")
    fn = get_reader(name)
    ds = fn(src, on_error=on_error, lazy=True) if name in STREAMING else fn(src, on_error=on_error)
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
            on_error=on_error,
            overwrite=overwrite,
            progress=lambda n: bar.advance(job, n),
        )
    console.print(
        f"wrote {len(index['shards'])} shard(s) with {index['num_samples']:,} images "
        f"({len(index['class_names'])} classes) and index.json to {out}; read them with "
        f"`data: {{reader: webdataset, path: {out}}}`"
    )


@app.command()
@friendly
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

    cfg = _load(config, set_, data_dir)
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


@app.command("eval")
@friendly
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
    md = ["| task | kind | metrics |", "|---|---|---|"]
    for n, m in results.items():
        txt = ", ".join(f"{k} {v:.4f}" for k, v in m.items())
        table.add_row(n, cfg.tasks[n].kind, txt)
        md.append(f"| {n} | {cfg.tasks[n].kind} | {txt} |")
    atomic_write_text(run_dir / f"{name}.md", "\n".join(md) + "\n")
    console.print(table)


@app.command()
@friendly
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


predictor_app = typer.Typer(no_args_is_help=True, help="Fit GP-NAS predictors of subnet metric and latency.")
app.add_typer(predictor_app, name="predictor")


@predictor_app.command("fit")
@friendly
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
        n = {
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


def _register_command_modules() -> None:
    """Commands that live in their own module under `ufo.commands` (one module per capability, so
    that they can grow without touching this file) define `register(app)`; add them all here."""
    import importlib
    import pkgutil

    import ufo.commands

    for info in sorted(pkgutil.iter_modules(ufo.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"ufo.commands.{info.name}")
        module.register(app)


_register_command_modules()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
