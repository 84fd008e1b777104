"""Every task's own protocol on a model's outputs: one task, every task of a UFOModel, a task model
or ONNX session described by its HeadInfo; the heads' BatchNorm statistics re-estimated for a
subnet first; the random states kept across an evaluation in the middle of training."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn

from ufo.config import Config
from ufo.evaluation.predict import eval_batches, make_predict, model_device
from ufo.tasks import TaskData, task_class
from ufo.tasks.base import Predict, Task

if TYPE_CHECKING:
    from ufo.taskmodel import HeadInfo


def evaluate_task(predict: Predict, protocol: Task, data: TaskData, seed: int = 0) -> dict[str, float]:
    """`protocol`'s metrics (a task kind's `evaluate`) of `predict`'s outputs on `data`'s eval split."""
    return {k: float(v) for k, v in protocol.evaluate(predict, data, seed=seed).items()}


def head_protocol(task: str, head: HeadInfo) -> Task:
    """The evaluation protocol of a deployed head (a task model's, an ONNX file's): a head of its kind
    built only for `evaluate` and `curves`, so its layers (and their width) do not matter."""
    return task_class(head.kind)(task, head.options, head.num_classes, 8)


def evaluate_model(
    model: nn.Module, task: str, cfg: Config, data: TaskData, protocol: Task | None = None
) -> dict[str, float]:
    """`task`'s metrics of a torch model called as `model(x, task)` (a UFOModel at its active arch, a
    task model, a distilled student) by `protocol` (default: the model's own head `model.heads[task]`)."""
    proto = protocol if protocol is not None else cast(Task, cast(nn.ModuleDict, model.heads)[task])
    return evaluate_task(make_predict(model, task, cfg, cfg.train.eval_batch_size), proto, data, cfg.seed)


def evaluate_tasks(
    model: nn.Module, data: dict[str, TaskData], cfg: Config, tasks: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """Metrics of each task (default: every task in `data`)."""
    return {name: evaluate_model(model, name, cfg, data[name]) for name in tasks or list(data)}


def evaluate_predict(predict: Predict, task: str, head: HeadInfo, cfg: Config, data: TaskData) -> dict[str, float]:
    """The task's own protocol, rebuilt from a deployed head's HeadInfo, on `predict`'s outputs (an
    ONNX session's, a task model's)."""
    return evaluate_task(predict, head_protocol(task, head), data, cfg.seed)


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
    heads = cast(nn.ModuleDict, model.heads)
    model.eval()
    n_bn = 0
    for name in tasks or list(data):
        bns = [m for m in heads[name].modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
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
