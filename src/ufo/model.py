"""UFOModel: the SuperViT backbone plus one head per task (heads live outside the backbone)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import torch
from torch import nn

from ufo.arch import Arch, SearchSpace
from ufo.nn.vit import SuperViT
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
