"""Task supernet (`train.stage: task_supernet`): learn each (task, block)'s FFN path.

Every task's path is left to the router (the training arch fixes none), so each TaskFFN draws a
path per (task, block) and step with Gumbel-Softmax, straight-through hard: the forward takes one
path, the router logits get the soft gradient. The temperature is annealed from `tau_start` to
`tau_end`, a pure function of the step (exact resume). The shared expert sees every task's rows;
a task expert only its own task's. An optional cost (`expert_cost`) makes a task pay for its own
expert (`expected_extra`). At the end the routes are frozen (router argmax) into the training
arch, so `model.safetensors`, `ufo eval` and `ufo extract` use them; `routes.json` and
`routing_map.png` report them. `RoutingStage` plugs this into the Trainer, whose step, loop,
checkpoints, logs and non-finite handling it uses.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ufo.arch import PATHS, Arch, Routes, SearchSpace, hidden_dim
from ufo.checkpoint import atomic_write, atomic_write_text
from ufo.config import Config, TaskSupernetConfig
from ufo.errors import ConfigError
from ufo.model import UFOModel, resolve_train_arch
from ufo.nn.moe import MIX, TASK
from ufo.nn.vit import SuperViT
from ufo.train import distributed as dist
from ufo.train.engine import Skip, Terms
from ufo.train.stage import Batch, Stage, TrainStep

ROUTER_SUFFIXES = ("router_logits", "mix_logits")
COLOURS = {"shared": "#4c72b0", "task": "#dd8452", "mix": "#55a868"}


# ----- the schedule and the cost -----


def temperature(step: int, steps: int, cfg: TaskSupernetConfig) -> float:
    """Gumbel-Softmax temperature of `step` (0-based) in a run of `steps`: tau_start at step 0,
    tau_end at the last step; geometric (`exponential`) or `linear` in between."""
    frac = min(1.0, step / max(1, steps - 1))
    if cfg.anneal == "linear":
        return cfg.tau_start + (cfg.tau_end - cfg.tau_start) * frac
    return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** frac


def expert_weights(space: SearchSpace, arch: Arch) -> list[float]:
    """Per block i of `arch`: F_i / P0, the parameters of one task expert (fc1 + fc2 with biases,
    2 e h_i + h_i + e) over those of the all-task model with every path shared
    (`space.num_params`). A task that takes its own expert in block i (path task or mix) adds F_i
    to the model that serves every task."""
    shared = arch.model_copy(update={"paths": {t: ["shared"] * arch.depth for t in space.tasks}})
    base = space.num_params(shared)
    e = arch.embed_dim
    return [(2 * e * h + h + e) / base for h in (hidden_dim(e, r) for r in arch.mlp_ratio)]


def expected_extra(vit: SuperViT, weights: Sequence[float]) -> torch.Tensor:
    """Expected extra parameters of the task experts, as a fraction of the all-shared model:

        cost = sum_t sum_i weights[i] * (p[t, i, task] + p[t, i, mix]),  p[t, i] = softmax(router_logits[t] of block i)

    The softmax is at temperature 1 (the probabilities whose argmax the routes freeze), not the
    annealed Gumbel temperature, so the cost's gradient does not grow as tau falls.
    """
    terms = [w * blk.mlp.router_logits.softmax(-1)[:, [TASK, MIX]].sum() for w, blk in zip(weights, vit.super_blocks())]
    return torch.stack(terms).sum()


def route_counts(routes: Routes) -> dict[str, dict[str, int]]:
    """Per task, how many blocks take each path."""
    return {t: {p: r.count(p) for p in PATHS} for t, r in routes.items()}


class RoutingStep(TrainStep):
    """Task losses plus `cost` (see `expected_extra`). The cost is computed inside forward so that
    under DDP every router it touches is part of the wrapped graph; without a cost weight it is
    computed without gradient, for the log only."""

    def __init__(self, model: UFOModel, weights: Sequence[float], with_grad: bool) -> None:
        super().__init__(model)
        self.weights, self.with_grad = list(weights), with_grad

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = self.model.task_losses(x, task_ids, labels)
        with torch.set_grad_enabled(self.with_grad and torch.is_grad_enabled()):
            cost = expected_extra(self.model.backbone, self.weights)
        return {**losses, "cost": cost}


# ----- the stage -----


class RoutingStage(Stage):
    """Every path left to the router, an annealed Gumbel temperature, a router parameter group,
    the optional expert cost, and the routes frozen into the shipped model at the end."""

    no_fsdp = " (the expert cost reads every router outside its block)"

    def __init__(self, cfg: Config, model: UFOModel) -> None:
        # `train.paths` does not apply: this stage leaves every task's path to the router
        super().__init__(cfg, model, resolve_train_arch(cfg, model.space).model_copy(update={"paths": {}}))
        self.rcfg = cfg.task_supernet

    @classmethod
    def check(cls, cfg: Config) -> None:
        paths = cfg.space().paths
        missing = [p for p in PATHS if p not in paths]
        if missing:
            raise ConfigError(
                f"model.paths: {paths} leaves out {missing}; train.stage task_supernet routes over all of "
                "shared, task and mix"
            )

    def param_groups(self) -> list[dict[str, Any]]:
        """The usual groups, but the routers in their own (faster, undecayed) group, last."""
        router = [p for n, p in self.model.named_parameters() if n.endswith(ROUTER_SUFFIXES)]
        ids = {id(p) for p in router}
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in super().param_groups()]
        t = self.cfg.train
        router_group = {"params": router, "lr": t.lr * self.rcfg.router_lr_scale, "weight_decay": 0.0, "name": "router"}
        return [g for g in groups if g["params"]] + [router_group]

    def step_module(self) -> nn.Module:
        """The cost weights depend on the arch's widths and depth only, not on its paths."""
        weights = expert_weights(self.model.space, self.arch)
        return RoutingStep(self.model, weights, with_grad=self.rcfg.expert_cost > 0)

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        total = super().total_loss({n: v for n, v in losses.items() if n != "cost"})
        return total + self.rcfg.expert_cost * losses["cost"] if self.rcfg.expert_cost > 0 else total

    def backward(self, forward: nn.Module, batch: Batch, step: int, amp: torch.autocast) -> Terms | Skip:
        self.model.backbone.set_temperature(temperature(step, self.cfg.train.steps, self.rcfg))
        return super().backward(forward, batch, step, amp)

    def log_fields(self) -> list[str]:
        return ["loss/cost", "tau", *(f"routes/{t}/{p}" for t in self.model.tasks for p in PATHS)]

    def log_row(self, step: int) -> dict[str, float]:
        counts = route_counts(self.routes(self.model))
        tau = temperature(step, self.cfg.train.steps, self.rcfg)
        return {"tau": tau, **{f"routes/{t}/{p}": float(n) for t, c in counts.items() for p, n in c.items()}}

    def routes(self, model: UFOModel) -> Routes:
        """The routers' eval choices over the blocks of the training arch."""
        return {t: r[: self.arch.depth] for t, r in model.backbone.routes().items()}

    def finish(self, final: UFOModel, out: Path) -> None:
        """Freeze the routes (router argmax of the shipped weights) into the training arch, then
        report them: routes.json, routing_map.png and a table on the console."""
        self.arch = self.arch.with_routes(self.routes(final))
        for m in (self.model, final):
            m.set_arch(self.arch)
        if not dist.is_main():
            return
        steps = self.cfg.train.steps
        report = routing_report(final, self.arch, steps, temperature(steps - 1, steps, self.rcfg))
        atomic_write_text(out / "routes.json", json.dumps(report, indent=2))
        plot_routing_map(report["routes"], out / "routing_map.png", report["probs"])
        dist.info(format_routes(report))


# ----- reporting -----


def routing_report(model: UFOModel, arch: Arch, steps: int, tau: float) -> dict[str, Any]:
    """Frozen routes, per-task path counts, router probabilities, mix weights and the parameter
    counts they lead to (one task alone, and all tasks together)."""
    vit, space = model.backbone, model.space
    blocks = vit.super_blocks()[: arch.depth]
    probs = {t: [blk.mlp.router_logits[j].softmax(-1).tolist() for blk in blocks] for j, t in enumerate(vit.tasks)}
    mix = {t: [blk.mlp.mix_weights(j).tolist() for blk in blocks] for j, t in enumerate(vit.tasks)}
    shared = arch.model_copy(update={"paths": {t: ["shared"] * arch.depth for t in vit.tasks}})
    with torch.no_grad():
        extra = float(expected_extra(vit, expert_weights(space, arch)))
    return {
        "routes": {t: list(arch.paths[t]) for t in vit.tasks},
        "counts": route_counts({t: list(arch.paths[t]) for t in vit.tasks}),
        "probs": probs,
        "mix_weights": mix,
        "params": {
            "all_tasks": space.num_params(arch),
            "all_tasks_all_shared": space.num_params(shared),
            **{t: space.num_params(arch, t) for t in vit.tasks},
        },
        "expected_extra_params": extra,
        "steps": steps,
        "tau_end": tau,
    }


def format_routes(report: dict[str, Any]) -> str:
    """A plain-text table: per task its path in every block and the count of each path."""
    width = max(len(t) for t in report["routes"])
    lines = ["routes (frozen into model.safetensors; S = shared, T = task, M = mix):"]
    for t, r in report["routes"].items():
        c = report["counts"][t]
        lines.append(
            f"  {t:<{width}}  {' '.join(p[0].upper() for p in r)}   " + ", ".join(f"{p} {c[p]}" for p in PATHS)
        )
    p = report["params"]
    lines.append(f"  parameters of the all-task model: {p['all_tasks']:,} (all shared: {p['all_tasks_all_shared']:,})")
    return "\n".join(lines)


def plot_routing_map(routes: Routes, path: str | Path, probs: dict[str, list[list[float]]] | None = None) -> None:
    """Tasks (rows) by blocks (columns), each cell coloured by its path and labelled with the
    router's probability of that path; written atomically as a PNG."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    tasks = list(routes)
    depth = len(next(iter(routes.values())))
    grid = [[PATHS.index(p) for p in routes[t]] for t in tasks]
    fig = Figure(figsize=(2.4 + 0.55 * depth, 1.2 + 0.45 * len(tasks)), layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(grid, cmap=ListedColormap([COLOURS[p] for p in PATHS]), vmin=-0.5, vmax=len(PATHS) - 0.5, aspect="auto")
    if probs is not None:
        for r, t in enumerate(tasks):
            for c, k in enumerate(grid[r]):
                ax.text(c, r, f"{probs[t][c][k]:.2f}", ha="center", va="center", fontsize=7, color="white")
    ax.set_xticks(range(depth), [str(i) for i in range(depth)])
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("block")
    ax.set_title("FFN path per task and block", fontsize=10)
    ax.legend(
        handles=[Patch(color=COLOURS[p], label=p) for p in PATHS],
        loc="upper left",
        bbox_to_anchor=(1.02, 1),
        borderaxespad=0,
        fontsize=8,
        frameon=False,
    )
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
