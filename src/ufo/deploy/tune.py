"""One task's training loop for the deployment stages (`ufo distill`, `ufo extend`).

The module trains where its parameters are (the callers place it on `recipe.device`: the GPU when
there is one), with bf16 autocast when `recipe.amp` says so.

Like the All-in-One Trainer, but for a single task and any module: batches from the
MixedTaskSampler (P x K for identity tasks), the task's own augmentations, warm-up + cosine LR
(`ufo.train.optim.set_lr`), gradient clipping, a rich progress bar, `metrics.csv`, and atomic
checkpoints (`checkpoints/latest.safetensors`) that resume exactly: weights, optimiser, torch RNG
and sampler position. The caller supplies `loss_fn(x, y) -> {name: loss}`; the sum is minimised.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from ufo.arch import ImageSize, as_hw
from ufo.checkpoint import read_manifest
from ufo.config import TaskConfig, TrainConfig
from ufo.data.loader import Feed, MixedLoader
from ufo.data.sampler import MixedTaskSampler, TaskSource, pk_capacity
from ufo.errors import CheckpointError, UFOError
from ufo.tasks import TaskData
from ufo.train.loop import MetricLog
from ufo.train.optim import set_lr
from ufo.train.state import load_train_state, save_train_state

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


@dataclass
class TuneLoop:
    """Train `module`'s trainable parameters (those in `optimizer`) on one task's training split.

    `recipe` is stored in every checkpoint; a resume with another recipe is refused.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    task: str
    task_cfg: TaskConfig
    data: TaskData
    train: TrainConfig  # steps, batch_size, lr schedule, grad_clip, log/ckpt cadence
    img_size: ImageSize  # the task's input: one side, or (height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int
    out: Path
    recipe: dict[str, Any]
    loss_names: list[str]  # the keys loss_fn returns: metrics.csv columns loss/<name>
    seed: int = 0
    k: int = 4
    show_progress: bool = True
    step: int = 0
    base_lrs: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        ds = self.data.train
        groups = self.data.groups.numpy() if self.data.groups is not None else None
        self.batch_size = self.train.batch_size
        if groups is not None:  # P x K: at most (identities with 2+ images) x K per batch
            cap = pk_capacity(groups, self.k)
            if self.batch_size > cap:
                warnings.warn(
                    f"task {self.task!r}: batch_size {self.batch_size} lowered to {cap} "
                    f"({cap // self.k} identities with 2+ images, K={self.k})",
                    stacklevel=2,
                )
                self.batch_size = cap
        self.sampler = MixedTaskSampler(
            [TaskSource(self.task, len(ds), groups, self.k)], self.batch_size, seed=self.seed
        )
        feed = Feed(
            self.task,
            0,
            ds,
            as_hw(self.img_size),
            self.in_chans,
            self.mean,
            self.std,
            self.task_cfg.augment.model_dump(),
            self.task_cfg.data.on_error,
        )
        device = next((p.device for p in self.module.parameters()), torch.device("cpu"))
        self.loader = MixedLoader(
            [feed],
            self.sampler,
            seed=self.seed,
            device=device,
            workers=self.train.workers,
            prefetch=self.train.prefetch,
        )

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoints" / "latest.safetensors"

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, _, y = self.loader.next()
        return x, y

    def train_step(self) -> dict[str, float]:
        f = set_lr(self.optimizer, self.base_lrs, self.step, self.train)
        x, y = self.batch()
        dev = y.device.type
        with torch.autocast("cpu" if dev == "cpu" else "cuda", dtype=torch.bfloat16, enabled=self.train.amp == "bf16"):
            losses = self.loss_fn(x, y)
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise TuneError(
                f"step {self.step}: non-finite loss ({ {k: float(v) for k, v in losses.items()} }); "
                f"the last checkpoint {self.ckpt_path} is kept"
            )
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.train.grad_clip:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.train.grad_clip)
        self.optimizer.step()
        return {
            "loss": float(total.detach()),
            **{f"loss/{k}": float(v.detach()) for k, v in losses.items()},
            "lr": self.base_lrs[0] * f,
            "images": float(len(x)),
        }

    def save(self) -> None:
        save_train_state(
            self.ckpt_path,
            self.module,
            self.optimizer,
            self.step,
            {"recipe": self.recipe},
            sampler_state=self.loader.state_dict(),
        )

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
        m = load_train_state(self.ckpt_path, self.module, self.optimizer)
        self.loader.load_state_dict(m["sampler"])
        self.step = int(m["step"])
        return True

    def fit(self, resume: bool = False, description: str = "train") -> dict[str, float]:
        """Run to `train.steps`; returns steps and throughput."""
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        self.module.train()
        log = MetricLog(self.out, self.loss_names, self.step)
        t0, images = time.perf_counter(), 0.0
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[losses]}"),
            disable=not self.show_progress,
        )
        with progress:
            bar = progress.add_task(description, total=self.train.steps, completed=self.step, losses="")
            while self.step < self.train.steps:
                row = self.train_step()
                self.step += 1
                images += row.pop("images")
                if self.step % self.train.log_every == 0 or self.step == self.train.steps:
                    row["images_per_s"] = images / (time.perf_counter() - t0)
                    log.write(self.step, row)
                    progress.update(
                        bar, losses=" ".join(f"{k[5:]}={v:.3f}" for k, v in row.items() if k.startswith("loss/"))
                    )
                if self.step % self.train.ckpt_every == 0 or self.step == self.train.steps:
                    self.save()
                progress.update(bar, completed=self.step)
        log.close()
        self.loader.close()
        self.module.eval()
        return {"steps": self.step, "images_per_s": images / max(1e-9, time.perf_counter() - t0)}
