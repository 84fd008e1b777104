"""`ufo run CONFIG --out RUN_DIR`: the whole UFO pipeline as resumable stages.

all_in_one -> task_supernet -> chip_supernet -> predictors -> search -> extract -> export -> report.
Each stage writes into RUN_DIR/<stage>/ and, last, its `done.json` (see `ufo.run.state`). A
re-run skips the stages that are complete and valid; `from_stage` redoes that stage and every
later one (their folders are cleared first). A training stage that was interrupted resumes from
its checkpoint. An outer progress bar shows the stage; each stage shows its own steps inside it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ufo.checkpoint import atomic_write_text
from ufo.config import Config, PipelineConfig
from ufo.optional import require_extra
from ufo.run import deploy_stages, train_stages
from ufo.run.context import RunContext, stage_section
from ufo.run.state import PipelineError, digest, inputs_of, is_valid, read_record, write_record
from ufo.runlock import locks

StageFn = Callable[[RunContext], tuple[list[Path], dict[str, Any]]]


@dataclass(frozen=True)
class Stage:
    name: str
    run: StageFn
    upstream: tuple[str, ...]
    section: Callable[[Config], Any]  # what the stage's fingerprint hashes besides its upstream stages
    title: str


def _pipe(cfg: Config) -> PipelineConfig:
    return cfg.pipeline or PipelineConfig()


def _data_of(cfg: Config) -> dict[str, Any]:
    return {
        "data_root": cfg.data_root,
        "tasks": {n: t.model_dump(mode="json") for n, t in cfg.tasks.items()},
        "model": cfg.model.model_dump(mode="json"),
        "seed": cfg.seed,
    }


def _report(ctx: RunContext) -> tuple[list[Path], dict[str, Any]]:
    from ufo.report import write_report

    paths = write_report(ctx.run_dir, data=ctx.data)  # the data the stages read: no second read
    return list(paths), {"html": str(paths[0])}


STAGES: tuple[Stage, ...] = (
    Stage(
        "all_in_one",
        train_stages.all_in_one,
        (),
        lambda c: {"train": stage_section(c, "all_in_one"), "baselines": _pipe(c).baselines.model_dump()},
        "All in One: every task in every batch",
    ),
    Stage(
        "task_supernet",
        train_stages.task_supernet,
        ("all_in_one",),
        lambda c: stage_section(c, "task_supernet"),
        "task supernet: learn each task's FFN paths",
    ),
    Stage(
        "chip_supernet",
        train_stages.chip_supernet,
        ("task_supernet",),
        lambda c: {"train": stage_section(c, "chip_supernet"), "eval_subnets": _pipe(c).chip_supernet.eval_subnets},
        "chip supernet: every subnet at once (sandwich rule)",
    ),
    Stage(
        "predictors",
        deploy_stages.predictors,
        ("chip_supernet",),
        lambda c: {
            "predictors": _pipe(c).predictors.model_dump(),
            "tasks": _pipe(c).tasks,
            "backends": {t: _pipe(c).search.budget(t).backend for t in (_pipe(c).tasks or c.task_names)},
        },
        "GP-NAS predictors: accuracy and latency",
    ),
    Stage(
        "search",
        deploy_stages.search,
        ("chip_supernet", "predictors"),
        lambda c: {"search": _pipe(c).search.model_dump(), "tasks": _pipe(c).tasks},
        "search: the best subnet per task under its budget",
    ),
    Stage(
        "extract",
        deploy_stages.extract,
        ("chip_supernet", "search"),
        lambda c: {"tasks": _pipe(c).tasks, "data": _data_of(c)},
        "extract: standalone task models",
    ),
    Stage(
        "export",
        deploy_stages.export,
        ("extract",),
        lambda c: {"export": _pipe(c).export.model_dump(), "tasks": _pipe(c).tasks, "data": _data_of(c)},
        "export: ONNX, parity, latency",
    ),
    Stage(
        "report",
        _report,
        ("all_in_one", "task_supernet", "chip_supernet", "search", "extract", "export"),
        lambda c: {"name": c.name},
        "report: HTML and Markdown",
    ),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
STAGE_EXTRAS = {"predictors": "search", "search": "search", "export": "export"}  # the optional packages they need


def run_folder_hint(path: str | Path) -> str | None:
    """Where the models are, when `path` (a folder, or its missing model.safetensors) is a `ufo run`
    folder given where a model or a `ufo train` run folder is expected; None otherwise."""
    path = Path(path)
    run = path.parent if path.name == "model.safetensors" else path
    training = ("chip_supernet", "task_supernet", "all_in_one")  # latest first; a `ufo train` folder has none
    if not run.is_dir() or (run / "model.safetensors").exists() or not any((run / s).is_dir() for s in training):
        return None
    tasks = sorted(f.name.removesuffix(".safetensors") for f in (run / "extract").glob("*.safetensors"))
    trained = [s for s in training if (run / s / "model.safetensors").is_file()]
    return (
        f"{run} is a `ufo run` folder, not a model: its task models are {run / 'extract'}/<task>.safetensors"
        f" ({', '.join(tasks) if tasks else 'none extracted yet'}); "
        + (f"its trained supernet is {run / trained[0]}" if trained else "no stage has trained a model yet")
    )


def check_stage(name: str | None) -> None:
    if name is not None and name not in STAGE_NAMES:
        raise PipelineError(f"--from {name!r}: unknown stage; the stages are {', '.join(STAGE_NAMES)}")


@locks("out")
def run_pipeline(
    cfg: Config,
    out: str | Path,
    from_stage: str | None = None,
    console: Console | None = None,
    until: str | None = None,
) -> dict[str, Any]:
    """Run every stage of `cfg` into `out` (skipping valid finished ones); returns each stage's record.

    `from_stage` clears that stage and every later one and runs them again; `until` stops after
    the named stage (the rest are left as they are)."""
    check_stage(from_stage)
    check_stage(until)
    console = console or Console()
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    if from_stage is not None:
        for s in STAGES[STAGE_NAMES.index(from_stage) :]:
            if (run_dir / s.name).exists():
                shutil.rmtree(run_dir / s.name)
    stages = STAGES[: STAGE_NAMES.index(until) + 1] if until else STAGES
    for s in stages:  # a missing extra fails now, not after hours of training
        if s.name in STAGE_EXTRAS and read_record(run_dir / s.name) is None:
            require_extra(STAGE_EXTRAS[s.name])
    ctx = RunContext(cfg, run_dir, console)
    records: dict[str, Any] = {}
    t_start = time.perf_counter()
    progress = Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TextColumn("{task.fields[stage]}"),
        TimeElapsedColumn(),
        console=console,
    )
    with progress:
        bar = progress.add_task(f"ufo run {cfg.name}", total=len(stages), stage="")
        for i, s in enumerate(stages):
            progress.update(bar, stage=f"stage {s.name}")
            inputs = inputs_of(run_dir, s.section(cfg), list(s.upstream))
            if is_valid(run_dir, s.name, digest(inputs)):
                console.print(
                    f"[dim]{i + 1}/{len(stages)} {s.name}: done, skipped ({run_dir / s.name / 'done.json'})[/]"
                )
                done = read_record(run_dir / s.name)
                assert done is not None  # is_valid has just read it
                records[s.name] = done.model_dump()
                progress.advance(bar)
                continue
            stale = read_record(run_dir / s.name)
            if stale is not None:  # finished once, but its inputs have changed since: start it over
                console.print(f"{s.name}: its config or upstream stages changed since it finished; running it again")
                shutil.rmtree(run_dir / s.name)
            console.rule(f"[bold]{i + 1}/{len(stages)} {s.title}")
            (run_dir / s.name).mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            files, summary = s.run(ctx)
            rec = write_record(run_dir, s.name, inputs, files, time.perf_counter() - t0, summary)
            records[s.name] = rec.model_dump()
            console.print(f"[green]{s.name}[/] done in {rec.seconds:.0f} s")
            progress.advance(bar)
    console.print(f"pipeline finished in {time.perf_counter() - t_start:.0f} s: {run_dir}")
    return records
