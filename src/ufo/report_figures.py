"""The run report's figures that are drawn when the report is written (`ufo.report`):

- training curves per training stage: the loss from its metrics.csv and each task's primary
  validation metric from the history in its metrics.json, against the step;
- one evaluation figure per task from the final models on the test split: a confusion matrix
  (classification), a ROC curve (verification), a CMC curve (re-identification), Recall@K
  (retrieval). The data comes from each task kind's `curves()` (ufo.tasks), run on the extracted
  task models, or on the last trained stage's model when nothing was extracted yet, and is kept
  in RUN/report/curves.json until those model files change.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ufo.checkpoint import atomic_write, atomic_write_text, read_manifest
from ufo.errors import UFOError
from ufo.tasks import TaskData

TRAIN_STAGES = ("all_in_one", "task_supernet", "chip_supernet")
Figure = tuple[str, str, Path]  # (section, caption, PNG file)


def _save(fig: Any, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path


def _integer_x(ax: Any) -> None:
    """Steps, ranks and K are whole numbers."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


# ----- training curves -----


def read_losses(stage_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Column -> (step, value) of every loss column of a stage's metrics.csv that has values."""
    f = stage_dir / "metrics.csv"
    if not f.is_file():
        return {}
    out: dict[str, list[tuple[int, float]]] = {}
    with open(f, newline="") as fh:
        for row in csv.DictReader(fh):
            for k, v in row.items():
                if k and (k == "loss" or k.startswith("loss/")) and v not in ("", None):
                    out.setdefault(k, []).append((int(row["step"]), float(v)))
    return out


def plot_training(
    stage: str, losses: dict[str, list[tuple[int, float]]], metrics: dict[str, Any] | None, path: Path
) -> Path:
    """Loss against step (the total thick, each task's thin) and, when the stage validated, each
    task's primary metric against step."""
    from matplotlib.figure import Figure as MplFigure

    history = {int(s): m for s, m in ((metrics or {}).get("history") or {}).items()}
    keys = (metrics or {}).get("primary_metric") or {}
    fig = MplFigure(figsize=(9.6 if history else 5.0, 3.2), layout="constrained")
    axes = fig.subplots(1, 2 if history else 1, squeeze=False)[0]
    ax = axes[0]
    for k, pts in losses.items():
        ax.plot(
            [s for s, _ in pts],
            [v for _, v in pts],
            lw=2.2 if k == "loss" else 1.0,
            label="total" if k == "loss" else k[5:],
        )
    ax.set_xlabel("step")
    _integer_x(ax)
    ax.set_ylabel("training loss")
    ax.legend(fontsize=7, frameon=False)
    ax.grid(alpha=0.3)
    if history:
        ax = axes[1]
        steps = sorted(history)
        for t, key in keys.items():
            pts = [(s, history[s][t][key]) for s in steps if key in history[s].get(t, {})]
            ax.plot([s for s, _ in pts], [v for _, v in pts], "o-", ms=3, label=f"{t} {key}")
        ax.set_xlabel("step")
        _integer_x(ax)
        ax.set_ylabel("validation (primary metric)")
        ax.legend(fontsize=7, frameon=False)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{stage}: training loss and validation", fontsize=10)
    return _save(fig, path)


def training_figures(run_dir: Path, out: Path) -> list[Figure]:
    """One figure per training stage that logged a loss."""
    figs = []
    for stage in TRAIN_STAGES:
        losses = read_losses(run_dir / stage)
        if not losses:
            continue
        try:
            metrics = json.loads((run_dir / stage / "metrics.json").read_text())
        except (OSError, json.JSONDecodeError):
            metrics = None
        png = plot_training(stage, losses, metrics, out / f"training_{stage}.png")
        what = "loss against step" + (
            ", validation primary metric against step"
            if (metrics or {}).get("history")
            else " (no validation history: train.eval_every 0)"
        )
        figs.append(("Training curves", f"{stage}: {what}", png))
    return figs


# ----- the final models' evaluation figures -----


def _models(run_dir: Path, run: dict[str, Any]) -> tuple[str, dict[str, Path]]:
    """(what is evaluated, task -> model file): the extracted task models, else the last trained
    stage's model for every task."""
    ext = run.get("extract") or {}
    if ext:
        return "extracted task model", {t: run_dir / e["file"] for t, e in ext.items() if "file" in e}
    for stage in reversed(TRAIN_STAGES):
        f = run_dir / stage / "model.safetensors"
        if f.is_file():
            return f"{stage} model at its training arch", dict.fromkeys(run["cfg"]["tasks"], f)
    return "", {}


def _key(files: dict[str, Path]) -> dict[str, list]:
    """What the cached curves depend on: each model file's name, size and modification time."""
    return {t: [str(f), f.stat().st_size, f.stat().st_mtime_ns] for t, f in files.items()}


def compute_curves(
    run_dir: Path, run: dict[str, Any], files: dict[str, Path], data: dict[str, TaskData] | None = None
) -> dict[str, Any]:
    """Task -> its kind's `curves()` on the test split, from the model file given for it."""
    from ufo.config import parse_config
    from ufo.evaluation.predict import make_predict
    from ufo.evaluation.protocol import head_protocol
    from ufo.model import load_model
    from ufo.taskmodel import load_task_data, load_task_model

    cfg = parse_config(run["cfg"], str(run_dir / "config.yaml"))
    tasks = [t for t in files if t in cfg.tasks]
    data = data if data is not None and all(t in data for t in tasks) else load_task_data(cfg, tasks)
    out: dict[str, Any] = {}
    loaded: dict[Path, Any] = {}
    for t in (t for t in tasks if t in data):  # a task whose data cannot be read is left out (warned)
        f = files[t]
        if read_manifest(f).get("kind") != "ufo_model":  # an extracted task model
            tm = load_task_model(f)
            proto = head_protocol(t, tm.info.heads[t])
            out[t] = proto.curves(make_predict(tm, t, cfg, cfg.train.eval_batch_size), data[t], seed=cfg.seed)
        else:
            model = loaded.get(f) or loaded.setdefault(f, load_model(f)[0])
            out[t] = model.heads[t].curves(
                make_predict(model, t, cfg, cfg.train.eval_batch_size), data[t], seed=cfg.seed
            )
    return {t: c for t, c in out.items() if c is not None}


def task_curves(
    run_dir: Path, run: dict[str, Any], out: Path, data: dict[str, TaskData] | None = None
) -> tuple[str, dict[str, Any], str | None]:
    """(source, task -> curve data, a note when none could be computed), cached in out/curves.json."""
    source, files = _models(run_dir, run)
    if not files:
        return "", {}, "no trained model in the run folder yet"
    cache = out / "curves.json"
    key = _key(files)
    if cache.is_file():
        try:
            old = json.loads(cache.read_text())
            if old.get("key") == key:
                return old["source"], old["tasks"], None
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    try:
        curves = compute_curves(run_dir, run, files, data)
    except (UFOError, OSError) as e:
        return source, {}, f"task curves not computed: {' '.join(str(e).split())}"
    atomic_write_text(cache, json.dumps({"key": key, "source": source, "tasks": curves}))
    return source, curves, None


def plot_confusion(ax: Any, c: dict[str, Any]) -> str:
    import numpy as np

    m = np.asarray(c["matrix"], dtype=float)
    share = m / np.maximum(m.sum(1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    n = len(c["classes"])
    if n <= 15:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{int(m[i, j])}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if share[i, j] > 0.5 else "black",
                    )
    ticks = range(n)
    ax.set_xticks(ticks, c["classes"], rotation=90, fontsize=6)
    ax.set_yticks(ticks, c["classes"], fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    kept = f"; the {c['kept']} of {c['total']} classes with the most errors" if c["kept"] < c["total"] else ""
    return f"confusion matrix (row-normalised colour, counts{kept})"


def plot_roc(ax: Any, c: dict[str, Any]) -> str:
    ax.plot(c["fpr"], c["tpr"], lw=1.5, label=f"AUC {c['auc']:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
    p = c["at_threshold"]
    ax.plot([p["fpr"]], [p["tpr"]], "o", color="#dd8452", label=f"threshold {c['threshold']:.3f}")
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    return "ROC curve of the scored pairs, the protocol's threshold marked"


def _rate_curve(ax: Any, x: list[int], y: list[float], xlabel: str, ylabel: str) -> None:
    """A rate (0 to 1) against a whole number (rank, K)."""
    ax.plot(x, y, "o-", ms=3)
    ax.set_xlabel(xlabel)
    _integer_x(ax)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)


def plot_cmc(ax: Any, c: dict[str, Any]) -> str:
    _rate_curve(ax, c["ranks"], c["cmc"], "rank", "matching rate (CMC)")
    return f"CMC curve (mAP {c['metrics'].get('mAP', float('nan')):.3f})"


def plot_recall(ax: Any, c: dict[str, Any]) -> str:
    _rate_curve(ax, c["ks"], c["recall"], "K", "Recall@K")
    return "Recall@K (leave-one-out retrieval on unseen classes)"


PLOTS: dict[str, Callable[[Any, dict[str, Any]], str]] = {
    "confusion_matrix": plot_confusion,
    "roc": plot_roc,
    "cmc": plot_cmc,
    "recall_at_k": plot_recall,
}


def curve_figures(
    run_dir: Path, run: dict[str, Any], out: Path, data: dict[str, TaskData] | None = None
) -> tuple[list[Figure], list[str]]:
    """(one figure per task with curve data, notes for the page)."""
    from matplotlib.figure import Figure as MplFigure

    source, curves, note = task_curves(run_dir, run, out, data)
    figs = []
    for t, c in curves.items():
        draw = PLOTS.get(c.get("figure"))
        if draw is None:
            continue
        big = c["figure"] == "confusion_matrix" and len(c["classes"]) > 10
        fig = MplFigure(figsize=(5.6, 5.0) if big else (4.4, 3.4), layout="constrained")
        what = draw(fig.add_subplot(), c)
        fig.suptitle(f"{t} ({run['cfg']['tasks'][t]['kind']})", fontsize=10)
        figs.append(("Task evaluation", f"{t}: {what}; {source} on the test split", _save(fig, out / f"eval_{t}.png")))
    return figs, [note] if note else []
