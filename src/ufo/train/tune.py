"""One task's training loop, for distillation (`ufo distill`) and extension (`ufo extend`).

The module trains where its parameters are (the callers place it on `recipe.device`: the GPU when
there is one), with bf16 autocast when `recipe.amp` says so.

The supernet Trainer's step and loop (`ufo.train.engine`) for a single task and any module:
batches from the MixedTaskSampler (P x K for identity tasks), the task's own augmentations,
warm-up + cosine LR, gradient clipping, a rich progress bar, `metrics.csv`, and atomic checkpoints
(`checkpoints/latest.safetensors`) that resume exactly: weights, optimiser, torch RNG and sampler
position. The caller supplies `loss_fn(x, y) -> {name: loss}`; the sum is minimised, and a
non-finite loss stops the run (`TuneError`; the last checkpoint is kept).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ufo.arch import as_hw
from ufo.checkpoint import read_manifest
from ufo.config import Config, TrainConfig
from ufo.data.loader import Feed, MixedLoader
from ufo.data.sampler import MixedTaskSampler, TaskSource, pk_capacity
from ufo.errors import CheckpointError, UFOError
from ufo.tasks import TaskData
from ufo.train.engine import Engine, Skip, Terms, checkpoint_path, finite_backward, run_steps
from ufo.train.logs import MetricLog

LossFn = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


class TuneRecipe(BaseModel):
    """The optimisation recipe of a one-task run (distillation, extension); subclasses add their
    own fields and may change the defaults."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(300, gt=0)
    batch_size: int = Field(64, gt=0)
    lr: float = Field(2e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(20, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    seed: int = 0
    log_every: int = Field(10, gt=0)
    ckpt_every: int = Field(100, gt=0)
    threads: int | None = Field(None, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the GPU when there is one
    amp: Literal["none", "bf16"] = "none"  # bf16 autocast of the forward and loss

    def train_config(self, eval_batch_size: int | None = None) -> TrainConfig:
        """The recipe as the TrainConfig that TuneLoop and the optimiser builders read."""
        extra = {} if eval_batch_size is None else {"eval_batch_size": eval_batch_size}
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            min_lr=min(self.min_lr, self.lr),
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps,
            grad_clip=self.grad_clip,
            log_every=self.log_every,
            ckpt_every=self.ckpt_every,
            device=self.device,
            amp=self.amp,
            **extra,
        )


class TuneError(UFOError):
    """A distillation or extension run that cannot go on."""


class TuneLoop:
    """Train `module`'s trainable parameters (those in `optimizer`) on task `task` of `cfg` (its
    training split in `data`, its input size and augmentations, the model's normalisation), with
    `cfg.train` as the schedule. `loss_fn(x, y)` gives the named losses whose sum is minimised
    (`loss_names`: their metrics.csv columns). `recipe` is stored in every checkpoint; a resume
    with another recipe is refused."""

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        cfg: Config,
        task: str,
        data: TaskData,
        out: str | Path,
        recipe: dict[str, Any],
        loss_names: list[str],
        seed: int = 0,
        k: int = 4,
        show_progress: bool = True,
    ) -> None:
        self.module, self.loss_fn, self.t = module, loss_fn, cfg.train
        self.out, self.recipe, self.loss_names = Path(out), recipe, loss_names
        self.show_progress = show_progress
        self.step = 0
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        self.engine = Engine(module, optimizer, device, error=TuneError)
        groups = data.groups.numpy() if data.groups is not None else None
        batch_size = self.t.batch_size
        if groups is not None:  # P x K: at most (identities with 2+ images) x K per batch
            cap = pk_capacity(groups, k)
            if batch_size > cap:
                warnings.warn(
                    f"task {task!r}: batch_size {batch_size} lowered to {cap} "
                    f"({cap // k} identities with 2+ images, K={k})",
                    stacklevel=2,
                )
                batch_size = cap
        sampler = MixedTaskSampler([TaskSource(task, len(data.train), groups, k)], batch_size, seed=seed)
        tc, m = cfg.tasks[task], cfg.model
        feed = Feed(
            task,
            0,
            data.train,
            as_hw(cfg.input_size(task)),
            m.in_chans,
            m.mean,
            m.std,
            tc.augment.model_dump(),
            tc.data.on_error,
        )
        self.loader = MixedLoader(
            [feed], sampler, seed=seed, device=device, workers=self.t.workers, prefetch=self.t.prefetch
        )

    @property
    def ckpt_path(self) -> Path:
        return checkpoint_path(self.out)

    def train_step(self) -> dict[str, float]:
        x, _, y = self.loader.next()
        assert isinstance(x, torch.Tensor)  # one task: one input size
        return self.engine.step(self.step, self.t, lambda amp: self._backward(x, y, amp), float(len(y)))

    def _backward(self, x: torch.Tensor, y: torch.Tensor, amp: torch.autocast) -> Terms | Skip:
        with amp:
            losses = self.loss_fn(x, y)
        return finite_backward(losses, cast(torch.Tensor, sum(losses.values())), "the loss term(s)")

    def save(self) -> None:
        self.engine.save(self.ckpt_path, self.step, {"recipe": self.recipe}, self.loader)

    def resume(self) -> bool:
        """Continue from `checkpoints/latest.safetensors`; False when there is none."""
        if not self.ckpt_path.exists():
            return False
        saved = read_manifest(self.ckpt_path).get("recipe")
        mine = json.loads(json.dumps(self.recipe))
        if saved != mine:
            diff = sorted(k for k in set(mine) | set(saved or {}) if (saved or {}).get(k) != mine.get(k))
            raise CheckpointError(
                f"{self.ckpt_path} was written by another recipe (differs in {diff}); "
                "use a new --out folder, or the same settings to resume"
            )
        self.step = self.engine.restore(self.ckpt_path, self.loader)
        return True

    def fit(self, resume: bool = False, description: str = "train") -> dict[str, Any]:
        """Run to `train.steps` (from the latest checkpoint with `resume`); returns the summary
        (steps, throughput)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        self.module.train()
        with MetricLog(self.out, self.loss_names, self.step) as log:
            summary = run_steps(self, log, description, self.show_progress)
        self.module.eval()
        return summary
