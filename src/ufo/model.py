"""UFOModel: the SuperViT backbone plus one head per task (heads live outside the backbone); building
one from a config, and its trained model file (`kind: ufo_model`).

A trained model file holds the backbone and every head; its manifest carries the config, the
search space, each head's kind and class count, the training arch, routes and router state, so
loading needs no data.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ufo.arch import Arch, SearchSpace
from ufo.checkpoint import load_checkpoint, load_state_checked, save_checkpoint
from ufo.config import Config, parse_config
from ufo.errors import CheckpointError
from ufo.nn.vit import SuperViT
from ufo.tasks import task_class
from ufo.tasks.base import Task


class UFOModel(nn.Module):
    def __init__(self, space: SearchSpace, heads: Mapping[str, Task], drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if list(heads) != list(space.tasks):
            raise ValueError(f"heads {list(heads)} must follow the space's task order {space.tasks}")
        self.backbone = SuperViT(space, drop_path_rate)
        self.heads = nn.ModuleDict(heads)
        self.set_arch(self.backbone.arch)

    @property
    def space(self) -> SearchSpace:
        return self.backbone.space

    @property
    def tasks(self) -> list[str]:
        return self.backbone.tasks

    @property
    def arch(self) -> Arch:
        return self.backbone.arch

    def head(self, task: str) -> Task:
        """The head of `task`, with its type (an nn.ModuleDict yields plain Modules)."""
        return cast(Task, self.heads[task])

    def set_arch(self, arch: Arch) -> None:
        self.backbone.set_arch(arch)
        for t in self.heads:
            self.head(t).set_input_dim(arch.embed_dim)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per backbone block (see SuperViT.set_grad_checkpointing)."""
        self.backbone.set_grad_checkpointing(enable)

    def set_batched_experts(self, enable: bool = True) -> None:
        """Batched task experts for mixed batches (see SuperViT.set_batched_experts)."""
        self.backbone.set_batched_experts(enable)

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """One task's eval output (logits or L2-normalised embedding)."""
        return self.heads[task](self.backbone(x, task))

    def task_losses(self, x: torch.Tensor, task_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-task losses of a mixed batch (rows grouped by task, in task order)."""
        feats = self.backbone(x, task_ids)
        out = {}
        for i, name in enumerate(self.tasks):
            rows = (task_ids == i).nonzero().flatten()
            if rows.numel():
                out[name] = self.head(name).loss(feats[rows], labels[rows])
        return out

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}


def build_model(cfg: Config, num_classes: dict[str, int]) -> UFOModel:
    space = cfg.space()
    heads = {n: task_class(t.kind)(n, t.options, num_classes[n], space.max_embed_dim) for n, t in cfg.tasks.items()}
    return UFOModel(space, heads, cfg.model.drop_path_rate)


def arch_from_spec(spec: str, space: SearchSpace, routes: dict | None = None) -> Arch:
    """`largest`, `smallest`, `random:SEED` or a path to an arch JSON file."""
    from ufo.errors import ArchError

    if spec == "largest":
        return space.largest(routes)
    if spec == "smallest":
        return space.smallest(routes)
    if spec.startswith("random:"):
        try:
            return space.sample(int(spec.split(":", 1)[1]), routes)
        except ValueError:
            raise ArchError(f"arch {spec!r}: expected random:SEED with an integer seed") from None
    arch = Arch.load(spec)
    space.check(arch)
    return arch


def resolve_train_arch(cfg: Config, space: SearchSpace) -> Arch:
    """The fixed arch of All-in-One training, with `train.paths` for every task (None: the router)."""
    arch = arch_from_spec(cfg.train.arch or "largest", space)
    p = cfg.train.paths
    return arch.model_copy(update={"paths": {} if p is None else {t: [p] * arch.depth for t in space.tasks}})


def save_model(path: str | Path, model: UFOModel, cfg: Config, arch: Arch, extra: dict[str, Any] | None = None) -> None:
    heads = {n: {"kind": h.kind, "num_classes": h.num_classes} for n, h in model.heads.items()}
    manifest = {
        "kind": "ufo_model",
        "config": cfg.model_dump(mode="json"),
        "space": model.space.model_dump(),
        "tasks": model.tasks,
        "heads": heads,
        "arch": arch.model_dump(),
        "routes": model.backbone.routes(),
        "router": model.backbone.router_state(),
        **(extra or {}),
    }
    save_checkpoint(path, model.state_dict(), manifest)


def load_model(path: str | Path) -> tuple[UFOModel, Config, dict[str, Any]]:
    """(model in eval mode at its training arch, config, manifest) of a trained model file."""
    tensors, manifest = load_checkpoint(path)
    if manifest.get("kind") != "ufo_model":
        raise CheckpointError(f"{path} holds a {manifest.get('kind')!r} checkpoint, not a trained UFO model")
    cfg = parse_config(manifest["config"], str(path))
    model = build_model(cfg, {n: h["num_classes"] for n, h in manifest["heads"].items()})
    load_state_checked(model, tensors, path)
    model.set_arch(Arch.model_validate(manifest["arch"]))
    return model.eval(), cfg, manifest
