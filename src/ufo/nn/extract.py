"""Extraction: SuperViT + Arch + task(s) -> a standalone model of stock torch / timm layers.

One task gives a timm `VisionTransformer` (timm parameter names, per-block heads and FFN widths,
a mix path folded into one wider FFN). Several tasks give a `MultiTaskViT`: the shared weights
once, plus each task's chosen experts, with the routes as a fixed table. Either model's outputs
equal the supernet's at that arch, and its parameter count is `SearchSpace.num_params`.

Input sizes: the timm ViT of one task is built at that task's size (`SearchSpace.input_size`) and
holds the position embedding already resampled to its grid, so it is a plain fixed-size timm model.
A MultiTaskViT keeps the base-grid embedding and resamples it to each input, as the supernet does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from timm.layers import Attention, Mlp, resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ufo.arch import Arch, SearchSpace, hidden_dim
from ufo.errors import ArchError
from ufo.nn.mlp import ElasticMlp
from ufo.nn.stem import static_embed
from ufo.nn.timm_vit import create_vit, vit_kwargs
from ufo.nn.vit import SuperViT


def resolve_arch(model: SuperViT, arch: Arch | None, tasks: Sequence[str]) -> Arch:
    """`arch` (default: the model's active one) with every task's path fixed: the arch's own where
    it has one, else the router's frozen choice."""
    arch = model.arch if arch is None else arch
    model.space.check(arch)
    for t in tasks:
        model.task_index(t)
    routes = model.routes()
    paths = {t: list(arch.paths.get(t) or routes[t][: arch.depth]) for t in tasks}
    return arch.model_copy(update={"paths": paths})


def build_vit(space: SearchSpace, arch: Arch, task: str) -> VisionTransformer:
    """An uninitialised timm ViT with the shape of `task`'s path through `arch` (timm's `ufo_vit`)."""
    return create_vit(**vit_kwargs(space, arch, task), weight_init="skip")


class StaticTaskFFN(nn.Module):
    """The FFNs one block keeps for a set of tasks, with a fixed route per task."""

    mix_weights: torch.Tensor  # a buffer

    def __init__(self, dim: int, hidden: int, routes: dict[str, str]) -> None:
        super().__init__()
        self.routes = dict(routes)
        uses_shared = any(p in ("shared", "mix") for p in routes.values())
        self.shared = Mlp(dim, hidden) if uses_shared else None
        self.experts = nn.ModuleDict({t: Mlp(dim, hidden) for t, p in routes.items() if p in ("task", "mix")})
        # Mix weights are constants of the extracted model (softmax of the router's mix logits).
        self.register_buffer("mix_weights", torch.zeros(len(routes), 2))
        self.tasks = list(routes)

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        path = self.routes[task]
        if path == "task":
            return self.experts[task](x)
        assert self.shared is not None  # built when a route is shared or mix
        if path == "shared":
            return self.shared(x)
        w = self.mix_weights[self.tasks.index(task)]
        return w[0] * self.shared(x) + w[1] * self.experts[task](x)


class MultiTaskBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int, qkv_bias: bool, routes: dict[str, str]):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, attn_head_dim=head_dim, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = StaticTaskFFN(dim, hidden, routes)

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x), task)


class MultiTaskViT(nn.Module):
    """A ViT whose blocks share attention and keep only the FFN experts the given tasks route to."""

    def __init__(self, space: SearchSpace, arch: Arch, tasks: Sequence[str]) -> None:
        super().__init__()
        e = arch.embed_dim
        self.tasks = list(tasks)
        self.patch_size, self.grid = space.patch_size, space.grid()
        self.patch_embed = static_embed(space, e, dynamic=True)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, e))
        self.pos_embed = nn.Parameter(torch.zeros(1, space.num_patches + 1, e))
        self.blocks = nn.ModuleList(
            MultiTaskBlock(
                e,
                arch.num_heads[i],
                space.head_dim,
                hidden_dim(e, arch.mlp_ratio[i]),
                space.qkv_bias,
                {t: arch.paths[t][i] for t in self.tasks},
            )
            for i in range(arch.depth)
        )
        self.norm = nn.LayerNorm(e, eps=1e-6)

    def forward_features(self, x: torch.Tensor, task: str) -> torch.Tensor:
        if task not in self.tasks:
            raise ArchError(f"unknown task {task!r}; this model serves {self.tasks}")
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        pos = (
            self.pos_embed
            if grid == self.grid
            else resample_abs_pos_embed(
                self.pos_embed, new_size=list(grid), old_size=list(self.grid), num_prefix_tokens=1
            )
        )
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + pos
        for blk in self.blocks:
            x = blk(x, task)
        return self.norm(x)

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.forward_features(x, task)[:, 0]


def build_extracted(space: SearchSpace, arch: Arch, tasks: Sequence[str]) -> VisionTransformer | MultiTaskViT:
    """The empty standalone model for `arch` (all paths fixed) and `tasks`: used by extract and load."""
    missing = [t for t in tasks if t not in arch.paths]
    if missing:
        raise ArchError(f"arch has no paths for tasks {missing}; extraction needs a path for every task")
    return build_vit(space, arch, tasks[0]) if len(tasks) == 1 else MultiTaskViT(space, arch, tasks)


@torch.no_grad()
def extract(model: SuperViT, arch: Arch | None = None, tasks: str | Sequence[str] | None = None) -> nn.Module:
    """Copy `tasks`' paths through `arch` out of the supernet into a standalone eval-mode model.

    The returned model carries `ufo_arch` (the arch with every path fixed) and `ufo_tasks`.
    """
    tasks = list(model.tasks if tasks is None else [tasks] if isinstance(tasks, str) else tasks)
    arch = resolve_arch(model, arch, tasks)
    prev = model.arch
    model.set_arch(arch)
    try:
        out = build_extracted(model.space, arch, tasks)
        e = arch.embed_dim
        model.patch_embed.extract_into(out.patch_embed)
        # ufo_vit and MultiTaskViT both have a class token and an absolute position embedding
        assert out.cls_token is not None and out.pos_embed is not None
        out.cls_token.copy_(model.cls_token[:, :, :e])
        grid = model.space.grid(tasks[0]) if len(tasks) == 1 else model.space.grid()
        out.pos_embed.copy_(model.pos_embed_at(grid, e))
        out.norm.load_state_dict(model.norm.extract().state_dict())
        for src, dst in zip(model.super_blocks(), cast(Sequence[Block | MultiTaskBlock], out.blocks)):
            dst.norm1.load_state_dict(src.norm1.extract().state_dict())
            dst.norm2.load_state_dict(src.norm2.extract().state_dict())
            dst.attn.load_state_dict(src.attn.extract().state_dict())
            if len(tasks) == 1:
                dst.mlp.load_state_dict(src.mlp.extract_single(model.task_index(tasks[0])).state_dict())
                continue
            assert isinstance(dst, MultiTaskBlock)  # several tasks build a MultiTaskViT
            if dst.mlp.shared is not None:
                dst.mlp.shared.load_state_dict(src.mlp.shared.extract().state_dict())
            for t in dst.mlp.experts:
                dst.mlp.experts[t].load_state_dict(cast(ElasticMlp, src.mlp.experts[t]).extract().state_dict())
            for j, t in enumerate(tasks):
                dst.mlp.mix_weights[j] = src.mlp.mix_weights(model.task_index(t))
    finally:
        model.set_arch(prev)
    mark_extracted(out, arch, tasks)
    return out.eval()


def mark_extracted(model: nn.Module, arch: Arch, tasks: list[str]) -> None:
    """Tag a standalone model with its arch (every path fixed) and tasks: `ufo_arch`, `ufo_tasks`."""
    # nn.Module.__setattr__ takes any value; torch types it for tensors and modules only
    model.ufo_arch, model.ufo_tasks = arch, tasks  # type: ignore[assignment]
