"""`ufo demo`: the whole path that exists today, on data shipped with pip packages.

Trains the All-in-One model of the packaged `configs/demo.yaml` (three tasks, two kinds),
evaluates every task, extracts each task's path as a standalone timm ViT, checks that it equals
the supernet to 1e-5, and saves it. Re-running continues or reuses the run folder.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ufo.checkpoint import atomic_write_text, save_extracted
from ufo.config import Config, load_config
from ufo.nn.extract import extract
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
    for col in ("task", "kind", "metric", "subnet params", "MFLOPs", "max |diff| vs supernet", "file"):
        table.add_column(col)
    models_dir = out / "models"
    rows = {}
    for name in cfg.task_names:
        sub = extract(model.backbone, trainer.arch, name)
        x = torch.randn(4, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size)
        with torch.no_grad():
            diff = float((sub(x) - model.backbone(x, name)).abs().max())
        path = models_dir / f"{name}.safetensors"
        save_extracted(path, sub, model.space, extra={"task_kind": cfg.tasks[name].kind})
        kind = cfg.tasks[name].kind
        key = task_class(kind).primary
        n = model.space.num_params(sub.ufo_arch, name)
        mf = model.space.flops(sub.ufo_arch, name) / 1e6
        table.add_row(name, kind, f"{key} {metrics[name][key]:.4f}", f"{n:,}", f"{mf:.1f}", f"{diff:.1e}", str(path))
        rows[name] = {"kind": kind, "metrics": metrics[name], "params": n, "mflops": mf, "parity": diff}
    console.print(table)
    result = {"train": summary, "tasks": rows}
    atomic_write_text(out / "demo.json", json.dumps(result, indent=2))
    console.print(f"results: {out / 'demo.json'}; extracted models: {models_dir}")
    return result
