"""Task models as Hugging Face-style folders, and `ufo.load`, which opens any model UFO writes.

`save_pretrained(tm, DIR)` writes two files, each atomically:

- `DIR/model.safetensors`: the task-model file of `save_task_model` (a valid safetensors file whose
  manifest holds everything needed to rebuild the model);
- `DIR/config.json`: timm's hub layout (`architecture`, `num_classes`, `num_features`, `model_args`,
  `pretrained_cfg`, `label_names`) plus a `ufo` section (tasks, arch, search space, heads,
  preprocessing, the timm backbone of a student, ufo version, the weights' SHA-256).

A one-task model with the extracted ViT is timm's `ufo_vit`, so `timm.create_model("local-dir:DIR",
pretrained=True)` builds it with its weights (`import ufo.nn` first, to register `ufo_vit`). Several
tasks, or a distilled student's timm backbone, have no `architecture`: timm cannot build those.

The weights are written before config.json, and config.json names their SHA-256: a save cut off
between the two is caught on load, never read as a model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ufo
from ufo.checkpoint import atomic_write_text, check_not_run_folder, read_manifest
from ufo.errors import CheckpointError
from ufo.nn.timm_vit import NAME, vit_kwargs
from ufo.taskmodel import TaskModel, open_task_model, save_task_model

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
FORMAT = "ufo-task-model"


def folder_config(tm: TaskModel, weights_sha256: str) -> dict[str, Any]:
    """config.json of `tm` whose weights have SHA-256 `weights_sha256`."""
    info = tm.info
    task = info.tasks[0]
    cfg: dict[str, Any] = {"model_type": "ufo"}
    if tm.single and info.backbone is None:
        cfg.update(architecture=NAME, model_args=vit_kwargs(info.space, info.arch, task), global_pool="token")
    head = info.heads[task] if tm.single else None
    cfg.update(
        num_classes=tm.pretrained_cfg["num_classes"], num_features=info.feature_dim, pretrained_cfg=tm.timm_cfg()
    )
    if head is not None and head.class_names:
        cfg["label_names"] = head.class_names
    cfg["ufo"] = {
        "format": FORMAT,
        "format_version": 1,
        "ufo_version": ufo.__version__,
        **info.model_dump(mode="json", exclude={"config"}),
        "num_params": tm.num_params(),
        "weights": WEIGHTS,
        "weights_sha256": weights_sha256,
    }
    return cfg


def save_pretrained(tm: TaskModel, path: str | Path) -> Path:
    """Write `tm` to the folder `path` (config.json + model.safetensors); returns the folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file; save_pretrained writes a folder")
    save_task_model(path / WEIGHTS, tm)
    sha = read_manifest(path / WEIGHTS)["weights_sha256"]
    atomic_write_text(path / CONFIG, json.dumps(folder_config(tm, sha), indent=2) + "\n")
    return path


def check_folder(path: Path) -> None:
    """A task-model folder's config.json belongs to its weights (when it has one)."""
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        return
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
    section = cfg.get("ufo") if isinstance(cfg, dict) else None
    if not isinstance(section, dict) or section.get("format") != FORMAT:
        raise CheckpointError(
            f"{cfg_file} has no `ufo` section of format {FORMAT!r}: not written by ufo's save_pretrained"
        )
    want = read_manifest(path / WEIGHTS).get("weights_sha256")
    if section.get("weights_sha256") != want:
        raise CheckpointError(
            f"{cfg_file}: ufo.weights_sha256 does not match {path / WEIGHTS} (the files come "
            "from different saves, or a save was cut off); save the folder again"
        )


def load(
    path: str | Path, tasks: Sequence[str] | None = None, arch: str | None = None, data_root: str | None = None
) -> TaskModel:
    """A TaskModel in eval mode from a save_pretrained folder, a task-model .safetensors file, or a
    `ufo train` run folder / model file (extracted for `tasks`, default all, at `arch`, default
    the run's; `data_root` finds the data that names classes and calibrates thresholds)."""
    path = Path(path)
    check_not_run_folder(path)  # a `ufo run` folder: say where its models are
    if path.is_dir() and not (path / WEIGHTS).is_file() and not (path / CONFIG).is_file():
        raise CheckpointError(
            f"{path} has no {CONFIG} and no {WEIGHTS}: not a saved task-model folder "
            "(save_pretrained) nor a `ufo train` run folder"
        )
    return open_task_model(path, tasks, arch, data_root).eval()
