"""`ufo demo`: the whole path that exists today, on data shipped with pip packages.

Trains the All-in-One model of the packaged `configs/demo.yaml` (three tasks, two kinds),
evaluates every task, extracts each task as a standalone task model (a plain timm ViT plus the
task's head), checks that it equals the supernet to 1e-5, and saves it where `ufo export` and
`ufo serve` take it. Re-running continues or reuses the run folder.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ufo.checkpoint import atomic_write_text
from ufo.config import Config, load_config
from ufo.errors import UFOError
from ufo.deploy.package import extract_task_model, save_task_model
from ufo.tasks import task_class
from ufo.train.loop import Trainer


def demo_config_path() -> Path:
    return Path(str(resources.files("ufo") / "configs" / "demo.yaml"))


def run_demo(out: str | Path, cfg: Config | None = None, console: Console | None = None) -> dict:
    console = console or Console()
    out = Path(out)
    cfg = cfg or load_config(demo_config_path())
    console.print(f"[bold]UFO demo[/]: {len(cfg.tasks)} tasks ({', '.join(cfg.task_names)}), "
                  f"{cfg.train.steps} All-in-One steps -> {out}")
    trainer = Trainer(cfg, out)
    summary = trainer.fit(resume=True)
    model = trainer.eval_model().eval()
    metrics = trainer.evaluate()

    table = Table(title="All in One: one backbone, every task")
    for col, kw in (("task", {}), ("kind", {}), ("metric", {}), ("params", {"justify": "right"}),
                    ("MFLOPs", {"justify": "right"}), ("parity", {"justify": "right"})):
        table.add_column(col, **kw)
    models_dir = out / "models"
    rows = {}
    for name in cfg.task_names:
        # a standalone task model (plain timm backbone + the task's head) and its parity with the supernet
        tm = extract_task_model(model, trainer.arch, name, cfg, {name: trainer.data[name]}, source=str(out))
        x = torch.randn(4, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
        with torch.no_grad():
            diff = float((tm(x, name) - model(x, name)).abs().max())
        if diff > 1e-5:
            raise UFOError(f"task {name!r}: the extracted task model differs from the supernet by {diff:.2e} (> 1e-5)")
        path = models_dir / f"{name}.safetensors"
        save_task_model(path, tm)
        kind = cfg.tasks[name].kind
        key = task_class(kind).primary
        n = tm.num_params()
        mf = model.space.flops(tm.info.arch, name) / 1e6
        table.add_row(name, kind, f"{key} {metrics[name][key]:.4f}", f"{n:,}", f"{mf:.1f}", f"{diff:.0e}")
        rows[name] = {"kind": kind, "metrics": metrics[name], "params": n, "mflops": mf, "parity": diff,
                      "file": str(path)}
    console.print(table)
    result = {"train": summary, "tasks": rows}
    atomic_write_text(out / "demo.json", json.dumps(result, indent=2))
    console.print(f"results: {out / 'demo.json'}; task models (backbone + head): {models_dir}\n"
                  f"next: ufo export {models_dir / (cfg.task_names[0] + '.safetensors')} --format onnx "
                  f"--out {cfg.task_names[0]}.onnx   |   ufo serve {out}")
    return result
