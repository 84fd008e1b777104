"""Evaluation of every task's protocol on a model (supernet at its active arch, or a subnet)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ufo.config import Config
from ufo.data.dataset import ImageSet
from ufo.data.transforms import build_transform
from ufo.tasks import TaskData


def make_predict(model: nn.Module, task: str, cfg: Config, batch_size: int = 256) -> Callable[[ImageSet], torch.Tensor]:
    """images -> the task head's outputs, in eval mode, batched, without gradients."""
    tf = build_transform(cfg.model.img_size, cfg.model.mean, cfg.model.std, train=False, in_chans=cfg.model.in_chans)

    @torch.inference_mode()
    def predict(ds: ImageSet) -> torch.Tensor:
        was_training = model.training
        model.eval()
        outs = [model(tf(ds.images[i : i + batch_size]), task).float() for i in range(0, len(ds), batch_size)]
        model.train(was_training)
        return torch.cat(outs)

    return predict


def evaluate_tasks(model: nn.Module, data: dict[str, TaskData], cfg: Config, tasks: list[str] | None = None
                   ) -> dict[str, dict[str, float]]:
    """Metrics of each task (default: every task in `data`)."""
    out = {}
    for name in tasks or list(data):
        head = model.heads[name]
        out[name] = head.evaluate(make_predict(model, name, cfg, cfg.train.eval_batch_size), data[name], seed=cfg.seed)
    return out
