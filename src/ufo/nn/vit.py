"""SuperViT: a ViT supernet elastic in depth, width, heads and FFN ratio, with task-routed FFNs.

`forward(x, task)` takes one task (name or index) or a tensor of task ids for a mixed batch. A
mixed batch is sorted by task once, so each TaskFFN sees contiguous per-task rows, then restored
to the input order. Task heads live outside the backbone; `forward` returns the normalised class
token, (B, active embed_dim).

Input size is dynamic: the position embedding is learnt on the space's base grid and resampled
(timm's `resample_abs_pos_embed`, bicubic) to the grid of the input, so a 112x112 face task, a
256x128 re-id task and a 224x224 classifier share one backbone. A mixed batch whose tasks differ
in size arrives as a list of same-size chunks (the loader's layout); each chunk runs through the
blocks on its own and the class tokens are concatenated in list order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from timm.layers import DropPath, resample_abs_pos_embed, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from ufo.arch import PATHS, Arch, Routes, SearchSpace, hidden_dim
from ufo.errors import TaskError
from ufo.nn.attention import ElasticAttention
from ufo.nn.elastic import ElasticLayerNorm
from ufo.nn.moe import Segment, TaskFFN
from ufo.nn.stem import elastic_embed


@dataclass(frozen=True, eq=False)
class Layout:
    """Where each task's rows lie in a batch, computed once per batch by `SuperViT.layout`.

    Working this out needs the task ids on the host (bincount, .tolist()), which a compiled region
    cannot do without a graph break; passing a Layout in place of the task ids keeps the whole
    forward one graph (torch.compile then specialises on the segment sizes).
    """

    segments: tuple[Segment, ...]  # (task, first row, end row) of the task-sorted batch
    order: torch.Tensor | None  # sorts the batch by task; None when it already is
    restore: torch.Tensor | None  # the inverse permutation of `order`
    # In eval, when a router picks some path: each block's path per task (its argmax, read once here
    # rather than inside the compiled region); None otherwise (training draws, or every path fixed).
    paths: tuple[tuple[int, ...], ...] | None = None

    @property
    def batch(self) -> int:
        return self.segments[-1][2] if self.segments else 0  # no segments: an empty chunk (FSDP)


TaskArg = str | int | torch.Tensor | Layout
Images = torch.Tensor | Sequence[torch.Tensor]


class SuperBlock(nn.Module):
    """Pre-norm transformer block: timm names (norm1, attn, norm2, mlp) with a TaskFFN as mlp."""

    def __init__(self, space: SearchSpace, drop_path: float) -> None:
        super().__init__()
        E = space.max_embed_dim
        self.norm1 = ElasticLayerNorm(E)
        self.attn = ElasticAttention(E, space.max_heads, space.head_dim, space.qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = ElasticLayerNorm(E)
        self.mlp = TaskFFN(E, space.max_hidden, space.tasks)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def set_active(self, dim: int, heads: int, mlp_ratio: float, paths: Sequence[str | None]) -> None:
        self.norm1.set_active(dim)
        self.attn.set_active(dim, heads)
        self.norm2.set_active(dim)
        self.mlp.set_active(dim, hidden_dim(dim, mlp_ratio), paths)

    def forward(self, x: torch.Tensor, segments: Sequence[Segment], paths: Sequence[int] | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x), segments, paths))


class SuperViT(nn.Module):
    def __init__(self, space: SearchSpace, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.space = space
        self.tasks = list(space.tasks)
        E = space.max_embed_dim
        self.patch_embed = elastic_embed(space)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, E))
        self.pos_embed = nn.Parameter(torch.zeros(1, space.num_patches + 1, E))
        dpr = torch.linspace(0, drop_path_rate, space.max_depth).tolist()
        self.blocks = nn.ModuleList(SuperBlock(space, dpr[i]) for i in range(space.max_depth))
        self.norm = ElasticLayerNorm(E)
        self._init_weights()
        self.arch = space.largest().model_copy(update={"paths": {}})
        self.set_arch(self.arch)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (timm's
        name for it): less memory for about one more forward. Random draws (drop path, Gumbel
        routes) are replayed exactly."""
        self.grad_checkpointing = enable

    def set_batched_experts(self, enable: bool = True) -> None:
        """Run a mixed batch's task experts as batched matmuls (`TaskFFN.batched`) instead of a
        loop over the task segments."""
        for blk in self.super_blocks():
            blk.mlp.batched = enable

    def compile_blocks(self) -> None:
        """torch.compile each block in place (its parameter names stay; timm and torchtitan compile
        per block too). A block's segments and eval paths are Python ints from `layout()`, so each
        block is one graph; a new layout (other task row counts) or arch compiles anew."""
        for blk in self.blocks:
            blk.compile()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def super_blocks(self) -> list[SuperBlock]:
        """All blocks (the largest depth) with their type (an nn.ModuleList yields plain Modules)."""
        return cast(list[SuperBlock], list(self.blocks))

    # ----- configuration -----
    def set_arch(self, arch: Arch) -> None:
        """Activate a subnet. Tasks without a fixed path in `arch` are routed by the router."""
        self.space.check(arch)
        self.arch = arch
        e = arch.embed_dim
        self.patch_embed.set_active(e)
        self.norm.set_active(e)
        for i, blk in enumerate(self.super_blocks()[: arch.depth]):
            paths = [arch.path(t, i) for t in self.tasks]
            blk.set_active(e, arch.num_heads[i], arch.mlp_ratio[i], paths)

    def set_temperature(self, tau: float) -> None:
        """Gumbel-Softmax temperature of every router (the trainer anneals it)."""
        for blk in self.super_blocks():
            blk.mlp.tau = tau

    def routes(self) -> Routes:
        """Each task's path per block of the largest depth, as the routers choose them in eval."""
        chosen = self._argmax(self.super_blocks())
        return {t: [PATHS[c[i]] for c in chosen] for i, t in enumerate(self.tasks)}

    @staticmethod
    def _argmax(blocks: Sequence[SuperBlock]) -> list[list[int]]:
        """Each block's router argmax per task, read from the device in one transfer."""
        return torch.stack([blk.mlp.router_logits.detach() for blk in blocks]).argmax(-1).tolist()

    def eval_paths(self) -> tuple[tuple[int, ...], ...] | None:
        """In eval, each active block's path per task (fixed, else the router's argmax); None in
        training or when the arch fixes every path (see `Layout.paths`)."""
        blocks = self.super_blocks()[: self.arch.depth]
        if self.training or all(f is not None for blk in blocks for f in blk.mlp.fixed):
            return None
        chosen = self._argmax(blocks)
        return tuple(
            tuple(c if f is None else f for c, f in zip(row, blk.mlp.fixed)) for row, blk in zip(chosen, blocks)
        )

    def router_state(self) -> dict[str, list[list[float]]]:
        """Router logits per task and block, for the checkpoint manifest."""
        blocks = self.super_blocks()
        return {t: [blk.mlp.router_logits[i].tolist() for blk in blocks] for i, t in enumerate(self.tasks)}

    def task_index(self, task: str | int) -> int:
        if isinstance(task, int):
            if not 0 <= task < len(self.tasks):
                raise TaskError(f"task index {task} out of range; this model has {len(self.tasks)} tasks")
            return task
        try:
            return self.tasks.index(task)
        except ValueError:
            raise TaskError(f"unknown task {task!r}; this model's tasks are {self.tasks}") from None

    # ----- forward -----
    def layout(self, task: TaskArg, batch: int) -> Layout:
        """Per-task row ranges of a batch, plus the sort order when a mixed batch must be regrouped.
        Reads the ids on the host: call it outside a compiled region and pass the result as `task`."""
        if isinstance(task, Layout):
            if task.batch != batch:
                raise TaskError(f"got a layout of {task.batch} rows for a batch of {batch}")
            return task
        if not isinstance(task, torch.Tensor):
            return Layout(((self.task_index(task), 0, batch),), None, None, self.eval_paths())
        ids = task.to(torch.long).flatten()
        if ids.numel() != batch:
            raise TaskError(f"got {ids.numel()} task ids for a batch of {batch}")
        counts = torch.bincount(ids, minlength=len(self.tasks))
        if counts.numel() > len(self.tasks) or (ids < 0).any():
            raise TaskError(f"task ids must lie in [0, {len(self.tasks)}); got {ids.unique().tolist()}")
        order = restore = None
        if not bool((ids[1:] >= ids[:-1]).all()):
            order = torch.argsort(ids, stable=True)
            restore = torch.argsort(order)
        segments, start = [], 0
        for t, n in enumerate(counts.tolist()):
            if n:
                segments.append((t, start, start + n))
                start += n
        return Layout(tuple(segments), order, restore, self.eval_paths())

    def pos_embed_at(self, grid: tuple[int, int], dim: int) -> torch.Tensor:
        """The first `dim` channels of the position embedding (class token first) for a token grid."""
        pos = self.pos_embed[:, :, :dim]
        base = self.space.grid()
        if tuple(grid) == base:
            return pos
        return resample_abs_pos_embed(pos, new_size=list(grid), old_size=list(base), num_prefix_tokens=1)

    def forward_features(
        self, x: torch.Tensor, task: TaskArg, mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        """All tokens after the final norm: (B, 1 + num_patches, embed_dim), for one input size.

        With `mask` ((B, num_patches) bool, True = hidden), the embeddings of masked patches are
        replaced by `mask_token` (its first embed_dim entries) before the position embedding is
        added, as masked image modelling needs. The token lives with the caller, not here.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError("forward_features takes one tensor of one input size; forward() takes a list of sizes")
        layout = self.layout(task, x.shape[0])
        segments, order = layout.segments, layout.order
        if order is not None:
            x = x[order]
            mask = None if mask is None else mask[order]
        e, p = self.arch.embed_dim, self.space.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        x = self.patch_embed(x)  # (B, N, e)
        if mask is not None:
            if mask_token is None:
                raise ValueError("forward_features: a patch mask needs a mask_token")
            if mask.shape != x.shape[:2]:
                raise ValueError(f"forward_features: mask of shape {tuple(mask.shape)}, expected {tuple(x.shape[:2])}")
            x = torch.where(mask.unsqueeze(-1), mask_token.reshape(-1)[:e].to(x.dtype), x)
        x = torch.cat([self.cls_token[:, :, :e].expand(x.shape[0], -1, -1), x], 1) + self.pos_embed_at(grid, e)
        for i, blk in enumerate(self.blocks[: self.arch.depth]):
            paths = None if layout.paths is None else layout.paths[i]
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, segments, paths, use_reentrant=False)
            else:
                x = blk(x, segments, paths)
        x = self.norm(x)
        if layout.restore is not None:
            x = x[layout.restore]
        return x

    def forward(self, x: Images, task: TaskArg) -> torch.Tensor:
        """Class-token features: (B, embed_dim). `x` is one tensor, or a list of chunks of different
        input sizes whose rows `task` (a tensor of ids) lists in order."""
        if isinstance(x, torch.Tensor):
            return self.forward_features(x, task)[:, 0]
        if isinstance(task, Layout):
            raise TypeError("a Layout describes one tensor; pass task ids with a list of chunks")
        chunks = list(x)
        if len(chunks) == 1:
            return self.forward_features(chunks[0], task)[:, 0]
        sizes = [c.shape[0] for c in chunks]
        if not isinstance(task, torch.Tensor):
            return torch.cat([self.forward_features(c, task)[:, 0] for c in chunks])
        if task.numel() != sum(sizes):
            raise TaskError(f"got {task.numel()} task ids for chunks of {sizes} images")
        ids = task.flatten().split(sizes)
        return torch.cat([self.forward_features(c, i)[:, 0] for c, i in zip(chunks, ids)])
