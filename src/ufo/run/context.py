"""What every `ufo run` stage is handed: the experiment, the run folder, the tasks' data (read
once and shared) and the console, plus the stage's derived training config."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from ufo.checkpoint import atomic_write_text
from ufo.config import Config, PipelineConfig, apply_overrides, parse_config
from ufo.tasks import TaskData, task_class

TRAIN_STAGES = ("all_in_one", "task_supernet", "chip_supernet")
UPSTREAM_RUN = {"task_supernet": "all_in_one", "chip_supernet": "task_supernet"}


@dataclass
class RunContext:
    cfg: Config
    run_dir: Path
    console: Console
    _data: dict[str, TaskData] | None = field(default=None, repr=False)

    @property
    def pipe(self) -> PipelineConfig:
        return self.cfg.pipeline or PipelineConfig()

    @property
    def tasks(self) -> list[str]:
        """The tasks searched, extracted and exported."""
        return list(self.pipe.tasks or self.cfg.task_names)

    @property
    def data(self) -> dict[str, TaskData]:
        """Every task's data, built on first use."""
        if self._data is None:
            from ufo.data.build import build_all

            self._data = build_all(self.cfg)
        return self._data

    def dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def primary(self, task: str) -> str:
        return task_class(self.cfg.tasks[task].kind).primary

    def write_json(self, path: Path, obj: Any) -> Path:
        atomic_write_text(path, json.dumps(obj, indent=2, default=str))
        return path


def stage_section(cfg: Config, stage: str) -> dict[str, Any]:
    """The raw config of a training stage before the upstream run is attached: the experiment
    (without `pipeline`) with the stage's steps and overrides, the stage name, and the paths left
    to the router (task supernet) or taken from it (chip supernet). Its hash is the stage's
    config fingerprint, so it does not depend on where the run folder lies."""
    pipe = cfg.pipeline or PipelineConfig()
    s = getattr(pipe, stage)
    data = cfg.model_dump(mode="json")
    data["pipeline"] = None
    if s.steps is not None:
        data["train"]["steps"] = s.steps
    data = apply_overrides(data, list(s.set))
    data["train"]["stage"] = stage
    if stage != "all_in_one":
        data["train"]["arch"] = None
        data["train"]["paths"] = None
    return data


def stage_config(cfg: Config, stage: str, run_dir: Path) -> Config:
    """The Config a training stage runs with: `stage_section` plus `init: {kind: run}` from the
    stage before it (the task supernet starts from All in One, the chip supernet from the task
    supernet)."""
    data = stage_section(cfg, stage)
    if stage in UPSTREAM_RUN:
        data["init"] = {"kind": "run", "path": str(run_dir / UPSTREAM_RUN[stage])}
    data["train"]["ckpt_every"] = min(data["train"]["ckpt_every"], data["train"]["steps"])
    return parse_config(data, f"the {stage} stage of {cfg.name} (pipeline.{stage})")
