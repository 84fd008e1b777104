"""All-in-One benchmark: one backbone for the whole suite against one model per task, on CPU.

The suite is `configs/suite.yaml` over ../shared/data (ORL verification, Omniglot retrieval, GTSRB
classification, GTSRB-tracks reid, Alphadigits classification). Every run uses the same recipe
and the same number of optimiser steps with the same global batch, so the All-in-One run costs
1/T of the T single-task baselines together (each baseline is `ufo train --only TASK`, i.e.
`Config.only`). Runs:

1. All in One, heterogeneous batches (every task in every step), from scratch;
2. All in One, one task per step (round-robin), from scratch: the batch ablation;
3. each task alone (the baselines);
4. a SimMIM pre-training stage on the suite's images (no labels), then (1) from that init;
5. training throughput of the All-in-One step against a timm ViT of the same shape in the same
   loop (same data, heads, losses and optimiser), timed in alternating rounds.

Writes bench/results/allinone.{json,md} and allinone.png (per task: single-task vs All in One).
Run from the repository root: `.venv/bin/python bench/allinone.py [--quick] [--steps N]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from _common import RESULTS_DIR, compare, load_average, target, time_interleaved, write_results
from ufo.config import Config, load_config
from ufo.data.build import build_all
from ufo.nn.extract import build_vit
from ufo.tasks import TaskData, task_class
from ufo.train.engine import Engine
from ufo.train.loop import Trainer
from ufo.train.optim import build_optimizer
from ufo.train.stage import TrainStep

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "configs" / "suite.yaml"
# Steps per run. At the suite's 1,200 the All-in-One run gives each task ~20 images a step, 1/5 of a
# baseline's, and stops far short of convergence (alnum 0.52, signs 0.11 top-1); 2,400 keeps the
# whole benchmark near 30 minutes on 2 quiet cores.
DEFAULT_STEPS = 2400


def suite_config(steps: int, extra: list[str]) -> Config:
    return load_config(SUITE, [f"train.steps={steps}", "train.log_every=25", f"train.ckpt_every={steps}", *extra])


def run(name: str, cfg: Config, data: dict[str, TaskData], out: Path) -> dict[str, Any]:
    """Train one config on (a subset of) the prepared data; evaluate every task it has."""
    print(
        f"\n== {name}: tasks {cfg.task_names}, {cfg.train.steps} steps, sampler {cfg.train.sampler}, "
        f"init {cfg.init.kind}"
    )
    t0 = time.perf_counter()
    trainer = Trainer(cfg, out / name, data={n: data[n] for n in cfg.task_names})
    summary = trainer.fit()
    train_s = time.perf_counter() - t0
    metrics = trainer.evaluate()
    primary = {n: metrics[n][task_class(cfg.tasks[n].kind).primary] for n in cfg.task_names}
    print(
        f"   {train_s:.0f} s, {summary['images_per_s']:.0f} images/s: "
        + ", ".join(f"{n} {v:.4f}" for n, v in primary.items())
    )
    return {"primary": primary, "metrics": metrics, "train_s": train_s, "images_per_s": summary["images_per_s"]}


class TimmBackbone(nn.Module):
    """A timm VisionTransformer standing in for the supernet: same call, same output."""

    def __init__(self, vit: nn.Module, tasks: list[str]) -> None:
        super().__init__()
        self.vit, self.tasks = vit, tasks

    def forward(self, x: torch.Tensor, task: Any) -> torch.Tensor:
        return self.vit.forward_features(x)[:, 0]

    def no_weight_decay(self) -> set[str]:
        return {f"vit.{n}" for n in self.vit.no_weight_decay()}


def throughput(cfg: Config, data: dict[str, TaskData], out: Path, rounds: int) -> dict[str, Any]:
    """images/s of the All-in-One train step, UFO supernet vs a timm ViT of the same shape."""
    ufo = Trainer(cfg, out / "tp-ufo", data=data, show_progress=False)
    ref = Trainer(cfg, out / "tp-timm", data=data, show_progress=False)
    space, arch = ref.model.space, ref.arch
    vit = build_vit(space, arch, space.tasks[0])
    vit.init_weights()
    ref.model.backbone = TimmBackbone(vit, list(space.tasks)).to(ref.device)  # beside the heads (a GPU's)
    ref.step_module = TrainStep(ref.model)
    ref.engine = Engine(ref.model, build_optimizer(ref.model, cfg), ref.device)
    times = time_interleaved({"ufo": ufo.train_step, "timm": ref.train_step}, repeats=rounds, warmup=3)
    c = compare(times, "timm", "ufo")  # ratio = timm step time / UFO step time
    batch = cfg.train.batch_size
    return {
        "batch": batch,
        "ufo_images_per_s": batch / (c["ufo_ms"]["median"] / 1e3),
        "timm_images_per_s": batch / (c["timm_ms"]["median"] / 1e3),
        "ufo_over_timm_throughput": c["ratio"],
        "step_ms": c,
    }


def bar_chart(results: dict[str, Any], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [
        ("single-task", results["single"]),
        ("All in One (hetero)", results["allinone_hetero"]),
        ("All in One (one task/step)", results["allinone_round_robin"]),
    ]
    if "allinone_mim" in results:
        series.append(("All in One (MIM init)", results["allinone_mim"]))
    fig, ax = plt.subplots(figsize=(11, 4))
    w = 0.8 / len(series)
    for k, (label, per_task) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * w for i in range(len(tasks))]
        ax.bar(xs, [per_task[t] for t in tasks], w, label=label)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([f"{t}\n({results['primary_metric'][t]})" for t in tasks])
    ax.set_ylabel("primary metric (higher is better)")
    ax.set_ylim(0, 1.05)
    ax.set_title("UFO All in One vs one model per task (same steps; All in One uses 1/T of the compute)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps per run, to check the script")
    p.add_argument("--steps", type=int, default=None, help=f"optimiser steps per run (default {DEFAULT_STEPS})")
    p.add_argument("--mim-steps", type=int, default=None, help="MIM pre-training steps (default: half the steps)")
    p.add_argument("--no-mim", action="store_true", help="skip the MIM pre-training comparison")
    p.add_argument("--set", action="append", default=[], help="extra config override, e.g. train.lr=2e-3")
    args = p.parse_args()
    steps = args.steps or (6 if args.quick else DEFAULT_STEPS)
    mim_steps = args.mim_steps or (4 if args.quick else steps // 2)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t_start = time.perf_counter()
    load_before = load_average()

    cfg = suite_config(steps, args.set)
    data = build_all(cfg)
    tasks = cfg.task_names
    kinds = {n: cfg.tasks[n].kind for n in tasks}
    results: dict[str, Any] = {
        "quick": args.quick,
        "steps_per_run": steps,
        "batch_size": cfg.train.batch_size,
        "model": {k: v for k, v in cfg.model.model_dump().items() if k not in ("mean", "std", "paths")},
        "train_images": {n: len(data[n].train) for n in tasks},
        "kinds": kinds,
        "primary_metric": {n: task_class(kinds[n]).primary for n in tasks},
    }
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ufo-allinone-") as tmp:
        out = Path(tmp)
        runs["allinone_hetero"] = run("allinone-hetero", cfg, data, out)
        rr = cfg.model_copy(update={"train": cfg.train.model_copy(update={"sampler": "round_robin"})})
        runs["allinone_round_robin"] = run("allinone-round_robin", rr, data, out)
        for t in tasks:
            runs[f"single_{t}"] = run(f"single-{t}", cfg.only(t), data, out)
        if not args.no_mim:
            runs["mim_pretrain_s"] = mim_pretrain(cfg, data, out, mim_steps)
            mim = suite_config(steps, [*args.set, "init.kind=mim", f"init.path={out / 'mim'}"])
            runs["allinone_mim"] = run("allinone-mim-init", mim, data, out)
        tp = throughput(cfg, data, out, rounds=3 if args.quick else 20)

    results["single"] = {t: runs[f"single_{t}"]["primary"][t] for t in tasks}
    results["allinone_hetero"] = runs["allinone_hetero"]["primary"]
    results["allinone_round_robin"] = runs["allinone_round_robin"]["primary"]
    if "allinone_mim" in runs:
        results["allinone_mim"] = runs["allinone_mim"]["primary"]
        results["mim_pretrain_s"] = runs["mim_pretrain_s"]
    results["delta_hetero_vs_single"] = {t: results["allinone_hetero"][t] - results["single"][t] for t in tasks}
    results["delta_hetero_vs_round_robin"] = {
        t: results["allinone_hetero"][t] - results["allinone_round_robin"][t] for t in tasks
    }
    results["all_metrics"] = {k: v["metrics"] for k, v in runs.items() if isinstance(v, dict)}
    results["train_s"] = {k: round(v["train_s"], 1) for k, v in runs.items() if isinstance(v, dict)}
    single_total = sum(runs[f"single_{t}"]["train_s"] for t in tasks)
    results["compute"] = {
        "allinone_train_s": round(runs["allinone_hetero"]["train_s"], 1),
        "singles_total_train_s": round(single_total, 1),
        "allinone_share_of_singles": runs["allinone_hetero"]["train_s"] / single_total,
    }
    results["throughput"] = tp
    results["load_average"] = {"before": load_before, "after": load_average()}
    results["wall_s"] = round(time.perf_counter() - t_start, 1)

    wins = sum(results["allinone_hetero"][t] >= results["single"][t] for t in tasks)
    targets = [
        target("tasks where All in One >= its single-task baseline (1/T of the compute)", wins, ">=", 4),
        target(
            "training throughput, UFO supernet / timm ViT of the same shape (same loop)",
            tp["ufo_over_timm_throughput"],
            ">=",
            1 / 1.15,
        ),
    ]
    png = RESULTS_DIR / "allinone.png"
    bar_chart(results, tasks, png)
    results["plot"] = png.name
    jpath, mpath = write_results(
        "allinone", results, targets, command=".venv/bin/python bench/allinone.py" + (" --quick" if args.quick else "")
    )
    _append_table(mpath, results, tasks)
    for t in targets:
        print(f"{'met ' if t['met'] else 'MISS'}  {t['name']}: {t['value']:.4g} {t['op']} {t['target']:.4g}")
    print(f"wrote {jpath}, {mpath} and {png} in {results['wall_s']:.0f} s")


def mim_pretrain(cfg: Config, data: dict[str, TaskData], out: Path, steps: int) -> float:
    """SimMIM pre-training on every task's training images (labels unused); returns seconds."""
    mim_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"stage": "pretrain_mim", "steps": steps})})
    print(f"\n== mim pre-training: {steps} steps on {sum(len(d.train) for d in data.values())} images")
    t0 = time.perf_counter()
    Trainer(mim_cfg, out / "mim", data=data).fit()
    return round(time.perf_counter() - t0, 1)


def _append_table(path: Path, results: dict[str, Any], tasks: list[str]) -> None:
    """The per-task comparison, first in the markdown file, as people read it."""
    cols = [
        ("single-task", "single"),
        ("All in One hetero", "allinone_hetero"),
        ("All in One one-task/step", "allinone_round_robin"),
    ]
    if "allinone_mim" in results:
        cols.append(("All in One MIM init", "allinone_mim"))
    lines = [
        "## Per task (primary metric, test split)",
        "",
        "| task | kind | metric | " + " | ".join(c for c, _ in cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for t in tasks:
        best = max(results[k][t] for _, k in cols)
        cells = [f"**{results[k][t]:.4f}**" if results[k][t] == best else f"{results[k][t]:.4f}" for _, k in cols]
        lines.append(f"| {t} | {results['kinds'][t]} | {results['primary_metric'][t]} | " + " | ".join(cells) + " |")
    tp = results["throughput"]
    lines += [
        "",
        f"Throughput (batch {tp['batch']}, same loop): UFO {tp['ufo_images_per_s']:.0f} images/s, "
        f"timm ViT {tp['timm_images_per_s']:.0f} images/s.",
        "",
        f"![per-task bars]({results['plot']})",
        "",
    ]
    text = path.read_text()
    head, sep, rest = text.partition("## Targets")
    path.write_text(head + "\n".join(lines) + "\n" + sep + rest)


if __name__ == "__main__":
    main()
