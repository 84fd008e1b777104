"""What a training stage adds to the Trainer's one step and loop (`train.stage`).

A stage is a strategy object that the Trainer builds from the config and its UFOModel. It names
the training arch, the module that trains (the model, or SimMIM around it), what DDP wraps, the
optimiser's parameter groups, the tasks it samples, its forward and backward passes for a batch,
its log fields, and its hooks: before the first step of a fresh run, a check of a checkpoint to
resume, and after the last step. `Stage` itself is All in One (`all_in_one`): every task in every
batch at the config's `train.arch` and `train.paths`, one pass, the weighted sum of the task
losses. The other stages (`ufo.train.mim`, `ufo.train.routing`, `ufo.train.slimming`) derive
from it and change only what is theirs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from torch import nn

from ufo.arch import Arch
from ufo.config import Config
from ufo.model import UFOModel, resolve_train_arch
from ufo.train.engine import Skip, Terms, finite_backward
from ufo.train.optim import param_groups

Batch = tuple[torch.Tensor | list[torch.Tensor], torch.Tensor, torch.Tensor]  # images, task ids, labels


class TrainStep(nn.Module):
    """The module DDP wraps: mixed batch in, per-task losses out."""

    def __init__(self, model: UFOModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.task_losses(x, task_ids, labels)


class Stage:
    """All in One, and the hooks the other stages override."""

    evaluates: ClassVar[bool] = True  # validation applies: the task heads are trained
    ddp: ClassVar[bool] = True  # DDP wraps the step module (False: the stage averages its own gradients)
    no_fsdp: ClassVar[str | None] = None  # why train.parallel: fsdp does not apply (None: it does)
    no_compile: ClassVar[str | None] = None  # why train.compile does not apply (None: it does)

    def __init__(self, cfg: Config, model: UFOModel, arch: Arch | None = None) -> None:
        self.cfg, self.model = cfg, model
        self.arch = resolve_train_arch(cfg, model.space) if arch is None else arch
        model.set_arch(self.arch)
        # Under torchrun, when the ranks' rows of a task are uneven (`set_rows`): each task of the
        # step's global batch -> this rank's rows of it x world / its global rows; empty when every
        # share is 1 (one process, even slices). See `share`. `batch_share`: the same over all rows.
        self.row_shares: dict[str, float] = {}
        self.batch_share = 1.0

    def set_rows(self, here: dict[str, int], total: dict[str, int], world: int) -> None:
        """This step's rows of each task on this rank (`here`) and in the global batch (`total`)."""
        shares = {n: here.get(n, 0) * world / rows for n, rows in total.items()}
        self.row_shares = {} if all(s == 1.0 for s in shares.values()) else shares
        self.batch_share = sum(here.values()) * world / sum(total.values())

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Refuse a config this stage cannot train, before any data is read."""

    @property
    def module(self) -> nn.Module:
        """What trains: the optimiser, the EMA and the checkpoints hold its parameters."""
        return self.model

    @property
    def tasks(self) -> list[str]:
        """The tasks the sampler draws batches from."""
        return self.cfg.task_names

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimiser's parameter groups over `module`."""
        return param_groups(self.module, self.cfg)

    def step_module(self) -> nn.Module:
        """The module that maps a batch to named losses (DDP wraps it, FSDP shards it)."""
        return TrainStep(self.model)

    def share(self, task: str) -> float:
        """The factor on `task`'s mean loss on this rank. DDP and FSDP average the ranks' gradients,
        so with a task's rows split unevenly (proportional batches, or a share under the world size)
        the average of the ranks' means is not the mean over the global batch. Weighting each
        rank's mean by its rows x world / global rows makes it so, for losses that are a mean over
        rows (cross-entropy, margin losses); pair-mining losses see only their rank's rows anyway."""
        return self.row_shares.get(task, 1.0)

    def total_loss(self, losses: Terms) -> torch.Tensor:
        return cast(torch.Tensor, sum(self.cfg.tasks[n].loss_weight * self.share(n) * v for n, v in losses.items()))

    def global_terms(self, terms: Terms) -> Terms:
        """The logged `loss/TASK` of an uneven step, weighted as in `share` and logged by every rank
        (0 where it has no rows), so that their average over the ranks is the global batch's mean."""
        if not self.row_shares:
            return terms
        zero = terms["loss"].new_zeros(())
        by_task = {f"loss/{n}": s * terms.get(f"loss/{n}", zero) for n, s in self.row_shares.items()}
        return {**terms, **by_task}

    def backward(self, forward: nn.Module, batch: Batch, step: int, amp: torch.autocast) -> Terms | Skip:
        """The step's forward (through `forward`, the wrapped step module) and backward passes;
        the terms to log, or a Skip after a non-finite loss."""
        x, ids, y = batch
        with amp:
            losses = forward(x, ids, y)
        terms = finite_backward(losses, self.total_loss(losses))
        return terms if isinstance(terms, Skip) else self.global_terms(terms)

    def log_fields(self) -> list[str]:
        """metrics.csv columns beyond the losses, lr and throughput."""
        return []

    def log_row(self, step: int) -> dict[str, float]:
        """This stage's values of `log_fields` after step `step` (those not among the step's terms)."""
        return {}

    def fresh_start(self) -> bool:
        """Runs before the first step of a run that did not resume; True when it changed the weights."""
        return False

    def check_resume(self, manifest: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint (its manifest) that this stage cannot continue."""

    def shipped(self, module: nn.Module) -> UFOModel:
        """The UFOModel inside `module` (the trained module or its EMA): what is evaluated and saved."""
        assert isinstance(module, UFOModel)
        return module

    def finish(self, final: UFOModel, out: Path) -> None:
        """Runs once after the last step, before the model file is written; `final` is `shipped`'s
        model of the weights to ship (the EMA's when there is one)."""
