"""Chip supernet (`train.stage: chip_supernet`): architecture slimming with the sandwich rule.

Every step runs the same mixed batch through the largest subnet, the smallest and
`chip_supernet.num_random` random ones, accumulates their gradients and takes one optimiser step
(Yu et al., BigNAS / slimmable networks). The largest subnet learns from the labels; the smaller
ones learn from its detached outputs (in-place distillation, `ufo.train.distill_losses`): a
temperature KL on the logits of classification tasks, a cosine plus a relational loss on the
embeddings of identity tasks.

Random subnets are drawn from a generator seeded by (seed, step, k), so the sampler has no state
and a resumed run draws the same subnets. Every subnet takes the model's routes: those of a task
supernet run named by `init.kind: run`, else `train.paths` for every task and block.

Before the first step the heads and FFN hidden units are sorted by importance (Once-for-All's
`re_organize_middle_weights`), so the first-k slices of the smaller subnets keep the most
important ones; the largest subnet's function is unchanged. Embedding channels keep their order:
they are shared by every block, LayerNorm and head, and the patch embedding's slice is left as is.

`ChipStage` plugs this into the Trainer: its passes replace the one pass of All in One; the
step, the loop, checkpoints and logs are the Trainer's.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from ufo.arch import PATHS, Arch, Routes, SearchSpace
from ufo.checkpoint import load_checkpoint
from ufo.config import Config
from ufo.errors import CheckpointError, ConfigError
from ufo.model import UFOModel
from ufo.nn.attention import ElasticAttention
from ufo.nn.mlp import ElasticMlp
from ufo.nn.vit import Images, SuperViT
from ufo.tasks.base import Task
from ufo.train.distill_losses import distill_terms
from ufo.train.engine import Skip, Terms
from ufo.train.stage import Batch, Stage

DISTILL_TERMS = ("kl", "cos", "rel")
Tensors = dict[str, torch.Tensor]


# ----- importance re-ordering -----


@torch.no_grad()
def reorder_mlp(mlp: ElasticMlp) -> torch.Tensor:
    """Sort the hidden units by the L1 norm of their fc2 input column, most important first.

    fc1's rows (and bias) and fc2's columns are permuted together, so the expert's function is
    unchanged (GELU acts per unit). Returns the order applied (new position -> old unit)."""
    order = torch.argsort(mlp.fc2.weight.abs().sum(0), descending=True, stable=True)
    mlp.fc1.weight.copy_(mlp.fc1.weight[order])
    if mlp.fc1.bias is not None:
        mlp.fc1.bias.copy_(mlp.fc1.bias[order])
    mlp.fc2.weight.copy_(mlp.fc2.weight[:, order])
    return order


@torch.no_grad()
def reorder_heads(attn: ElasticAttention) -> torch.Tensor:
    """Sort the heads by the L1 norm of their proj input columns, most important first.

    q, k and v of each head move together through the (3, H, head_dim, C) view of qkv (and its
    bias), and proj's columns through (C, H, head_dim): attention is computed per head and the
    heads are concatenated in the order proj reads them, so the output is unchanged."""
    H, hd, C = attn.num_heads, attn.head_dim, attn.dim
    proj = attn.proj.weight.view(C, H, hd)
    order = torch.argsort(proj.abs().sum((0, 2)), descending=True, stable=True)
    proj.copy_(proj[:, order])
    qkv = attn.qkv.weight.view(3, H, hd, C)
    qkv.copy_(qkv[:, order])
    if attn.qkv.bias is not None:
        b = attn.qkv.bias.view(3, H, hd)
        b.copy_(b[:, order])
    return order


def reorder_by_importance(vit: SuperViT) -> dict[str, list[int]]:
    """Re-order every block's heads and the hidden units of its shared and task experts.

    Returns the orders applied, keyed like `blocks.0.attn` or `blocks.0.mlp.experts.T`."""
    orders = {}
    for i, blk in enumerate(vit.super_blocks()):
        orders[f"blocks.{i}.attn"] = reorder_heads(blk.attn).tolist()
        orders[f"blocks.{i}.mlp.shared"] = reorder_mlp(blk.mlp.shared).tolist()
        for t, expert in blk.mlp.experts.items():
            orders[f"blocks.{i}.mlp.experts.{t}"] = reorder_mlp(cast(ElasticMlp, expert)).tolist()
    return orders


# ----- routes -----


def chip_routes(cfg: Config, space: SearchSpace) -> Routes:
    """The FFN path of every task and block that every subnet of the chip supernet takes.

    A task supernet run given as `init.kind: run` brings its frozen routes (its routers' argmax);
    otherwise `train.paths` holds for every task and block."""
    if cfg.init.kind == "run" and cfg.init.path is not None:
        path = Path(cfg.init.path)
        file = path / "model.safetensors" if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(
                f"init.path: {file} not found; expected a trained run folder or its model.safetensors"
            )
        manifest = load_checkpoint(file)[1]
        stage = ((manifest.get("config") or {}).get("train") or {}).get("stage")
        if stage == "task_supernet":
            routes = manifest.get("routes") or {}
            if sorted(routes) != sorted(space.tasks) or any(len(r) != space.max_depth for r in routes.values()):
                raise CheckpointError(
                    f"init.path: {file} has routes for {sorted(routes)} that do not fit this "
                    f"model's tasks {space.tasks} and depth {space.max_depth}"
                )
            return {t: list(routes[t]) for t in space.tasks}
    if cfg.train.paths is None:
        raise ConfigError(
            "train.paths: null leaves the paths to the router, but train.stage chip_supernet needs "
            "fixed routes; set train.paths (e.g. shared) or init from a task_supernet run "
            "(init.kind: run)"
        )
    return {t: [cfg.train.paths] * space.max_depth for t in space.tasks}


@torch.no_grad()
def freeze_routes(vit: SuperViT, routes: Routes) -> None:
    """Make each router's argmax pick `routes` (a no-op for routes a task supernet froze), so that
    `ufo eval --arch`, extraction and search, which read the routers, take the trained paths."""
    for j, t in enumerate(vit.tasks):
        for blk, p in zip(vit.super_blocks(), routes[t]):
            logits = blk.mlp.router_logits[j]
            k = PATHS.index(p)
            if int(logits.argmax()) != k:
                logits[k] = logits.max() + 1.0


# ----- the stage -----


class ChipStage(Stage):
    """The sandwich rule with in-place distillation: several passes per step, whose gradients add up
    and are averaged across ranks by the stage itself (each pass uses other parameters)."""

    ddp = False
    no_fsdp = ""
    no_compile = "every pass of a step runs another subnet, and each new subnet compiles anew"

    def __init__(self, cfg: Config, model: UFOModel) -> None:
        routes = chip_routes(cfg, model.space)
        super().__init__(cfg, model, model.space.largest(routes))
        self.routes, self.chip = routes, cfg.chip_supernet

    @classmethod
    def check(cls, cfg: Config) -> None:
        if cfg.train.arch not in (None, "largest"):
            raise ConfigError(
                f"train.arch: {cfg.train.arch!r} fixes one subnet, but train.stage chip_supernet trains "
                "all of them (the largest, the smallest and random ones); remove train.arch"
            )
        unknown = [t for t in cfg.chip_supernet.tasks or [] if t not in cfg.tasks]
        if unknown:
            raise ConfigError(
                f"chip_supernet.tasks: unknown task(s) {unknown}; this config's tasks are {cfg.task_names}"
            )

    @property
    def tasks(self) -> list[str]:
        """`chip_supernet.tasks` (all tasks by default)."""
        return self.chip.tasks or self.cfg.task_names

    def step_module(self) -> nn.Module:
        return self.model  # never wrapped: `reduce_across_ranks` averages the gradients of all passes

    def log_fields(self) -> list[str]:
        return ["loss/largest", "loss/smallest", "loss/random", *(f"distill/{k}" for k in DISTILL_TERMS)]

    def fresh_start(self) -> bool:
        """Sort heads and hidden units by importance (resumed weights are sorted already)."""
        if self.chip.reorder:
            reorder_by_importance(self.model.backbone)
        return self.chip.reorder

    def check_resume(self, manifest: dict[str, Any], path: Path) -> None:
        """Refuse a checkpoint trained on other routes (e.g. the task supernet run named by
        init.path has changed since)."""
        saved = manifest.get("arch")
        if saved is not None and Arch.model_validate(saved) != self.arch:
            raise CheckpointError(
                f"{path} was trained at {saved}, but this run's largest subnet and "
                f"routes are {self.arch.model_dump()}; use a new --out folder"
            )

    def sandwich(self, step: int) -> list[tuple[str, Arch]]:
        """The subnets of a step: largest, smallest, then `num_random` drawn from (seed, step, k)."""
        s, r = self.model.space, self.routes
        archs = [("largest", s.largest(r)), ("smallest", s.smallest(r))]
        return archs + [
            ("random", s.sample(np.random.default_rng([self.cfg.seed, step, k]), r))
            for k in range(self.chip.num_random)
        ]

    def _pass(
        self, x: Images, ids: torch.Tensor, y: torch.Tensor, arch: Arch, teacher: Tensors | None
    ) -> tuple[torch.Tensor, Tensors, Tensors]:
        """One subnet on the batch: (its loss, logged terms, its detached outputs per task).

        Without a teacher the loss is the weighted label loss; with one, the distillation terms
        (plus the label loss at `label_weight`, or alone when distillation is off)."""
        m, c = self.model, self.chip
        m.set_arch(arch)
        feats = m.backbone(x, ids)
        total = feats.new_zeros((), dtype=torch.float32)
        terms: Tensors = {}
        outs: Tensors = {}
        label_w = 1.0 if teacher is None or not c.distill else c.label_weight
        for i, name in enumerate(m.tasks):
            rows = (ids == i).nonzero().flatten()
            if not rows.numel():
                continue
            head, f = cast(Task, m.heads[name]), feats[rows]
            if label_w > 0:
                label = head.loss(f, y[rows])
                terms[f"label/{name}"] = label.detach()
                total = total + label_w * self.cfg.tasks[name].loss_weight * self.share(name) * label
            if teacher is None:
                with torch.no_grad():
                    outs[name] = head(f).detach().float()  # logits are bf16 under autocast
            elif c.distill:
                for k, v in distill_terms(head.output, head(f), teacher[name], c.temperature).items():
                    terms[f"distill/{k}"] = terms.get(f"distill/{k}", 0.0) + v.detach()
                    total = total + c.distill_weight * self.share(name) * v
        return total, terms, outs

    def accumulate(
        self,
        x: Images,
        ids: torch.Tensor,
        y: torch.Tensor,
        archs: list[tuple[str, Arch]],
        amp: torch.autocast | None = None,
    ) -> Tensors | None:
        """Forward and backward every subnet in turn (gradients add up); the first one is the
        teacher of the rest. Returns the logged terms, or None after a non-finite loss."""
        logged: Tensors = {}
        teacher = None
        n_random = sum(kind == "random" for kind, _ in archs)
        n_students = len(archs) - 1
        for j, (kind, arch) in enumerate(archs):
            with amp or nullcontext():
                loss, terms, outs = self._pass(x, ids, y, arch, teacher if j else None)
            if not torch.isfinite(loss):
                return None
            loss.backward()
            if j == 0:
                teacher = outs
                logged |= {f"loss/{k[6:]}": v for k, v in terms.items() if k.startswith("label/")}
            for k, v in terms.items():
                if k.startswith("distill/"):
                    logged[k] = logged.get(k, 0.0) + v / max(1, n_students)
            w = 1.0 / n_random if kind == "random" else 1.0
            logged[f"loss/{kind}"] = logged.get(f"loss/{kind}", 0.0) + w * loss.detach()
            logged["loss"] = logged.get("loss", 0.0) + loss.detach()
        return logged

    def backward(self, forward: nn.Module, batch: Batch, step: int, amp: torch.autocast) -> Terms | Skip:
        x, ids, y = batch
        logged = self.accumulate(x, ids, y, self.sandwich(step), amp)
        self.model.set_arch(self.arch)
        world = tdist.get_world_size() if tdist.is_initialized() else 1
        if world > 1:  # every rank skips the step if one saw a non-finite loss
            bad = torch.tensor(float(logged is None), device=ids.device)
            tdist.all_reduce(bad)
            logged = None if bad.item() else logged
        if logged is None:
            return Skip("a sampled subnet")
        if world > 1:
            reduce_across_ranks(self.model, world)
        return self.global_terms(logged)

    def finish(self, final: UFOModel, out: Path) -> None:
        """The shipped model sits at the largest subnet, with its routers picking the trained routes."""
        for m in {id(self.model): self.model, id(final): final}.values():
            freeze_routes(m.backbone, self.routes)
            m.set_arch(self.arch)


def reduce_across_ranks(model: nn.Module, world: int) -> None:
    """Under torchrun: average the accumulated gradients over the ranks, and give every rank
    rank 0's buffers (BatchNorm statistics), as DDP would. The passes of one step use different
    parameters, so this is done once after all of them rather than by DDP's per-backward hooks.
    A parameter that no rank used keeps no gradient, so the optimiser leaves it alone."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    used = torch.tensor([float(p.grad is not None) for p in params], device=device)
    tdist.all_reduce(used)
    live = [p for p, u in zip(params, used.tolist()) if u > 0]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in live]
    flat = torch.cat([g.reshape(-1) for g in grads]) / world
    tdist.all_reduce(flat)
    for p, g in zip(live, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone()
    for b in model.buffers():
        tdist.broadcast(b, 0)
