"""Task plug-ins: each task kind brings its head, its loss, its data split and its evaluator.

A kind is a `Task` subclass registered with `@register("kind")` in its own file under
`ufo/tasks/`; every module there is imported by `ufo.tasks`, so adding a kind means adding one file.
Heads sit outside the backbone and are elastic in their input width, because the backbone's
feature width follows the active arch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, cast

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from ufo.data.dataset import ImageSet
from ufo.errors import ConfigError, TaskError
from ufo.nn.elastic import ElasticLinear

TASK_KINDS: dict[str, type[Task]] = {}
Predict = Callable[[ImageSet], torch.Tensor]  # images -> this task's outputs (logits or embeddings)


def register(kind: str) -> Callable[[type[Task]], type[Task]]:
    def deco(cls: type[Task]) -> type[Task]:
        cls.kind = kind
        TASK_KINDS[kind] = cls
        return cls

    return deco


def task_class(kind: str) -> type[Task]:
    try:
        return TASK_KINDS[kind]
    except KeyError:
        raise TaskError(f"unknown task kind {kind!r}; available kinds: {sorted(TASK_KINDS)}") from None


class Options(BaseModel):
    """Kind-specific options from the task's `options:` block in the YAML."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class TaskData:
    """A task's data after its split: what it trains on and what it is evaluated on."""

    train: ImageSet
    eval: dict[str, ImageSet]  # e.g. {"test": ...} or {"query": ..., "gallery": ...}
    groups: torch.Tensor | None = None  # identity per training sample, for P x K sampling
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. Omniglot one-shot runs
    notes: list[str] = field(default_factory=list)  # how the split was made, for `ufo data show`


class Task(nn.Module, ABC):
    """One task of the model: its head and loss parameters, plus its protocol."""

    kind: ClassVar[str] = ""
    OptionsModel: ClassVar[type[Options]] = Options
    output: ClassVar[str] = "logits"  # "logits" or "embedding"
    primary: ClassVar[str] = ""  # headline metric key, what tables and searches rank by
    uses_groups: ClassVar[bool] = False  # P x K sampling over identities
    opts: Options  # a kind narrows it to its OptionsModel: `opts: ClassificationOptions`

    def __init__(self, name: str, options: dict | Options, num_classes: int, in_dim: int) -> None:
        super().__init__()
        self.name, self.num_classes, self.in_dim = name, num_classes, in_dim
        self.opts = options if isinstance(options, Options) else self.parse_options(name, options)

    @classmethod
    def parse_options(cls, name: str, options: dict) -> Options:
        try:
            return cls.OptionsModel.model_validate(options or {})
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"tasks.{name}.options.{loc}: {first['msg']} (kind {cls.kind!r})") from None

    # ----- model side -----
    def set_input_dim(self, dim: int) -> None:
        """Follow the backbone's active feature width."""
        for m in self.modules():
            if isinstance(m, ElasticLinear) and m.in_features == self.in_dim:
                m.set_active(in_features=dim)

    @abstractmethod
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Eval output from backbone features: logits, or an L2-normalised embedding."""

    @abstractmethod
    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training loss of a batch of backbone features with their labels."""

    def margin_parameters(self) -> list[nn.Parameter]:
        """Class-centre weights of margin losses: they get their own optimiser group."""
        return []

    # ----- data and protocol side -----
    @classmethod
    @abstractmethod
    def split(cls, ds: ImageSet, test_fraction: float, seed: int, use_official: bool) -> TaskData:
        """Split a whole data set into training and evaluation parts by this kind's protocol."""

    @abstractmethod
    def evaluate(self, predict: Predict, data: TaskData, seed: int = 0) -> dict[str, float]:
        """Run this kind's protocol on `data.eval`; `predict` maps images to outputs."""

    def curves(self, predict: Predict, data: TaskData, seed: int = 0) -> dict[str, Any] | None:
        """The data of this kind's evaluation figure on `data.eval` (the run report draws it): a
        dict whose `figure` key names it; None for a kind without one."""
        return None


def margin_loss(kind: str, num_classes: int, dim: int, margin: float, scale: float) -> nn.Module:
    """CosFace or ArcFace from pytorch-metric-learning (ArcFace's margin is in degrees there)."""
    from pytorch_metric_learning import losses

    if kind == "cosface":
        return losses.CosFaceLoss(num_classes, dim, margin=margin, scale=scale)
    return losses.ArcFaceLoss(num_classes, dim, margin=margin, scale=scale)


class EmbeddingOptions(Protocol):
    """What EmbeddingTask reads of its kind's options."""

    embedding_dim: int


class EmbeddingTask(Task):
    """Shared parts of the identity kinds: a BN-neck embedding head and metric losses."""

    output = "embedding"

    def __init__(self, name: str, options: dict | Options, num_classes: int, in_dim: int) -> None:
        super().__init__(name, options, num_classes, in_dim)
        d = cast(EmbeddingOptions, self.opts).embedding_dim
        self.neck = ElasticLinear(in_dim, d, bias=False)
        self.bn = nn.BatchNorm1d(d)
        self.bn.bias.requires_grad_(False)  # BNNeck: no shift, so the embedding stays centred

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return self.bn(self.neck(features))

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The kind's metric loss on the embedding, in float32 with autocast off. The trainers call
        it under bf16 autocast, where PML's similarity matmuls (losses and miners alike) would run in
        bf16 even on float32 inputs; PML also casts its class centres to the embedding's dtype. The
        neck itself may run under autocast."""
        emb = self.embed(features)
        with torch.autocast(emb.device.type, enabled=False):
            return self.embedding_loss(emb.float(), labels)

    @abstractmethod
    def embedding_loss(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Training loss of a batch of float32 embeddings (B, D) with their labels (autocast off)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(features), dim=-1)

    def margin_parameters(self) -> list[nn.Parameter]:
        m = getattr(self, "margin", None)
        return [] if m is None else list(m.parameters())
