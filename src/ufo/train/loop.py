"""All-in-One training: one backbone, every task in every (heterogeneous) batch.

A step draws each task's indices from the MixedTaskSampler, augments each task's images with its
own transform, runs the mixed batch through the backbone once, sums the weighted task losses and
takes one optimiser step. Checkpoints hold everything needed to resume exactly (weights,
optimiser, EMA, torch RNG, sampler position); the LR schedule is a pure function of the step.
Under torchrun every rank takes its slice of every task's share of the global batch.

Every `train.eval_every` steps (default: at each checkpoint) and at the end, the eval model is
scored on every task's eval split (`ufo.evaluation`) with the random states restored after,
so validation never changes the run; the results go to RUN/metrics.json, val_metrics.csv,
TensorBoard and RUN/train.log (`ufo.train.logs`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from ufo.checkpoint import atomic_write_text, read_manifest
from ufo.config import Config, parse_config
from ufo.data.build import build_all
from ufo.data.loader import Feed, MixedLoader
from ufo.data.sampler import MixedTaskSampler, TaskSource
from ufo.errors import CheckpointError, ConfigError, UFOError
from ufo.evaluation.protocol import evaluate_tasks, rng_preserved
from ufo.model import UFOModel
from ufo.runlock import run_lock
from ufo.tasks import TaskData, task_class
from ufo.train import distributed as dist
from ufo.train import fsdp
from ufo.train.init import apply_init
from ufo.train.logs import LOGGER, EvalHistory, MetricLog, Metrics, format_metrics, run_log
from ufo.train.optim import build_optimizer, set_lr
from ufo.train.state import load_train_state, save_train_state
from ufo.train.store import build_model, resolve_train_arch, save_model


class TrainingError(UFOError):
    """A run that cannot go on (non-finite losses, a resume that does not match)."""


class TrainStep(nn.Module):
    """The module DDP wraps: mixed batch in, per-task losses out."""

    def __init__(self, model: UFOModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.task_losses(x, task_ids, labels)


class Trainer:
    evaluates = True  # validation applies: the task heads are trained (not so in MIM pre-training)

    def __init__(
        self, cfg: Config, out: str | Path, data: dict[str, TaskData] | None = None, show_progress: bool = True
    ) -> None:
        self.cfg, self.out, self.t = cfg, Path(out), cfg.train
        self.show_progress = show_progress
        self.rank, self.world = dist.setup()
        torch.manual_seed(cfg.seed)
        if self.t.threads:
            torch.set_num_threads(self.t.threads)
        self.data = build_all(cfg) if data is None else data
        self.model = build_model(cfg, {n: len(d.train.class_names) for n, d in self.data.items()})
        self.arch = resolve_train_arch(cfg, self.model.space)
        self.model.set_arch(self.arch)
        self.model.set_grad_checkpointing(self.t.grad_checkpointing)  # before any DDP/FSDP wrapper
        self.model.train()
        self.device = dist.device(self.t.device)
        self.model.to(self.device)
        self.fsdp = self.t.parallel == "fsdp" and self.world > 1
        if self.fsdp and self.t.ema_decay > 0:
            raise ConfigError(
                "train.ema_decay: an EMA of the weights is not supported with train.parallel=fsdp "
                "(it would hold a full unsharded copy); set ema_decay: 0 or use parallel: ddp"
            )
        self.optimizer = build_optimizer(self.model, cfg)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.ema = None
        if self.t.ema_decay > 0:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=self.t.ema_decay)
        self.sampler = self._sampler()
        self.loader = MixedLoader(
            self.feeds(),
            self.sampler,
            seed=cfg.seed,
            rank=self.rank,
            world=self.world,
            device=self.device,
            workers=self.t.workers,
            prefetch=self.t.prefetch,
        )
        # FSDP shards in fit(), after the initial weights and any resumed state are in place
        self.step_module = (
            self.build_step() if self.fsdp else dist.wrap(self.build_step(), self.world, static=self.steps_alike())
        )
        self.step = 0
        self.bad_steps = 0
        self.final_metrics: Metrics | None = None  # the last evaluation (rank 0), once fit() has run

    # ----- set-up -----
    def _sampler(self) -> MixedTaskSampler:
        sources = []
        for name, _tc in self.cfg.tasks.items():
            d = self.data[name]
            groups = d.groups.numpy() if d.groups is not None else None
            k = getattr(self.model.heads[name].opts, "k", 4)
            sources.append(TaskSource(name, len(d.train), groups, k))
        # per-task shares apply to heterogeneous batches of several tasks; a single task (`--only`)
        # or one task per step (round_robin) fills the whole batch
        quotas = (
            {n: tc.batch for n, tc in self.cfg.tasks.items()}
            if (
                self.t.sampler == "hetero"
                and len(self.cfg.tasks) > 1
                and all(tc.batch for tc in self.cfg.tasks.values())
            )
            else None
        )
        return MixedTaskSampler(
            sources,
            self.t.batch_size,
            mode=self.t.sampler,
            quotas=quotas,
            temperature=self.t.temperature,
            seed=self.cfg.seed,
        )

    def steps_alike(self) -> bool:
        """Whether every step uses the same parameters on every rank (DDP then skips its search for
        unused ones; see `dist.wrap`): every task's FFN path is fixed in every block of the arch,
        and every rank's batch holds rows of every task in every step. The hetero sampler gives
        each task a fixed share of the global batch and rank r takes rows r, r + world, ... of it,
        so that holds when every share is at least the world size. A task's rows then use all of
        its head's parameters (a margin loss scores every class centre; PML's zero losses stay
        attached to the embeddings). Round-robin and proportional batches leave tasks out."""
        fixed = all(t in self.arch.paths for t in self.model.tasks)
        if not fixed or self.sampler.mode != "hetero":
            return False
        quotas = self.sampler.quotas()
        return all(quotas.get(t, 0) >= self.world for t in self.model.tasks)

    def feeds(self) -> list[Feed]:
        """Each task's training split and input pipeline, for the loader."""
        m = self.cfg.model
        return [
            Feed(
                n,
                self.model.tasks.index(n),
                self.data[n].train,
                self.cfg.input_size(n),
                m.in_chans,
                m.mean,
                m.std,
                tc.augment.model_dump(),
                tc.data.on_error,
            )
            for n, tc in self.cfg.tasks.items()
        ]

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoints" / "latest.safetensors"

    @property
    def eval_every(self) -> int:
        """Steps between validations: `train.eval_every`, by default `train.ckpt_every`; 0: none."""
        if not self.evaluates:
            return 0
        return self.t.ckpt_every if self.t.eval_every is None else self.t.eval_every

    def _manifest(self) -> dict[str, Any]:
        return {"config": self.cfg.model_dump(mode="json"), "arch": self.arch.model_dump(), "world_size": self.world}

    # ----- what a stage may change -----
    def build_step(self) -> nn.Module:
        """The module that maps a batch to named losses (DDP wraps it)."""
        return TrainStep(self.model)

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.cfg.tasks[n].loss_weight * v for n, v in losses.items())

    def log_fields(self) -> list[str]:
        """metrics.csv columns beyond the losses, lr and throughput."""
        return []

    def finish(self) -> None:
        """Runs once after the last step, before the model file is written."""

    # ----- batches -----
    def batch(self) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """The next mixed batch of this rank: images (grouped by task; a list of one tensor per input
        size when the tasks' sizes differ), task ids, labels."""
        return self.loader.next()

    # ----- one step -----
    def train_step(self) -> dict[str, float]:
        lr_f = set_lr(self.optimizer, self.base_lrs, self.step, self.t)
        x, ids, y = self.batch()
        with torch.autocast(
            "cpu" if ids.device.type == "cpu" else "cuda", dtype=torch.bfloat16, enabled=self.t.amp == "bf16"
        ):
            losses = self.step_module(x, ids, y)
        bad = [n for n, v in losses.items() if not torch.isfinite(v)]
        if bad:
            return self.skip_step(f"task(s) {bad}")
        self.bad_steps = 0
        total = self.total_loss(losses)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.t.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        logged = dist.mean_across_ranks({f"loss/{n}": v.detach() for n, v in losses.items()} | {"loss": total.detach()})
        return {**logged, "lr": self.base_lrs[0] * lr_f, "images": float(ids.numel() * self.world)}

    def skip_step(self, where: str) -> dict[str, float]:
        """After a non-finite loss: drop the step's gradients, warn naming `where`, and stop the run
        after `train.max_bad_steps` in a row (the last checkpoint, written before, stays valid)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        msg = f"step {self.step}: non-finite loss in {where}; the step was skipped"
        if self.bad_steps >= self.t.max_bad_steps:
            raise TrainingError(msg + f" ({self.bad_steps} in a row: stopping; last checkpoint kept)")
        dist.warn(msg)
        return {"skipped": 1.0}

    # ----- checkpoints -----
    def save(self) -> None:
        model_state = optim_state = None
        if self.fsdp:  # gathered from every rank; rank 0 writes the same format as DDP
            model_state, optim_state = fsdp.full_state(self.step_module, self.optimizer, self._names)
        if self.rank == 0:
            save_train_state(
                self.ckpt_path,
                self.model,
                self.optimizer,
                self.step,
                self._manifest(),
                ema=self.ema,
                sampler_state=self.loader.state_dict(),
                model_state=model_state,
                optimizer_state=optim_state,
            )
        dist.barrier()

    def _shard(self) -> None:
        """FSDP: shard the blocks and the rest, then rebuild the optimiser over the shards."""
        self._names = fsdp.param_names(self.step_module, self.optimizer)
        state = self.optimizer.state_dict()
        fsdp.shard(self.step_module, self.model.backbone.blocks, self.device.type)
        self.optimizer = build_optimizer(self.model, self.cfg)
        if state["state"]:
            fsdp.load_optimizer(self.step_module, self.optimizer, state, self._names)

    def resume(self) -> bool:
        """Continue from the latest checkpoint in the run folder; False when there is none."""
        if not self.ckpt_path.exists():
            return False
        saved = read_manifest(self.ckpt_path)
        mine = self._manifest()["config"]
        try:  # re-read through today's Config, so sections added since (at their defaults) compare equal
            theirs = parse_config(saved.get("config", {}), str(self.ckpt_path)).model_dump(mode="json")
        except ConfigError:
            theirs = saved.get("config", {})
        diff = [k for k in mine if mine[k] != theirs.get(k)]
        if diff:
            raise CheckpointError(
                f"{self.ckpt_path} was written by another config; differing sections: {diff}. "
                "Use a new --out folder, or the same config to resume."
            )
        m = load_train_state(self.ckpt_path, self.model, self.optimizer, self.ema)
        self.loader.load_state_dict(m["sampler"])
        self.step = int(m["step"])
        return True

    # ----- the run -----
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to `train.steps` (from the latest checkpoint with `resume`); rank 0 holds the run
        folder's lock throughout, so a second process on the same folder stops at once. What the run
        reports is appended to RUN/train.log."""
        with run_lock(self.out, self.rank), run_log(self.out / "train.log", enabled=self.rank == 0):
            return self._fit(resume)

    def _fit(self, resume: bool) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        self._log_start()
        resumed = resume and self.resume()
        if resumed:
            dist.info(f"resumed from {self.ckpt_path} at step {self.step}")
        elif apply_init(self.model, self.cfg, self.out) is not None and self.ema is not None:
            self.ema.set(self.model)  # resumed runs restore their weights; fresh ones start from cfg.init
        if not resumed and self.rank == 0:
            LOGGER.info(f"fresh start (init: {self.cfg.init.kind})")
        if self.fsdp:
            self._shard()
        every = self.eval_every
        history = EvalHistory(
            self.out / "metrics.json", self.step, self._history_header(), enabled=self.rank == 0 and every > 0
        )
        with MetricLog(
            self.out,
            self.cfg.task_names,
            self.step,
            enabled=self.rank == 0,
            extra_fields=self.log_fields(),
            validation=every > 0,
        ) as log:
            summary = self._steps(log, history)
            self.finish()
            final = self._gathered() if self.fsdp else self.eval_model()
            if every:  # the shipped weights, scored as the history's last point
                self._record(self.step, self.validate(final), log, history, final=True)
        if self.rank == 0:
            save_model(self.out / "model.safetensors", final, self.cfg, self.arch)
            atomic_write_text(self.out / "train_summary.json", json.dumps(summary, indent=2))
            LOGGER.info(
                f"finished {self.step} steps at {summary['images_per_s']:.1f} images/s; "
                f"model: {self.out / 'model.safetensors'}"
            )
        dist.barrier()
        return summary

    def _steps(self, log: MetricLog, history: EvalHistory) -> dict[str, Any]:
        """The steps from here to `train.steps`, with their logging, validations and checkpoints;
        returns the run's summary (throughput, time to the first step, skipped images)."""
        every = self.eval_every
        t0, images, startup = time.perf_counter(), 0.0, None
        progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[losses]}"),
            disable=not (self.show_progress and self.rank == 0),
        )
        with progress:
            bar = progress.add_task(self.t.stage, total=self.t.steps, completed=self.step, losses="")
            while self.step < self.t.steps:
                row = self.train_step()
                self.step += 1
                images += row.get("images", 0.0)
                if startup is None:
                    startup = seconds_since_process_start()
                if self.step % self.t.log_every == 0 or self.step == self.t.steps:
                    row["images_per_s"] = images / (time.perf_counter() - t0)
                    log.write(self.step, row)
                    if self.rank == 0:
                        LOGGER.info(step_line(self.step, self.t.steps, row))
                    progress.update(
                        bar, losses=" ".join(f"{k[5:]}={v:.3f}" for k, v in row.items() if k.startswith("loss/"))
                    )
                if every and self.step % every == 0 and self.step < self.t.steps:  # the last step: in _fit
                    self._record(self.step, self.validate(), log, history)
                if self.step % self.t.ckpt_every == 0 or self.step == self.t.steps:
                    self.save()  # after the validation, so a checkpoint's history is complete
                progress.update(bar, completed=self.step)
        self.loader.close()
        summary = {
            "steps": self.step,
            "images_per_s": images / max(1e-9, time.perf_counter() - t0),
            "first_step_s": startup,
        }
        if self.loader.skipped:
            summary["skipped_images"] = dict(self.loader.skipped)
            dist.warn(f"unreadable training images replaced (on_error: skip): {dict(self.loader.skipped)}")
        return summary

    # ----- validation and the run log -----
    def _gathered(self) -> UFOModel:
        """FSDP: a plain model holding the gathered weights on rank 0 (fresh ones elsewhere), at
        the training arch. Every rank must call it."""
        state, _ = fsdp.full_state(self.step_module)
        model = build_model(self.cfg, {n: h.num_classes for n, h in self.model.heads.items()})
        if self.rank == 0:
            model.load_state_dict(state)
        model.set_arch(self.arch)
        return model

    def validate(self, model: UFOModel | None = None) -> Metrics | None:
        """Every task's metrics on its eval split, computed on rank 0 (None on the others) while
        the rest wait. `model` defaults to the eval model at the training arch (under FSDP a
        gathered copy, so every rank must call this). The global random states are restored
        after: validating never changes what training draws, and resume stays exact."""
        with rng_preserved():
            if model is None:
                model = self._gathered().to(self.device) if self.fsdp else self.eval_model()
                model.set_arch(self.arch)
            metrics = evaluate_tasks(model, self.data, self.cfg) if self.rank == 0 else None
        dist.barrier()
        return metrics

    def _record(
        self, step: int, metrics: Metrics | None, log: MetricLog, history: EvalHistory, final: bool = False
    ) -> None:
        """A validation's results into val_metrics.csv, TensorBoard, metrics.json and the log."""
        if metrics is None:  # ranks other than 0
            return
        if final:
            self.final_metrics = metrics
            history.final(step, metrics, self._history_header()["primary_metric"])
        else:
            history.add(step, metrics)
        log.write_val(step, metrics)
        dist.info(f"step {step} {'final evaluation' if final else 'validation'}: {format_metrics(metrics)}")

    def _history_header(self) -> dict[str, Any]:
        return {
            "stage": self.t.stage,
            "steps": self.t.steps,
            "eval_every": self.eval_every,
            "primary_metric": {t: task_class(tc.kind).primary for t, tc in self.cfg.tasks.items()},
        }

    def _log_start(self) -> None:
        """The run log's first lines: what runs where, and the versions (also RUN/provenance.json)."""
        if self.rank != 0:
            return
        from ufo.provenance import provenance, summary_line

        prov = provenance(self.cfg.seed)
        atomic_write_text(self.out / "provenance.json", json.dumps(prov, indent=2))
        every = self.eval_every
        LOGGER.info(
            f"start {self.cfg.name}: stage {self.t.stage}, {self.t.steps} steps of {self.t.batch_size} "
            f"images, tasks {', '.join(self.cfg.task_names)}; world size {self.world}, device {self.device}; "
            f"seed {self.cfg.seed}; validation " + (f"every {every} steps" if every else "off")
        )
        LOGGER.info(summary_line(prov))

    def eval_model(self) -> UFOModel:
        """The weights to evaluate and ship: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def evaluate(self) -> dict[str, dict[str, float]]:
        return evaluate_tasks(self.eval_model(), self.data, self.cfg)


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
