"""`ufo eval RUN_DIR`: every task's protocol on a trained run, or on subnets of it with inherited
weights, written beside the run (eval.json / eval.md, eval-NAME.*, eval-subnets.* and a plot)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ufo.checkpoint import atomic_write_text
from ufo.evaluation.protocol import evaluate_tasks
from ufo.evaluation.subnets import evaluate_subnets, plot_subnets, subnet_specs, subnets_markdown
from ufo.model import load_model


@dataclass
class RunEvaluation:
    """What `evaluate_run` wrote: the JSON file (the .md and, for several subnets, the .png beside
    it), the Markdown table, how many subnets were evaluated (0: the run's own arch) and, for one
    model, the (task, kind, metrics) rows of the table."""

    json_path: Path
    markdown: str
    subnets: int = 0
    rows: list[tuple[str, str, str]] = field(default_factory=list)


def evaluate_run(
    run_dir: str | Path,
    archs: list[str] | None = None,
    random: int = 0,
    tasks: list[str] | None = None,
    data_root: str | None = None,
    recalibrate_bn: bool = True,
    device: str | torch.device = "cpu",
) -> RunEvaluation:
    """Evaluate the run's model (`eval.*`), one subnet (`eval-NAME.*`) or several (`eval-subnets.*`
    and a plot of metric against parameters). `archs` are ARCH.json, largest, smallest or
    random:SEED; `random` adds that many random subnets. With `recalibrate_bn` each subnet's head
    BatchNorm statistics are re-estimated on training images first (as Once-for-All does). The model,
    the BN re-estimation and every subnet run on `device` (`ufo eval --device` resolves auto to the
    GPU when there is one); the metrics are computed from outputs on the CPU either way."""
    from ufo.data.build import build_task_data

    run_dir = Path(run_dir)
    model, cfg, _manifest = load_model(run_dir / "model.safetensors")
    model.to(device)
    if data_root is not None:
        cfg.data_root = data_root
    tasks = tasks or cfg.task_names
    specs = subnet_specs(model.space, model.backbone.routes(), list(archs or []), random, seed=cfg.seed)
    data = {n: build_task_data(n, cfg.tasks[n], cfg) for n in tasks}
    if len(specs) > 1:
        subnet_rows = evaluate_subnets(model, cfg, data, specs, tasks, recalibrate_bn)
        payload = {"run": str(run_dir), "recalibrate_bn": recalibrate_bn, "subnets": subnet_rows}
        atomic_write_text(run_dir / "eval-subnets.json", json.dumps(payload, indent=2))
        md = subnets_markdown(subnet_rows, cfg, tasks)
        atomic_write_text(run_dir / "eval-subnets.md", md)
        plot_subnets(
            subnet_rows, cfg, tasks, run_dir / "eval-subnets.png", f"{run_dir.name}: subnets, inherited weights"
        )
        return RunEvaluation(run_dir / "eval-subnets.json", md, len(subnet_rows))
    if specs:
        ((name, a),) = specs.items()
        results = evaluate_subnets(model, cfg, data, specs, tasks, recalibrate_bn, show_progress=False)[0]["metrics"]
        name = f"eval-{Path(name).stem.replace(':', '-')}"
    else:
        a, name = model.arch, "eval"
        results = evaluate_tasks(model, data, cfg, tasks)
    payload = {"run": str(run_dir), "arch": a.model_dump(), "metrics": results}
    atomic_write_text(run_dir / f"{name}.json", json.dumps(payload, indent=2))
    rows = [(n, cfg.tasks[n].kind, ", ".join(f"{k} {v:.4f}" for k, v in m.items())) for n, m in results.items()]
    md = "\n".join(["| task | kind | metrics |", "|---|---|---|", *(f"| {n} | {k} | {t} |" for n, k, t in rows)]) + "\n"
    atomic_write_text(run_dir / f"{name}.md", md)
    return RunEvaluation(run_dir / f"{name}.json", md, len(specs), rows)
