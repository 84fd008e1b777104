"""The supernet Trainer: one class for every `train.stage`, on the one step and loop of `ufo.train.engine`.

The Trainer builds the data, the UFOModel and the stage (`ufo.train.stage`: All in One by
default; MIM pre-training, the task supernet and the chip supernet plug in the same way), then,
once, the optimiser, the EMA and the DDP wrapper over the stage's module. A step draws each task's
indices from the MixedTaskSampler, augments each task's images with its own transform and hands
the batch to the stage's passes. Checkpoints hold everything needed to resume exactly (weights,
optimiser, EMA, torch RNG, sampler position); the LR schedule is a pure function of the step.
Under torchrun every rank takes its slice of every task's share of the global batch.

Every `train.eval_every` steps (default: at each checkpoint) and at the end, the eval model is
scored on every task's eval split (`ufo.evaluation`) with the random states restored after,
so validation never changes the run; the results go to RUN/metrics.json, val_metrics.csv,
TensorBoard and RUN/train.log (`ufo.train.logs`). Stages whose heads do not train (MIM) skip it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ufo.arch import Arch
from ufo.checkpoint import atomic_write_text, read_manifest
from ufo.config import Config, parse_config
from ufo.data.build import build_all
from ufo.data.loader import Feed, MixedLoader
from ufo.data.sampler import MixedTaskSampler, TaskSource
from ufo.errors import CheckpointError, ConfigError
from ufo.evaluation.protocol import evaluate_tasks, rng_preserved
from ufo.model import UFOModel, build_model, save_model
from ufo.runlock import run_lock
from ufo.tasks import TaskData, task_class
from ufo.train import distributed as dist
from ufo.train import fsdp
from ufo.train.engine import Engine, checkpoint_path, run_steps
from ufo.train.init import apply_init
from ufo.train.logs import LOGGER, EvalHistory, MetricLog, Metrics, format_metrics, run_log
from ufo.train.mim import MimStage
from ufo.train.optim import make_optimizer
from ufo.train.routing import RoutingStage
from ufo.train.slimming import ChipStage
from ufo.train.stage import Batch, Stage

STAGES: dict[str, type[Stage]] = {
    "all_in_one": Stage,
    "pretrain_mim": MimStage,
    "task_supernet": RoutingStage,
    "chip_supernet": ChipStage,
}


class Trainer:
    """Trains `cfg` into the run folder `out` with the stage `cfg.train.stage` names."""

    def __init__(
        self, cfg: Config, out: str | Path, data: dict[str, TaskData] | None = None, show_progress: bool = True
    ) -> None:
        self.cfg, self.out, self.t = cfg, Path(out), cfg.train
        self.show_progress = show_progress
        stage_cls = STAGES[self.t.stage]
        stage_cls.check(cfg)
        self.rank, self.world = dist.setup(self.t.device, self.t.dist_timeout)
        self.fsdp = self.t.parallel == "fsdp" and self.world > 1
        if self.fsdp and stage_cls.no_fsdp is not None:
            raise ConfigError(
                f"train.parallel: fsdp is not supported by train.stage {self.t.stage}{stage_cls.no_fsdp}; use ddp"
            )
        if self.t.compile and stage_cls.no_compile is not None:
            raise ConfigError(f"train.compile is not supported by train.stage {self.t.stage}: {stage_cls.no_compile}")
        if self.fsdp and self.t.ema_decay > 0:
            raise ConfigError(
                "train.ema_decay: an EMA of the weights is not supported with train.parallel=fsdp "
                "(it would hold a full unsharded copy); set ema_decay: 0 or use parallel: ddp"
            )
        torch.manual_seed(cfg.seed)
        if self.t.threads:
            torch.set_num_threads(self.t.threads)
        self.data = build_all(cfg) if data is None else data
        self.model = build_model(cfg, {n: len(d.train.class_names) for n, d in self.data.items()})
        self.model.set_grad_checkpointing(self.t.grad_checkpointing)  # before any DDP/FSDP wrapper
        # FSDP makes each expert a unit that gathers its shard when called: the per-task loop
        self.model.set_batched_experts(self.t.batched_experts and not self.fsdp)
        self.stage = stage_cls(cfg, self.model)
        self.device = dist.device(self.t.device)
        self.module = self.stage.module.to(self.device).train()
        ema = None
        if self.t.ema_decay > 0:
            from timm.utils import ModelEmaV3

            ema = ModelEmaV3(self.module, decay=self.t.ema_decay)
        if self.t.compile:  # after the EMA's copy (which stays eager), before DDP or FSDP wrap the blocks
            self.model.backbone.compile_blocks()
        self.engine = Engine(self.module, self._optimizer(), self.device, ema, self.t.max_bad_steps)
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
            every_size=self.fsdp,  # every rank runs the blocks once per input size of the global batch
        )
        # FSDP shards in fit(), after the initial weights and any resumed state are in place
        inner = self.stage.step_module()
        wrap = self.stage.ddp and not self.fsdp
        self.step_module = dist.wrap(inner, self.world, static=self.steps_alike()) if wrap else inner
        self.step_tasks: fsdp.StepTasks | None = None  # FSDP with per-expert units: set in _shard()
        p = self.model.space.patch_size
        self._tokens = {n: 1 + (h // p) * (w // p) for n in cfg.task_names for h, w in [cfg.input_size(n)]}
        self.step = 0
        self.final_metrics: Metrics | None = None  # the last evaluation (rank 0), once fit() has run

    # ----- set-up -----
    @property
    def arch(self) -> Arch:
        """The training arch (the stage's; a task supernet's routes are frozen into it at the end)."""
        return self.stage.arch

    def _optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.stage.param_groups(), self.t)

    def _sampler(self) -> MixedTaskSampler:
        """The sampler over the stage's tasks."""
        tasks = {n: tc for n, tc in self.cfg.tasks.items() if n in self.stage.tasks}
        sources = []
        for name in tasks:
            d = self.data[name]
            groups = d.groups.numpy() if d.groups is not None else None
            k = getattr(self.model.heads[name].opts, "k", 4)
            sources.append(TaskSource(name, len(d.train), groups, k))
        # per-task shares apply to heterogeneous batches of several tasks; a single task (`--only`)
        # or one task per step (round_robin) fills the whole batch
        quotas = (
            {n: tc.batch for n, tc in tasks.items() if tc.batch}
            if (self.t.sampler == "hetero" and len(tasks) > 1 and all(tc.batch for tc in tasks.values()))
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

    def routes_fixed(self) -> bool:
        """Whether every task's FFN path is fixed in every block of the training arch (no router
        draws), so the experts a step uses follow from its tasks."""
        return all(t in self.arch.paths for t in self.model.tasks)

    def steps_alike(self) -> bool:
        """Whether every step uses the same parameters on every rank (DDP then skips its search for
        unused ones; see `dist.wrap`): every task's FFN path is fixed in every block of the arch,
        and every rank's batch holds rows of every task in every step. The hetero sampler gives
        each task a fixed share of the global batch and rank r takes blocks r, r + world, ... of it
        (rows, or a grouped task's K-row identity groups: `rank_rows`), so that holds when every
        share has at least as many blocks as ranks. A task's rows then use all of
        its head's parameters (a margin loss scores every class centre; PML's zero losses stay
        attached to the embeddings). Round-robin and proportional batches leave tasks out; a task
        supernet leaves every path to the router."""
        if not self.routes_fixed() or self.sampler.mode != "hetero":
            return False
        quotas = self.sampler.quotas()
        return all(t in quotas and -(-quotas[t] // self.sampler.unit(t)) >= self.world for t in self.model.tasks)

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
        return checkpoint_path(self.out)

    @property
    def eval_every(self) -> int:
        """Steps between validations: `train.eval_every`, by default `train.ckpt_every`; 0: none."""
        if not self.stage.evaluates:
            return 0
        return self.t.ckpt_every if self.t.eval_every is None else self.t.eval_every

    def _manifest(self) -> dict[str, Any]:
        return {"config": self.cfg.model_dump(mode="json"), "arch": self.arch.model_dump(), "world_size": self.world}

    # ----- one step -----
    def batch(self) -> Batch:
        """The next mixed batch of this rank: images (grouped by task; a list of one tensor per input
        size when the tasks' sizes differ), task ids, labels."""
        return self.loader.next()

    def train_step(self) -> dict[str, float]:
        """One optimisation step on the next batch, through the stage's passes."""
        batch = self.batch()
        if self.world > 1:  # uneven rows of a task over the ranks: weight their means (Stage.share)
            self.stage.set_rows(self.loader.local_rows(), self.loader.step_rows, self.world)
        if self.step_tasks is not None:  # FSDP: the experts this step's global batch uses
            self.step_tasks.set(self.loader.step_tasks, self._tokens)
        step = self.step
        row = self.engine.step(
            step,
            self.t,
            lambda amp: self.stage.backward(self.step_module, batch, step, amp),
            float(sum(self.loader.step_rows.values())),  # the global batch (ranks may hold uneven parts)
        )
        return {**row, **self.stage.log_row(step)}

    # ----- checkpoints -----
    def save(self) -> None:
        model_state = optim_state = None
        if self.fsdp:  # gathered from every rank; rank 0 writes the same format as DDP
            model_state, optim_state = fsdp.full_state(self.step_module, self.engine.optimizer, self._names)
        if self.rank == 0:
            self.engine.save(self.ckpt_path, self.step, self._manifest(), self.loader, model_state, optim_state)
        dist.barrier()

    def _shard(self) -> None:
        """FSDP: shard the blocks and the rest (each task expert on its own, so a step communicates
        only the experts its global batch uses; see ufo.train.fsdp), then rebuild the optimiser
        over the shards."""
        self._names = fsdp.param_names(self.step_module, self.engine.optimizer)
        state = self.engine.optimizer.state_dict()
        blocks = self.model.backbone.super_blocks()
        if not any(b.mlp.batched for b in blocks):  # the batched path reads the experts' weights outside their forward
            self.step_tasks = fsdp.shard_experts(self.step_module, blocks, self.model.heads, self.device.type)
        else:
            fsdp.shard(self.step_module, blocks, self.device.type)
        self.engine.optimizer = self._optimizer()
        if state["state"]:
            fsdp.load_optimizer(self.step_module, self.engine.optimizer, state, self._names)

    def resume(self) -> bool:
        """Continue from the latest checkpoint in the run folder; False when there is none."""
        if not self.ckpt_path.exists():
            return False
        saved = read_manifest(self.ckpt_path)
        self.stage.check_resume(saved, self.ckpt_path)
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
        self.step = self.engine.restore(self.ckpt_path, self.loader)
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
        else:  # resumed runs restore their weights; fresh ones start from cfg.init, then the stage's start
            changed = apply_init(self.module, self.cfg, self.out) is not None
            changed = self.stage.fresh_start() or changed
            if changed and self.engine.ema is not None:
                self.engine.ema.set(self.module)
            if self.rank == 0:
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
            extra_fields=self.stage.log_fields(),
            validation=every > 0,
        ) as log:

            def validate(step: int) -> None:  # the last step's: the final evaluation below
                if every and step % every == 0 and step < self.t.steps:
                    self._record(step, self.validate(), log, history)

            summary = run_steps(self, log, self.t.stage, self.show_progress, validate)
            self.stage.finish(self.eval_model(), self.out)
            final = self._gathered() if self.fsdp else self.eval_model()
            if every:  # the shipped weights, scored as the history's last point
                self._record(self.step, self.score(final), log, history, final=True)
        if self.rank == 0:
            assert final is not None  # rank 0 holds the gathered model under FSDP
            save_model(self.out / "model.safetensors", final, self.cfg, self.arch)
            atomic_write_text(self.out / "train_summary.json", json.dumps(summary, indent=2))
            LOGGER.info(
                f"finished {self.step} steps at {summary['images_per_s']:.1f} images/s; "
                f"model: {self.out / 'model.safetensors'}"
            )
        dist.barrier()
        return summary

    # ----- validation and the run log -----
    def _gathered(self) -> UFOModel | None:
        """FSDP: a plain model holding the gathered weights at the training arch, on rank 0 and its
        device (None on the other ranks, which only take part in the gathering). Every rank must
        call it."""
        state, _ = fsdp.full_state(self.step_module)
        if self.rank != 0:
            return None
        model = build_model(self.cfg, {n: self.model.head(n).num_classes for n in self.model.tasks})
        model.load_state_dict(state)
        model.set_arch(self.arch)
        return model.to(self.device)

    def validate(self) -> Metrics | None:
        """Every task's metrics for the eval model at the training arch (under FSDP a gathered copy,
        so every rank must call this); see `score`."""
        with rng_preserved():
            model = self._gathered() if self.fsdp else self.eval_model()
            if model is not None:
                model.set_arch(self.arch)
        return self.score(model)

    def score(self, model: UFOModel | None) -> Metrics | None:
        """`model`'s metrics on every task's eval split, computed on rank 0 (None on the others)
        while the rest wait. The global random states are restored after: validating never changes
        what training draws, and resume stays exact."""
        with rng_preserved():
            metrics = evaluate_tasks(model, self.data, self.cfg) if self.rank == 0 and model is not None else None
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
        """The weights to evaluate and ship: the EMA's when there is one, as the stage's UFOModel."""
        ema = self.engine.ema
        return self.stage.shipped(ema.module if ema is not None else self.module)

    def evaluate(self) -> dict[str, dict[str, float]]:
        return evaluate_tasks(self.eval_model(), self.data, self.cfg)
