"""Optimiser parameter groups and the warm-up + cosine learning-rate schedule.

Groups: decayed weights; no decay for norms, biases, embeddings and router/mix logits; each task's
head and FFN expert scaled by the task's `lr_scale`; margin-loss class centres in their own group
(higher LR, no decay), as margin losses need.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn

from ufo.config import Config, TrainConfig
from ufo.tasks.base import Task

NO_DECAY_SUFFIXES = ("router_logits", "mix_logits", "pos_embed", "cls_token")


def _no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim <= 1 or name.endswith(NO_DECAY_SUFFIXES)


def _task_of(name: str, tasks: list[str]) -> str | None:
    """The task a parameter belongs to (its head or its FFN expert), or None if shared."""
    parts = name.split(".")
    if parts[0] == "heads":
        return parts[1]
    if "experts" in parts:
        return parts[parts.index("experts") + 1]
    return None


def param_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    t = cfg.train
    heads = cast(nn.ModuleDict, model.heads)
    margin_ids = {id(p) for head in heads.values() for p in cast(Task, head).margin_parameters()}
    groups: dict[tuple, dict] = {}
    key: tuple[str, str | float | None]
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        task = _task_of(name, cfg.task_names)
        scale = cfg.tasks[task].lr_scale if task else 1.0
        if id(p) in margin_ids:
            key = ("margin", task)
            lr, wd = t.lr * t.margin_lr_scale * scale, 0.0
        else:
            nd = _no_decay(name, p)
            key = ("no_decay" if nd else "decay", scale)
            lr, wd = t.lr * scale, 0.0 if nd else t.weight_decay
        g = groups.setdefault(key, {"params": [], "lr": lr, "weight_decay": wd, "name": "/".join(map(str, key))})
        g["params"].append(p)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """The optimiser over `param_groups(model, cfg)`."""
    return make_optimizer(param_groups(model, cfg), cfg.train)


def make_optimizer(groups: list[dict[str, Any]], t: TrainConfig) -> torch.optim.Optimizer:
    """`t.optimizer` (AdamW, or SGD with Nesterov momentum) over parameter groups."""
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, 0.999))


def lr_factor(step: int, t: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to min_lr / lr at the last step."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    floor = t.min_lr / t.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def set_lr(opt: torch.optim.Optimizer, base_lrs: list[float], step: int, t: TrainConfig) -> float:
    """Set every group's LR for `step`; returns the factor. Stateless, so resume needs no scheduler state."""
    f = lr_factor(step, t)
    for g, base in zip(opt.param_groups, base_lrs):
        g["lr"] = base * f
    return f
