"""Arch (one subnet of the supernet) and SearchSpace (the set of allowed subnets).

A SearchSpace also fixes the supernet's constant dimensions (image size, patch size, head_dim),
so it is the single description from which `SuperViT` is built and from which parameter counts
and FLOPs are computed analytically.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ufo.errors import ArchError

PathName = Literal["shared", "task", "mix"]
PATHS: tuple[PathName, ...] = ("shared", "task", "mix")
Routes = dict[str, list[str]]  # task -> path per block of the largest depth


ImageSize = int | tuple[int, int]


def as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of an image size given as one side (square) or as (height, width)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        return int(size), int(size)
    hw = () if isinstance(size, bool) else tuple(size)  # a bool is an int to isinstance, but no size
    if len(hw) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in hw):
        raise ValueError(f"an image size is one int or (height, width), got {size!r}")
    return int(hw[0]), int(hw[1])


def hidden_dim(embed_dim: int, mlp_ratio: float) -> int:
    """FFN width of one expert for an embedding width and ratio (monotone in both)."""
    return round(embed_dim * mlp_ratio)


TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_task_name(name: str) -> str:
    """A task name becomes file names (exports, run folders) and URL paths: letters, digits, `_` and
    `-`, starting with a letter or digit, at most 64 characters. A ValueError names a bad one."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise ValueError(
            f"task name {name!r} is not allowed: use letters, digits, '_' and '-' (starting with a "
            "letter or digit, at most 64 characters); it becomes file names and URL paths"
        )
    return name


class Arch(BaseModel):
    """One subnet: depth, width, per-layer heads and FFN ratio, and per-task FFN paths.

    `paths[task][i]` is the FFN path of `task` in block i. A task missing from `paths` is routed by
    the supernet's router (Gumbel-Softmax in training, argmax in eval).
    """

    model_config = ConfigDict(extra="forbid")

    depth: int = Field(gt=0)
    embed_dim: int = Field(gt=0)
    num_heads: list[int]
    mlp_ratio: list[float]
    paths: dict[str, list[PathName]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _lengths(self) -> Arch:
        for name in ("num_heads", "mlp_ratio"):
            if len(getattr(self, name)) != self.depth:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries but depth is {self.depth}")
        for task, p in self.paths.items():
            if len(p) != self.depth:
                raise ValueError(f"paths[{task!r}] has {len(p)} entries but depth is {self.depth}")
        return self

    def with_routes(self, routes: Routes) -> Arch:
        """Return a copy whose paths are `routes` cut to this depth (frozen routes of a run)."""
        return self.model_copy(update={"paths": {t: list(p[: self.depth]) for t, p in routes.items()}})

    def path(self, task: str, block: int) -> str | None:
        """The fixed path of `task` in `block`, or None when the router decides."""
        p = self.paths.get(task)
        return None if p is None else p[block]

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> Arch:
        return cls.model_validate_json(text)

    @classmethod
    def load(cls, path: str | Path) -> Arch:
        """Read an arch from a JSON file, with errors that name the file."""
        path = Path(path)
        try:
            return cls.model_validate_json(path.read_text())
        except FileNotFoundError as e:
            raise ArchError(f"arch file not found: {path}") from e
        except ValueError as e:
            raise ArchError(f"invalid arch in {path}: {e}") from e

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.model_dump(), indent=2) + "\n")


def default_stem_channels(patch_size: int, embed_dim: int) -> list[int]:
    """Conv stem widths doubling up to `embed_dim` at the last layer, e.g. [24, 48, 96] for 8 x 8
    patches and width 96 (Xiao et al.'s stems double the channels at each stride-2 layer)."""
    n = patch_size.bit_length() - 1
    return [max(8, embed_dim >> (n - 1 - k)) for k in range(n)]


def _sorted_unique(v: list) -> list:
    if not v:
        raise ValueError("must list at least one value")
    return sorted(set(v))


class SearchSpace(BaseModel):
    """Allowed values of every elastic dimension, plus the supernet's fixed dimensions."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(min_length=1)
    depth: list[int]
    embed_dim: list[int]
    num_heads: list[int]
    mlp_ratio: list[float]
    paths: list[PathName] = Field(default_factory=lambda: list(PATHS))
    img_size: ImageSize = 32  # the position-embedding grid (and every task's input unless task_img_size says)
    task_img_size: dict[str, tuple[int, int]] = Field(default_factory=dict)  # (height, width) of tasks that differ
    patch_size: int = 4
    in_chans: int = 3
    head_dim: int = 32
    qkv_bias: bool = True
    stem: Literal["patch", "conv"] = "patch"
    stem_channels: list[int] = Field(default_factory=list)  # conv stem widths; [] = default_stem_channels

    @field_validator("depth", "embed_dim", "num_heads", "mlp_ratio")
    @classmethod
    def _uniq(cls, v: list) -> list:
        return _sorted_unique(v)

    @field_validator("tasks")
    @classmethod
    def _tasks_unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"task names must be unique, got {v}")
        for t in v:
            check_task_name(t)
        return v

    @field_validator("paths")
    @classmethod
    def _paths_order(cls, v: list[str]) -> list[str]:
        return [p for p in PATHS if p in v]

    @model_validator(mode="after")
    def _dims(self) -> SearchSpace:
        for where, size in (
            ("img_size", self.img_size),
            *((f"task_img_size[{t!r}]", s) for t, s in self.task_img_size.items()),
        ):
            h, w = as_hw(size)
            if min(h, w) < 1 or h % self.patch_size or w % self.patch_size:
                raise ValueError(f"{where} {h}x{w} (HxW) is not a positive multiple of patch_size {self.patch_size}")
        unknown = [t for t in self.task_img_size if t not in self.tasks]
        if unknown:
            raise ValueError(f"task_img_size names unknown task(s) {unknown}; the tasks are {self.tasks}")
        if min(self.depth) < 1 or min(self.embed_dim) < 1 or min(self.num_heads) < 1 or min(self.mlp_ratio) <= 0:
            raise ValueError("depth, embed_dim, num_heads and mlp_ratio must be positive")
        if self.stem == "patch":
            if self.stem_channels:
                raise ValueError("stem_channels is set but stem is 'patch'; use stem: conv")
            return self
        n = self.patch_size.bit_length() - 1
        if self.patch_size < 2 or 2**n != self.patch_size:
            raise ValueError(
                f"stem 'conv' needs a power-of-two patch_size (one stride-2 conv per halving); got {self.patch_size}"
            )
        if not self.stem_channels:
            self.stem_channels = default_stem_channels(self.patch_size, self.max_embed_dim)
        if len(self.stem_channels) != n or min(self.stem_channels) < 1:
            raise ValueError(
                f"stem_channels {self.stem_channels}: a conv stem for patch_size {self.patch_size} "
                f"has {n} positive widths (one per stride-2 layer)"
            )
        return self

    # ----- the supernet's maximum dimensions -----
    @property
    def max_depth(self) -> int:
        return self.depth[-1]

    @property
    def max_embed_dim(self) -> int:
        return self.embed_dim[-1]

    @property
    def max_heads(self) -> int:
        return self.num_heads[-1]

    @property
    def max_hidden(self) -> int:
        return hidden_dim(self.embed_dim[-1], self.mlp_ratio[-1])

    def input_size(self, task: str | None = None) -> tuple[int, int]:
        """(height, width) of `task`'s input (None: the base size, on which pos_embed is laid out)."""
        if task is not None and task in self.task_img_size:
            return as_hw(self.task_img_size[task])
        return as_hw(self.img_size)

    def grid(self, task: str | None = None) -> tuple[int, int]:
        """Token grid (rows, columns) of `task`'s input."""
        h, w = self.input_size(task)
        return h // self.patch_size, w // self.patch_size

    def tokens(self, task: str | None = None) -> int:
        """Patch tokens of one image of `task` (without the class token)."""
        gh, gw = self.grid(task)
        return gh * gw

    @property
    def num_patches(self) -> int:
        """Patch tokens at the base size: the length of the position embedding (without the class token)."""
        return self.tokens(None)

    # ----- canonical archs -----
    def _make(
        self,
        depth: int,
        embed: int,
        heads: Sequence[int],
        ratios: Sequence[float],
        path: str | None,
        routes: Routes | None,
    ) -> Arch:
        arch = Arch(depth=depth, embed_dim=embed, num_heads=list(heads), mlp_ratio=list(ratios))
        if routes is not None:
            return arch.with_routes(routes)
        if path is not None:
            arch = arch.model_copy(update={"paths": {t: [path] * depth for t in self.tasks}})
        return arch

    def largest(self, routes: Routes | None = None) -> Arch:
        """The full supernet. Without routes every task takes its widest path (mix, else task)."""
        path = "mix" if "mix" in self.paths else self.paths[-1]
        d = self.max_depth
        return self._make(d, self.max_embed_dim, [self.max_heads] * d, [self.mlp_ratio[-1]] * d, path, routes)

    def smallest(self, routes: Routes | None = None) -> Arch:
        """The smallest subnet. Without routes every task takes its narrowest path (shared first)."""
        d = self.depth[0]
        return self._make(d, self.embed_dim[0], [self.num_heads[0]] * d, [self.mlp_ratio[0]] * d, self.paths[0], routes)

    def sample(self, rng: np.random.Generator | int | None = None, routes: Routes | None = None) -> Arch:
        """A uniformly random subnet. Paths come from `routes` when given, else are sampled too."""
        rng = np.random.default_rng(rng)
        d = int(rng.choice(self.depth))
        arch = Arch(
            depth=d,
            embed_dim=int(rng.choice(self.embed_dim)),
            num_heads=[int(rng.choice(self.num_heads)) for _ in range(d)],
            mlp_ratio=[float(rng.choice(self.mlp_ratio)) for _ in range(d)],
        )
        if routes is not None:
            return arch.with_routes(routes)
        paths = {t: [str(rng.choice(self.paths)) for _ in range(d)] for t in self.tasks}
        return arch.model_copy(update={"paths": paths})

    # ----- validation -----
    def check(self, arch: Arch) -> None:
        """Raise ArchError naming the first field of `arch` that lies outside this space."""

        def bad(field: str, value, allowed) -> ArchError:
            return ArchError(f"arch.{field}={value!r} is outside the search space; allowed values: {allowed}")

        if arch.depth not in self.depth:
            raise bad("depth", arch.depth, self.depth)
        if arch.embed_dim not in self.embed_dim:
            raise bad("embed_dim", arch.embed_dim, self.embed_dim)
        for i, h in enumerate(arch.num_heads):
            if h not in self.num_heads:
                raise bad(f"num_heads[{i}]", h, self.num_heads)
        for i, r in enumerate(arch.mlp_ratio):
            if not any(abs(r - c) < 1e-9 for c in self.mlp_ratio):
                raise bad(f"mlp_ratio[{i}]", r, self.mlp_ratio)
        for task, p in arch.paths.items():
            if task not in self.tasks:
                raise bad("paths", task, self.tasks)
            for i, name in enumerate(p):
                if name not in self.paths:
                    raise bad(f"paths[{task!r}][{i}]", name, self.paths)

    def contains(self, arch: Arch) -> bool:
        try:
            self.check(arch)
        except ArchError:
            return False
        return True

    def check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise ArchError(f"unknown task {task!r}; this model's tasks are {self.tasks}")

    # ----- encoding for predictors -----
    def encode(self, arch: Arch, tasks: Sequence[str] | None = None) -> np.ndarray:
        """Fixed-length numeric vector of `arch` for predictors.

        Layout: depth, embed_dim, then per block of the largest depth the heads and FFN ratio (0 past
        the arch's depth), then per task in `tasks` (default all) and block two indicators: uses the
        shared expert, uses the task expert (0 past depth or where the router decides).
        """
        self.check(arch)
        tasks = list(self.tasks if tasks is None else tasks)
        D = self.max_depth
        heads = np.zeros(D)
        ratios = np.zeros(D)
        heads[: arch.depth] = arch.num_heads
        ratios[: arch.depth] = arch.mlp_ratio
        route = np.zeros((len(tasks), D, 2))
        for j, t in enumerate(tasks):
            for i in range(arch.depth):
                p = arch.path(t, i)
                route[j, i, 0] = p in ("shared", "mix")
                route[j, i, 1] = p in ("task", "mix")
        return np.concatenate([[arch.depth, arch.embed_dim], heads, ratios, route.ravel()]).astype(np.float64)

    # ----- analytic cost -----
    def _paths_of(self, arch: Arch, tasks: Sequence[str], block: int) -> list[str]:
        out = []
        for t in tasks:
            self.check_task(t)
            p = arch.path(t, block)
            if p is None:
                raise ArchError(f"arch has no path for task {t!r}; set arch.paths (or frozen routes) to count it")
            out.append(p)
        return out

    def _ffn_widths(self, arch: Arch, tasks: Sequence[str], i: int) -> list[int]:
        """Widths of the distinct FFN experts that block i keeps for `tasks`, as extraction builds them.

        One task: a mix path is folded into a single FFN of twice the width (one output bias).
        Several tasks: the shared expert once, plus each task's own expert where it is used.
        """
        h = hidden_dim(arch.embed_dim, arch.mlp_ratio[i])
        paths = self._paths_of(arch, tasks, i)
        if len(tasks) == 1:
            return [2 * h if paths[0] == "mix" else h]
        widths = [h] if any(p in ("shared", "mix") for p in paths) else []
        return widths + [h for p in paths if p in ("task", "mix")]

    def num_params(self, arch: Arch, tasks: str | Sequence[str] | None = None) -> int:
        """Exact parameter count of the model that `extract(model, arch, tasks)` returns.

        One task's model holds the position embedding resampled to that task's token grid; a model
        of several tasks keeps the base grid and resamples it per task at run time."""
        self.check(arch)
        tasks = self.tasks if tasks is None else [tasks] if isinstance(tasks, str) else list(tasks)
        e, hd, b = arch.embed_dim, self.head_dim, int(self.qkv_bias)
        n = self._embed_params(e)
        n += e + (self.tokens(tasks[0] if len(tasks) == 1 else None) + 1) * e  # cls token, position embedding
        for i in range(arch.depth):
            inner = arch.num_heads[i] * hd
            n += 2 * e  # norm1
            n += e * 3 * inner + b * 3 * inner + inner * e + e  # qkv, proj
            n += 2 * e  # norm2
            n += sum(e * w + w + w * e + e for w in self._ffn_widths(arch, tasks, i))
        return n + 2 * e  # final norm

    def _embed_params(self, e: int) -> int:
        """Parameters of the token embedding at width e: the patch conv, or the conv stem (3x3 convs
        without bias, GroupNorm affine pairs) and its 1x1 projection."""
        if self.stem == "patch":
            return self.in_chans * self.patch_size**2 * e + e
        chans = [self.in_chans, *self.stem_channels]
        return sum(9 * a * c + 2 * c for a, c in zip(chans, chans[1:])) + chans[-1] * e + e

    def _embed_flops(self, e: int, task: str | None = None) -> int:
        """Conv FLOPs of the token embedding for one image of `task` (2 x MACs; norms and ReLUs are
        not counted, as in torch's FlopCounterMode)."""
        n = self.tokens(task)
        if self.stem == "patch":
            return 2 * n * e * self.in_chans * self.patch_size**2
        chans, (h, w), f = [self.in_chans, *self.stem_channels], self.input_size(task), 0
        for a, c in zip(chans, chans[1:]):
            h, w = (h + 1) // 2, (w + 1) // 2  # 3x3, stride 2, padding 1
            f += 2 * h * w * c * a * 9
        return f + 2 * n * e * chans[-1]

    def flops(self, arch: Arch, task: str) -> int:
        """Matmul FLOPs (2 x MACs) of one image through `task`'s path, as torch's FlopCounterMode counts."""
        self.check(arch)
        e, hd, T = arch.embed_dim, self.head_dim, self.tokens(task) + 1
        f = self._embed_flops(e, task)
        for i in range(arch.depth):
            inner = arch.num_heads[i] * hd
            f += 2 * T * e * 3 * inner + 2 * 2 * T * T * inner + 2 * T * inner * e
            f += sum(4 * T * e * w for w in self._ffn_widths(arch, [task], i))
        return f

    # ----- I/O -----
    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> SearchSpace:
        return cls.model_validate_json(text)
