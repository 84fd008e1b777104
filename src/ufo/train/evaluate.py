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


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: dict[str, TaskData], cfg: Config, tasks: list[str] | None = None,
                   max_images: int = 1024, batch_size: int = 256) -> int:
    """Re-estimate the BatchNorm statistics of each task's head for the model's active subnet.

    The chip-supernet stage runs several subnets per step in training mode, so the running
    statistics of a BN-neck head are a blend over subnets and fit none of them (Once-for-All's
    `set_running_statistics` fixes the same thing). For each task, the BN layers of its head are
    reset and fed a fixed, evenly spaced subset of its training images (eval transform) with a
    cumulative average. The backbone has no BatchNorm. Returns the number of BN layers reset."""
    tf = build_transform(cfg.model.img_size, cfg.model.mean, cfg.model.std, train=False, in_chans=cfg.model.in_chans)
    was_training = model.training
    model.eval()
    n_bn = 0
    for name in tasks or list(data):
        bns = [m for m in model.heads[name].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            continue
        saved = [(m.momentum, m.training) for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the calibration batches
            m.train()
        images = data[name].train.images
        idx = torch.linspace(0, len(images) - 1, min(max_images, len(images))).round().long().unique()
        for chunk in idx.split(batch_size):
            if len(chunk) > 1:  # BatchNorm needs two samples for batch statistics
                model(tf(images[chunk]), name)
        for m, (momentum, training) in zip(bns, saved):
            m.momentum = momentum
            m.train(training)
        n_bn += len(bns)
    model.train(was_training)
    return n_bn
