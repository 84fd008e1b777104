"""Evaluate many subnets of a trained supernet with inherited weights (no fine-tuning).

`ufo eval RUN --arch A --arch B --random N` lands here: every subnet is set on the model, the
heads' BatchNorm statistics are re-estimated for it (`recalibrate_bn`), and each task's protocol
runs. The rows carry each task's exact parameter count and FLOPs, so that metric against size
can be tabulated and plotted (`plot_subnets`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.progress import Progress

from ufo.arch import Arch, SearchSpace
from ufo.config import Config
from ufo.errors import ArchError
from ufo.evaluation.protocol import evaluate_tasks, recalibrate_bn
from ufo.model import UFOModel, arch_from_spec
from ufo.tasks import TaskData, task_class


def subnet_specs(
    space: SearchSpace, routes: dict[str, list[str]] | None, specs: list[str], random: int = 0, seed: int = 0
) -> dict[str, Arch]:
    """Named subnets: each of `specs` (largest, smallest, random:SEED, ARCH.json), then `random`
    more distinct random ones drawn from seeds seed, seed+1, ... (duplicates skipped)."""
    out = {s: arch_from_spec(s, space, routes) for s in specs}
    if random < 0:
        raise ArchError(f"--random must be >= 0, got {random}")
    taken = list(out.values())
    s = seed
    while sum(k.startswith("random:") and k not in specs for k in out) < random:
        if s - seed > 100 * random + 100:
            raise ArchError(f"the search space has fewer than {random} distinct random subnets besides {specs}")
        a = arch_from_spec(f"random:{s}", space, routes)
        if a not in taken:
            out[f"random:{s}"] = a
            taken.append(a)
        s += 1
    return out


def evaluate_subnets(
    model: UFOModel,
    cfg: Config,
    data: dict[str, TaskData],
    archs: dict[str, Arch],
    tasks: list[str] | None = None,
    recalibrate: bool = True,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """One row per subnet: name, arch, per-task params/FLOPs/metrics. Restores the model's arch."""
    tasks = tasks or list(data)
    space, before = model.space, model.arch
    rows = []
    with Progress(disable=not show_progress, transient=True) as bar:
        job = bar.add_task("evaluating subnets", total=len(archs))
        for name, arch in archs.items():
            model.set_arch(arch)
            if recalibrate:
                recalibrate_bn(model, data, cfg, tasks)
            metrics = evaluate_tasks(model, data, cfg, tasks)
            rows.append(
                {
                    "name": name,
                    "arch": arch.model_dump(),
                    "metrics": metrics,
                    "params": {t: space.num_params(arch, t) for t in tasks},
                    "flops": {t: space.flops(arch, t) for t in tasks},
                }
            )
            bar.advance(job)
    model.set_arch(before)
    return rows


def subnets_markdown(rows: list[dict[str, Any]], cfg: Config, tasks: list[str]) -> str:
    """A table: subnet, depth, width, then per task its parameters and primary metric."""
    prim = {t: task_class(cfg.tasks[t].kind).primary for t in tasks}
    head = "| subnet | depth | embed | " + " | ".join(f"{t} params | {t} {prim[t]}" for t in tasks) + " |"
    lines = [head, "|---|---|---|" + "---|---|" * len(tasks)]
    for r in rows:
        cells = [f"{r['params'][t]:,} | {r['metrics'][t][prim[t]]:.4f}" for t in tasks]
        lines.append(f"| {r['name']} | {r['arch']['depth']} | {r['arch']['embed_dim']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_subnets(rows: list[dict[str, Any]], cfg: Config, tasks: list[str], path: str | Path, title: str = "") -> None:
    """Per task: primary metric against parameters (log scale), every subnet a labelled point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.8 * len(tasks), 3.8), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        key = task_class(cfg.tasks[t].kind).primary
        pts = sorted((r["params"][t], r["metrics"][t][key], r["name"]) for r in rows)
        ax.plot([p for p, _, _ in pts], [m for _, m, _ in pts], "o", color="#4c72b0")
        for p, m, n in pts:
            if not n.startswith("random:"):
                ax.annotate(n, (p, m), fontsize=7, xytext=(4, -10), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(f"parameters of {t}'s model (log scale)")
        ax.set_ylabel(key)
        ax.set_title(f"{t} ({cfg.tasks[t].kind})")
        ax.grid(alpha=0.3)
    fig.suptitle(title or "subnets with inherited weights", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
