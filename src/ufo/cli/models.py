"""Commands on checkpoints and task models: `ufo inspect`, `extract`, `export` and `serve` (thin calls
into `ufo.checkpoint`, `ufo.nn.extract`, `ufo.taskmodel`, `ufo.deploy.onnx_export` and
`ufo.deploy.server`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, cast

import typer
from rich.table import Table

from ufo.choices import ExportFormat, Int8, ServeBackend, value
from ufo.cli.common import console, friendly
from ufo.errors import UFOError

if TYPE_CHECKING:
    from ufo.arch import Arch
    from ufo.deploy.onnx_export import Int8Mode


def register(app: typer.Typer) -> None:
    """Add inspect, extract, export and serve to `app`."""
    app.command()(friendly(inspect))
    app.command()(friendly(extract))
    app.command()(friendly(export))
    app.command()(friendly(serve))


def inspect(
    checkpoint: Path = typer.Argument(
        ..., help="a .safetensors checkpoint written by ufo, a run folder, or a save_pretrained folder"
    ),
) -> None:
    """Show a checkpoint's manifest: kind, tasks, arch, routes and parameter count."""
    from ufo.checkpoint import read_manifest
    from ufo.taskmodel import model_file

    m = read_manifest(model_file(checkpoint))
    table = Table(title=str(checkpoint), show_header=False)
    for key in ("kind", "ufo_version", "torch_version", "tasks", "num_params"):
        if key in m:
            table.add_row(key, str(m[key]))
    if "arch" in m:
        table.add_row("arch", json.dumps(m["arch"]))
    for task, route in (m.get("routes") or {}).items():
        table.add_row(f"route {task}", " ".join(route))
    console.print(table)


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
    from ufo.model import arch_from_spec
    from ufo.nn import extract as do_extract

    if format not in (None, "file", "hf"):
        raise UFOError(f"--format {format!r}: expected file or hf")
    folder = format == "hf" or (format is None and (out.is_dir() or not out.suffix))
    if read_manifest(checkpoint / "model.safetensors" if checkpoint.is_dir() else checkpoint).get("kind") != "supernet":
        from ufo.taskmodel import save_task_model, task_model_from_run

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
    a = arch_from_spec(arch or "largest", model.space, model.routes())
    sub = do_extract(model, a, task)
    save_extracted(out, sub, model.space, extra={"source": str(checkpoint)})
    n = model.space.num_params(cast("Arch", sub.ufo_arch), task)
    console.print(f"wrote {out}: tasks {task}, {n:,} parameters, depth {a.depth}, embed {a.embed_dim}")


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
        cast("Int8Mode | None", value(int8)),
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
