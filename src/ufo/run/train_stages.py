"""The three training stages of `ufo run`, each a library Trainer chained with `init: {kind: run}`
(the Trainer picks its stage from the stage config's `train.stage`):

- all_in_one: every task in every batch, the config's train.arch and train.paths, plus optional
  single-task baselines (`pipeline.baselines`);
- task_supernet: from All in One, routes learned and frozen (RoutingStage; routing_map.png);
- chip_supernet: from the task supernet, the sandwich rule with in-place distillation (ChipStage),
  then `pipeline.chip_supernet.eval_subnets` inherited subnets evaluated per task for the
  metric-vs-parameters plot (subnets.json, metric_vs_params.png).

An interrupted stage resumes from its checkpoint (Trainer.fit(resume=True)); a checkpoint
written by another config (the stage's settings changed since) is cleared and the stage starts over.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ufo.checkpoint import atomic_write
from ufo.config import Config
from ufo.errors import CheckpointError
from ufo.evaluation.protocol import evaluate_tasks, recalibrate_bn
from ufo.run.context import RunContext, stage_config
from ufo.train.loop import Trainer


def fit(ctx: RunContext, cfg: Config, out: Path, data: dict) -> Trainer:
    """Train `cfg` into `out`, resuming an interrupted run of the same config."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        tr = Trainer(cfg, out, data=data)
        tr.fit(resume=True)
    except CheckpointError as e:
        ctx.console.print(f"[yellow]{out}: {e}; starting this stage over[/]")
        for sub in ("checkpoints", "tb", "metrics.csv", "model.safetensors"):
            p = out / sub
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        tr = Trainer(cfg, out, data=data)
        tr.fit(resume=False)
    return tr


def final_metrics(tr: Trainer) -> dict[str, dict[str, float]]:
    """The trainer's final evaluation (made when `train.eval_every` is on), else one now."""
    return tr.final_metrics if tr.final_metrics is not None else tr.evaluate()


def with_history(out: Path, result: dict[str, Any]) -> dict[str, Any]:
    """The stage's metrics.json: `result` over what the trainer wrote there (its validation
    history, which the report plots)."""
    f = out / "metrics.json"
    try:
        trained = json.loads(f.read_text()) if f.is_file() else {}
    except json.JSONDecodeError:
        trained = {}
    return {**(trained if isinstance(trained, dict) else {}), **result}


def _write_config(ctx: RunContext, cfg: Config, out: Path) -> Path:
    import yaml

    from ufo.checkpoint import atomic_write_text

    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return out / "config.yaml"


def primary_metrics(ctx: RunContext, metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    return {t: m[ctx.primary(t)] for t, m in metrics.items()}


def all_in_one(ctx: RunContext) -> tuple[list[Path], dict[str, Any]]:
    """All in One, evaluated (metrics.json), and the single-task baselines when enabled."""
    out = ctx.dir("all_in_one")
    cfg = stage_config(ctx.cfg, "all_in_one", ctx.run_dir)
    tr = fit(ctx, cfg, out, ctx.data)
    metrics = final_metrics(tr)
    result: dict[str, Any] = {
        "steps": cfg.train.steps,
        "metrics": metrics,
        "primary": primary_metrics(ctx, metrics),
        "params": {t: tr.model.space.num_params(tr.arch, t) for t in cfg.task_names},
    }
    b = ctx.pipe.baselines
    if b.enabled and len(cfg.tasks) > 1:
        base: dict[str, Any] = {}
        for t in cfg.task_names:
            one = cfg.only(t)
            # 1/T of the All-in-One compute: the task's share of each batch, for as many steps
            batch = cfg.tasks[t].batch or max(1, cfg.train.batch_size // len(cfg.tasks))
            one = one.model_copy(
                update={
                    "train": one.train.model_copy(update={"steps": b.steps or cfg.train.steps, "batch_size": batch})
                }
            )
            ctx.console.print(f"[bold]baseline[/]: {t} alone, {one.train.steps} steps of batch {batch}")
            btr = fit(ctx, one, out / "baselines" / t, {t: ctx.data[t]})
            m = final_metrics(btr)
            base[t] = {"steps": one.train.steps, "batch_size": batch, "metrics": m[t], "primary": m[t][ctx.primary(t)]}
        result["baselines"] = base
    files = [
        out / "model.safetensors",
        _write_config(ctx, cfg, out),
        ctx.write_json(out / "metrics.json", with_history(out, result)),
    ]
    return files, {"primary": result["primary"]}


def task_supernet(ctx: RunContext) -> tuple[list[Path], dict[str, Any]]:
    """Routes learned on top of All in One; the routing map and the routed model's metrics."""
    out = ctx.dir("task_supernet")
    cfg = stage_config(ctx.cfg, "task_supernet", ctx.run_dir)
    tr = fit(ctx, cfg, out, ctx.data)
    metrics = final_metrics(tr)
    result = {
        "steps": cfg.train.steps,
        "metrics": metrics,
        "primary": primary_metrics(ctx, metrics),
        "routes": tr.arch.paths,
        "params": {t: tr.model.space.num_params(tr.arch, t) for t in cfg.task_names},
    }
    files = [
        out / "model.safetensors",
        out / "routes.json",
        out / "routing_map.png",
        _write_config(ctx, cfg, out),
        ctx.write_json(out / "metrics.json", with_history(out, result)),
    ]
    return files, {"primary": result["primary"]}


def subnet_specs(n: int) -> list[str]:
    """The subnets of the metric-vs-parameters curve: smallest, largest and n - 2 random ones."""
    return ["smallest", "largest", *(f"random:{s}" for s in range(n - 2))]


def chip_supernet(ctx: RunContext) -> tuple[list[Path], dict[str, Any]]:
    """The sandwich-rule supernet on the learned routes, and its inherited subnets evaluated."""
    from ufo.model import arch_from_spec
    from ufo.train.slimming import ChipStage

    out = ctx.dir("chip_supernet")
    cfg = stage_config(ctx.cfg, "chip_supernet", ctx.run_dir)
    tr = fit(ctx, cfg, out, ctx.data)
    assert isinstance(tr.stage, ChipStage)
    model, space, routes = tr.eval_model(), tr.model.space, tr.stage.routes
    subnets: dict[str, Any] = {}
    seen = []
    for spec in subnet_specs(ctx.pipe.chip_supernet.eval_subnets):
        arch = arch_from_spec(spec, space, routes)
        if arch in seen:
            continue
        seen.append(arch)
        model.set_arch(arch)
        recalibrate_bn(model, ctx.data, cfg)  # the heads' BN statistics are a blend over subnets
        m = evaluate_tasks(model, ctx.data, cfg)
        subnets[spec] = {
            "arch": arch.model_dump(),
            "metrics": m,
            "primary": primary_metrics(ctx, m),
            "params": {t: space.num_params(arch, t) for t in cfg.task_names},
            "mflops": {t: space.flops(arch, t) / 1e6 for t in cfg.task_names},
        }
    model.set_arch(tr.arch)  # model.safetensors is already written; these statistics are not saved
    result = {
        "steps": cfg.train.steps,
        "routes": routes,
        "subnets": subnets,
        "metrics": subnets["largest"]["metrics"],
        "primary": subnets["largest"]["primary"],
    }
    png = out / "metric_vs_params.png"
    plot_metric_vs_params(ctx, subnets, png)
    files = [
        out / "model.safetensors",
        _write_config(ctx, cfg, out),
        ctx.write_json(out / "metrics.json", with_history(out, result)),
        png,
    ]
    return files, {"primary": result["primary"]}


def plot_metric_vs_params(ctx: RunContext, subnets: dict[str, Any], path: Path) -> None:
    """Per task: primary metric of each inherited subnet against its task model's parameters."""
    from matplotlib.figure import Figure

    tasks = ctx.cfg.task_names
    fig = Figure(figsize=(3.6 * len(tasks), 3.2), layout="constrained")
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, t in zip(axes, tasks):
        pts = sorted((v["params"][t], v["primary"][t], k) for k, v in subnets.items())
        ax.plot([p / 1e3 for p, _, _ in pts], [m for _, m, _ in pts], "o", color="#4c72b0")
        for p, m, k in pts:
            if k in ("smallest", "largest"):
                ax.annotate(k, (p / 1e3, m), fontsize=7, xytext=(3, -9), textcoords="offset points")
        ax.set_xlabel(f"parameters of {t}'s model (thousands)")
        ax.set_ylabel(ctx.primary(t))
        ax.set_title(f"{t} ({ctx.cfg.tasks[t].kind})", fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle("Inherited subnets of the chip supernet (no fine-tuning)", fontsize=10)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
