"""The one optimisation step and the one training loop that every stage runs on.

`Engine.step` is one step: the LR of every parameter group from the warm-up + cosine schedule
(`optim.set_lr`), the stage's forward and backward passes (one, or several whose gradients add
up) with bf16 autocast of the forwards when `amp` says so, the non-finite policy (skip the step;
stop after `max_bad_steps` in a row), gradient clipping over the trained parameters, the
optimiser step and the EMA update. `Engine.save`/`restore` write and read the exact-resume
checkpoint (`ufo.train.state`).

`run_steps` is the loop around it: the progress bar, a `metrics.csv` row every `log_every` steps,
a checkpoint every `ckpt_every` steps and at the end, and the run's summary. The supernet
`Trainer` (`ufo.train.loop`) and the one-task loop (`ufo.train.tune`) both run on these two.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from ufo.config import TrainConfig
from ufo.data.loader import MixedLoader
from ufo.errors import UFOError
from ufo.train import distributed as dist
from ufo.train.host_memory import keep_freed_memory
from ufo.train.logs import LOGGER, MetricLog
from ufo.train.optim import set_lr
from ufo.train.state import load_train_state, save_train_state

Terms = dict[str, torch.Tensor]  # what a step logs: `loss`, `loss/NAME`, a stage's own terms


class TrainingError(UFOError):
    """A run that cannot go on (non-finite losses, a resume that does not match)."""


@dataclass(frozen=True)
class Skip:
    """The outcome of a step whose passes met a non-finite loss in `where`: nothing is stepped."""

    where: str


Backward = Callable[[torch.autocast], "Terms | Skip"]  # the stage's passes, given the forwards' autocast


def finite_backward(losses: Terms, total: torch.Tensor, what: str = "task(s)") -> Terms | Skip:
    """Backward `total` when every named loss is finite; returns the logged `loss/NAME` and `loss`,
    else a Skip naming the non-finite losses (as `what` and their names)."""
    bad = [n for n, v in losses.items() if not torch.isfinite(v)]
    if bad:
        return Skip(f"{what} {bad}")
    total.backward()
    return {**{f"loss/{n}": v.detach() for n, v in losses.items()}, "loss": total.detach()}


def checkpoint_path(out: Path) -> Path:
    """The run's exact-resume checkpoint, rewritten at every checkpoint step."""
    return out / "checkpoints" / "latest.safetensors"


class Engine:
    """What one optimisation step updates: `module`'s parameters through `optimizer` (each group's
    LR is its base LR times the schedule), and the EMA of `module` when there is one. A non-finite
    step is skipped with a warning; the `max_bad_steps`-th in a row raises `error`."""

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        ema: Any = None,  # timm's ModelEmaV3
        max_bad_steps: int = 1,
        error: type[UFOError] = TrainingError,
    ) -> None:
        self.module, self.optimizer, self.device, self.ema = module, optimizer, device, ema
        self.max_bad_steps, self.error = max_bad_steps, error
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.bad_steps = 0

    def step(self, step: int, t: TrainConfig, backward: Backward, images: float) -> dict[str, float]:
        """Step `step` of a run of `t`: the log row (losses averaged over the ranks, lr, images),
        or `{"skipped": 1.0}`."""
        f = set_lr(self.optimizer, self.base_lrs, step, t)
        self.optimizer.zero_grad(set_to_none=True)
        amp = torch.autocast(
            "cpu" if self.device.type == "cpu" else "cuda", dtype=torch.bfloat16, enabled=t.amp == "bf16"
        )
        terms = backward(amp)
        if isinstance(terms, Skip):
            return self.skip(step, terms.where)
        self.bad_steps = 0
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), t.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.module, step=step)
        logged = dist.mean_across_ranks({k: torch.as_tensor(v) for k, v in terms.items()})
        return {**logged, "lr": self.base_lrs[0] * f, "images": images}

    def skip(self, step: int, where: str) -> dict[str, float]:
        """After a non-finite loss: drop the step's gradients, warn naming `where`, and stop the run
        after `max_bad_steps` in a row (the last checkpoint, written before, stays valid)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        msg = f"step {step}: non-finite loss in {where}; the step was skipped"
        if self.bad_steps >= self.max_bad_steps:
            raise self.error(msg + f" ({self.bad_steps} in a row: stopping; last checkpoint kept)")
        dist.warn(msg)
        return {"skipped": 1.0}

    def save(
        self,
        path: Path,
        step: int,
        manifest: dict[str, Any],
        loader: MixedLoader,
        model_state: dict[str, torch.Tensor] | None = None,
        optimizer_state: dict[str, Any] | None = None,
    ) -> None:
        """The exact-resume checkpoint: weights, EMA, optimiser, torch RNG, the loader's position and
        `manifest` (`model_state`/`optimizer_state` replace the modules' own, as FSDP gathers them)."""
        save_train_state(
            path,
            self.module,
            self.optimizer,
            step,
            manifest,
            ema=self.ema,
            sampler_state=loader.state_dict(),
            model_state=model_state,
            optimizer_state=optimizer_state,
        )

    def restore(self, path: Path, loader: MixedLoader) -> int:
        """Load what `save` wrote, the loader's position included; returns the step to go on from."""
        m = load_train_state(path, self.module, self.optimizer, self.ema)
        loader.load_state_dict(m["sampler"])
        return int(m["step"])


class Steps(Protocol):
    """What `run_steps` drives: a step counter, the schedule, the loader, one step and a checkpoint."""

    step: int
    t: TrainConfig
    loader: MixedLoader
    engine: Engine

    def train_step(self) -> dict[str, float]: ...

    def save(self) -> None: ...


def run_steps(
    run: Steps, log: MetricLog, description: str, show: bool, after_step: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """The steps from `run.step` to `run.t.steps`: a log row (metrics.csv, TensorBoard, the run log)
    every `log_every` steps and at the last, `after_step(step)` (validation), then a checkpoint
    every `ckpt_every` steps and at the last. Returns the summary: steps, images/s, the seconds
    from process start to the first step, and any unreadable images the loader replaced."""
    t = run.t
    if t.keep_freed_memory and run.engine.device.type == "cpu":
        keep_freed_memory()  # each step re-allocates the gradients freed by the last
    t0, images, startup = time.perf_counter(), 0.0, None
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[losses]}"),
        disable=not (show and dist.is_main()),
    )
    with progress:
        bar = progress.add_task(description, total=t.steps, completed=run.step, losses="")
        while run.step < t.steps:
            row = run.train_step()
            run.step += 1
            images += row.get("images", 0.0)
            if startup is None:
                startup = seconds_since_process_start()
            if run.step % t.log_every == 0 or run.step == t.steps:
                row["images_per_s"] = images / (time.perf_counter() - t0)
                log.write(run.step, row)
                if dist.is_main():
                    LOGGER.info(step_line(run.step, t.steps, row))
                progress.update(
                    bar, losses=" ".join(f"{k[5:]}={v:.3f}" for k, v in row.items() if k.startswith("loss/"))
                )
            if after_step is not None:
                after_step(run.step)
            if run.step % t.ckpt_every == 0 or run.step == t.steps:
                run.save()  # after the validation, so a checkpoint's history is complete
            progress.update(bar, completed=run.step)
    run.loader.close()
    summary: dict[str, Any] = {
        "steps": run.step,
        "images_per_s": images / max(1e-9, time.perf_counter() - t0),
        "first_step_s": startup,
    }
    if run.loader.skipped:
        summary["skipped_images"] = dict(run.loader.skipped)
        dist.warn(f"unreadable training images replaced (on_error: skip): {dict(run.loader.skipped)}")
    return summary


def step_line(step: int, steps: int, row: dict[str, float]) -> str:
    """`step S/N loss=... loss/TASK=... lr=... img/s=...` for the run log (the total loss first)."""
    losses = sorted((k for k in row if k == "loss" or k.startswith("loss/")), key=lambda k: k != "loss")
    parts = [f"step {step}/{steps}", *(f"{k}={row[k]:.4f}" for k in losses)]
    parts += [f"lr={row['lr']:.3g}"] if "lr" in row else []
    parts += [f"img/s={row['images_per_s']:.1f}"] if "images_per_s" in row else []
    return " ".join(parts) + (" (step skipped: non-finite loss)" if row.get("skipped") else "")


def seconds_since_process_start() -> float:
    """Wall time since this process was created (imports and data set-up included)."""
    import psutil

    return time.time() - psutil.Process().create_time()
