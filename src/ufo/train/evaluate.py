"""Evaluation of every task's protocol on a model (supernet at its active arch, or a subnet)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from ufo.config import Config
from ufo.data.dataset import ImageSet
from ufo.data.loader import iter_batches
from ufo.data.transforms import BatchTransform, build_transform
from ufo.tasks import TaskData


def eval_transform(cfg: Config, task: str) -> BatchTransform:
    """uint8 batches of `task` -> its normalised model input at its input size."""
    m = cfg.model
    return build_transform(cfg.input_size(task), m.mean, m.std, train=False, in_chans=m.in_chans)


def eval_batches(ds: ImageSet, cfg: Config, task: str, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """`ds`'s images in order as `task`'s model input (on the CPU), in batches."""
    tf = eval_transform(cfg, task)
    for x in iter_batches(
        ds,
        cfg.input_size(task),
        cfg.model.in_chans,
        batch_size,
        cfg.train.workers,
        cfg.tasks[task].data.on_error if task in cfg.tasks else "raise",
    ):
        yield tf(x)


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def make_predict(model: nn.Module, task: str, cfg: Config, batch_size: int = 256) -> Callable[[ImageSet], torch.Tensor]:
    """images -> the task head's outputs (on the CPU), in eval mode, batched, without gradients; the
    batches go to the model's device."""

    @torch.inference_mode()
    def predict(ds: ImageSet) -> torch.Tensor:
        was_training = model.training
        model.eval()
        dev = model_device(model)
        outs = [
            model(x.to(dev, non_blocking=True), task).float().cpu() for x in eval_batches(ds, cfg, task, batch_size)
        ]
        model.train(was_training)
        return torch.cat(outs)

    return predict


def evaluate_tasks(
    model: nn.Module, data: dict[str, TaskData], cfg: Config, tasks: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """Metrics of each task (default: every task in `data`)."""
    out = {}
    for name in tasks or list(data):
        head = model.heads[name]
        out[name] = head.evaluate(make_predict(model, name, cfg, cfg.train.eval_batch_size), data[name], seed=cfg.seed)
    return out


@contextmanager
def rng_preserved() -> Iterator[None]:
    """Restore torch's (CPU and CUDA), numpy's and Python's global random states after the block.

    Evaluation in the middle of training draws from them (a DataLoader's base seed, a fresh
    model's init), and a resumed run, which skips the evaluations before its checkpoint, must
    draw the same numbers as an uninterrupted one."""
    cpu, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        np.random.set_state(np_state)
        random.setstate(py_state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    data: dict[str, TaskData],
    cfg: Config,
    tasks: list[str] | None = None,
    max_images: int = 1024,
    batch_size: int = 256,
) -> int:
    """Re-estimate the BatchNorm statistics of each task's head for the model's active subnet.

    The chip-supernet stage runs several subnets per step in training mode, so the running
    statistics of a BN-neck head are a blend over subnets and fit none of them (Once-for-All's
    `set_running_statistics` fixes the same thing). For each task, the BN layers of its head are
    reset and fed a fixed, evenly spaced subset of its training images (eval transform) with a
    cumulative average. The backbone has no BatchNorm. Returns the number of BN layers reset."""
    was_training = model.training
    dev = model_device(model)
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
        train = data[name].train
        idx = torch.linspace(0, len(train) - 1, min(max_images, len(train))).round().long().unique()
        for x in eval_batches(train.subset(idx), cfg, name, batch_size):
            if len(x) > 1:  # BatchNorm needs two samples for batch statistics
                model(x.to(dev), name)
        for m, (momentum, training) in zip(bns, saved):
            m.momentum = momentum
            m.train(training)
        n_bn += len(bns)
    model.train(was_training)
    return n_bn
