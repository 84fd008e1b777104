"""Task metrics of subnets with inherited weights, and datasets of them for accuracy predictors.

A trained run (a chip supernet, or any run) is loaded once; every subnet is activated with
`set_arch` on the run's frozen routes and evaluated by its task's own protocol on the task's
eval split, with the weights it inherits from the supernet and nothing re-trained. The ViT has
LayerNorm only; the identity heads' BN-neck statistics are re-estimated for each subnet before
it is scored (`ufo.evaluation.protocol.recalibrate_bn`). `MetricDataset` saves (arch, metric)
pairs to JSON with the space, task and run they came from.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ufo.arch import Arch, SearchSpace
from ufo.config import Config
from ufo.errors import SearchError
from ufo.evaluation.predict import make_predict
from ufo.evaluation.protocol import evaluate_task, recalibrate_bn
from ufo.model import UFOModel
from ufo.search.dataset import ArchDataset
from ufo.search.latency import sample_archs, task_arch
from ufo.tasks import TaskData, task_class


def file_digest(path: str | Path) -> str:
    """sha256 prefix of a file: ties metric data and predictors to the exact weights they came from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


class TrainedRun:
    """A trained run loaded once for evaluating many subnets of one task: model, config, the
    task's data, its primary metric and the run's frozen routes. The model sits on `device` (as
    `train.device`; auto: the GPU when there is one), where every subnet is evaluated."""

    def __init__(
        self,
        run_dir: str | Path,
        task: str,
        data_root: str | None = None,
        with_data: bool = True,
        device: str = "auto",
    ) -> None:
        from ufo.data.build import build_task_data
        from ufo.model import load_model
        from ufo.taskmodel import model_file
        from ufo.train.distributed import device as resolve_device

        self.device = resolve_device(device)  # first: a cuda asked for where there is none fails before any work
        self.run_dir = Path(run_dir)
        self.model_path = model_file(run_dir)
        if not self.model_path.is_file():
            raise SearchError(f"{self.model_path} not found: give a run folder written by `ufo train`")
        model, cfg, _ = load_model(self.model_path)
        if data_root is not None:
            cfg.data_root = data_root
        if task not in cfg.tasks:
            raise SearchError(f"unknown task {task!r}; the run {run_dir} has tasks {cfg.task_names}")
        self.model: UFOModel = model.to(self.device).eval()
        self.cfg: Config = cfg
        self.task = task
        self.space: SearchSpace = model.space
        self.routes: dict[str, list[str]] = model.backbone.routes()
        self.metric: str = task_class(cfg.tasks[task].kind).primary
        self.data: TaskData | None = build_task_data(task, cfg.tasks[task], cfg) if with_data else None
        self.digest = file_digest(self.model_path)
        # the eval transform of each image set is computed once: every subnet sees the same inputs
        self.predict = make_predict(model, task, cfg, cfg.train.eval_batch_size, cache={})

    def arch(self, arch: Arch) -> Arch:
        """`arch` on the run's frozen route for this task (its own paths for the task if it has them)."""
        if self.task not in arch.paths:
            arch = arch.model_copy(update={"paths": {**arch.paths, self.task: self.routes[self.task][: arch.depth]}})
        return task_arch(self.space, arch, self.task)

    def sample(self, n: int, seed: int, exclude: list[Arch] | None = None, extremes: bool = True) -> list[Arch]:
        """`n` distinct subnets on the run's routes (largest and smallest first with `extremes`)."""
        return sample_archs(self.space, self.task, n, seed, self.routes, exclude, extremes)

    def task_data(self) -> TaskData:
        """The task's data (SearchError when the run was loaded without it)."""
        if self.data is None:
            raise SearchError(f"run {self.run_dir} was loaded without its data; load it with with_data=True")
        return self.data

    def evaluate(self, arch: Arch) -> dict[str, float]:
        """The task's metrics with `arch` active and the inherited weights (the model is left at `arch`).

        The head's BatchNorm statistics (identity tasks' BN-neck) are re-estimated for `arch` first,
        as `ufo eval --arch` and the extracted task model do, so the predictor learns the metric
        that the extracted subnet will have."""
        data = self.task_data()
        self.model.set_arch(self.arch(arch))
        recalibrate_bn(self.model, {self.task: data}, self.cfg, [self.task])
        self.model.eval()
        return evaluate_task(self.predict, self.model.head(self.task), data, self.cfg.seed)

    def evaluate_many(
        self, archs: list[Arch], progress: bool = True, description: str | None = None
    ) -> list[dict[str, float]]:
        """`evaluate` of each arch, with a progress bar."""
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=not progress,
        )
        out = []
        with bar:
            job = bar.add_task(description or f"evaluate {self.task} ({self.metric})", total=len(archs))
            for a in archs:
                out.append(self.evaluate(a))
                bar.advance(job)
        return out


class MetricRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: Arch
    value: float  # the primary metric
    metrics: dict[str, float] = Field(default_factory=dict)


class MetricDataset(ArchDataset):
    """Subnets of one run evaluated on one task: (arch, primary metric) records, with the space,
    the run and its weights' digest, and the eval split they were scored on."""

    what = "metric dataset"

    kind: str = "ufo-metric-dataset"
    metric: str
    run: str
    model_digest: str
    split: str = "eval"
    seed: int = 0
    eval_s: float = 0.0
    records: list[MetricRecord] = Field(default_factory=list)

    def targets(self) -> np.ndarray:
        """(N,) primary metric of each arch."""
        return np.array([r.value for r in self.records], dtype=np.float64)


def collect_metrics(
    run: TrainedRun, n: int, seed: int = 0, progress: bool = True, archs: list[Arch] | None = None
) -> MetricDataset:
    """Evaluate `n` subnets of `run` (the largest, the smallest and seeded samples on the run's
    routes; or `archs`) on its task with inherited weights, into a `MetricDataset`."""
    archs = [run.arch(a) for a in archs] if archs is not None else run.sample(n, seed)
    t0 = time.perf_counter()
    ms = run.evaluate_many(archs, progress)
    splits = "+".join(run.task_data().eval)
    return MetricDataset(
        space=run.space,
        task=run.task,
        metric=run.metric,
        run=str(run.run_dir),
        model_digest=run.digest,
        split=splits,
        seed=seed,
        eval_s=round(time.perf_counter() - t0, 2),
        records=[MetricRecord(arch=a, value=m[run.metric], metrics=m) for a, m in zip(archs, ms)],
    )


def metric_estimator(y: np.ndarray, seed: int = 0) -> Any:
    """The unfitted GP predictor `fit_metric_predictor` fits on metrics `y`: logit target when every
    value lies strictly inside (0, 1), a linear mean on log parameters, Matern smoothness by
    marginal likelihood."""
    from ufo.search.features import LOG_PARAMS
    from ufo.search.predictor import GPPredictor

    logit = bool(np.all((y > 0) & (y < 1)))
    return GPPredictor(nu="auto", logit_target=logit, mean_cols=(LOG_PARAMS,), random_state=seed)


def fit_metric_predictor(ds: MetricDataset, folds: int = 5, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """Fit a GP predictor of the task metric on `ds` and return it with the manifest `meta` to
    save it with.

    A metric strictly inside (0, 1) (accuracy, mAP, recall@k) is fitted in logit space. The linear
    mean uses log parameters alone (`ufo.search.features.LOG_PARAMS`): a subnet's capacity is the
    strongest single sign of its metric, and one coefficient is learnt reliably from 20 subnets,
    where a ridge on all 40 features is not. The Matern smoothness is chosen by marginal likelihood
    (`nu="auto"`). With at least `2 * folds` subnets `meta["cv"]` holds `folds`-fold
    cross-validated Kendall tau and MAPE, which the quality flag (`ufo.flags`) reads.
    """
    from ufo.search.features import FEATURES
    from ufo.search.predictor import cross_validate

    X, y = ds.features(), ds.targets()
    est = metric_estimator(y, seed)
    cv = cross_validate(est, X, y, folds, seed) if len(ds) >= 2 * folds else None
    gp = est.fit(X, y)
    meta = {
        "target": ds.metric,
        "task": ds.task,
        "run": ds.run,
        "model_digest": ds.model_digest,
        "n": len(ds),
        "features": FEATURES,
        "target_transform": "logit" if gp.logit_target else "identity",
        "nu": gp.nu_,
        "cv": None if cv is None else {k: v for k, v in cv.items() if k != "predictions"},
    }
    return gp, meta
