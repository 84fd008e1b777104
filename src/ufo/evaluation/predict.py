"""Images -> model outputs for evaluation: a split batched through the eval transform, and the
predict functions (`ufo.tasks.base.Predict`: ImageSet -> outputs) that the task protocols score.

One batching path serves every model: a torch module (UFOModel at its active arch, a task model,
a distilled student) through `make_predict`, and anything that maps a normalised batch to an array
(an ONNX Runtime session) through `make_array_predict`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ufo.config import Config
from ufo.data.dataset import ImageSet
from ufo.data.loader import iter_batches
from ufo.data.transforms import BatchTransform, build_transform
from ufo.tasks.base import Predict

if TYPE_CHECKING:
    from ufo.taskmodel import Preprocessing


def eval_transform(cfg: Config, task: str) -> BatchTransform:
    """uint8 batches of `task` -> its normalised model input at its input size."""
    m = cfg.model
    return build_transform(cfg.input_size(task), m.mean, m.std, train=False, in_chans=m.in_chans)


def transformed_batches(
    ds: ImageSet,
    size: tuple[int, int],
    in_chans: int,
    transform: BatchTransform,
    batch_size: int = 256,
    workers: int | None = None,
    on_error: str = "raise",
) -> Iterator[torch.Tensor]:
    """`ds`'s images in order, decoded at `size` with `in_chans` channels and passed through
    `transform`, in batches (on the CPU; in-memory and streamed sets alike)."""
    for x in iter_batches(ds, size, in_chans, batch_size, workers, on_error):
        yield transform(x)


def eval_batches(ds: ImageSet, cfg: Config, task: str, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """`ds`'s images in order as `task`'s model input (on the CPU), in batches."""
    on_error = cfg.tasks[task].data.on_error if task in cfg.tasks else "raise"
    return transformed_batches(
        ds, cfg.input_size(task), cfg.model.in_chans, eval_transform(cfg, task), batch_size, cfg.train.workers, on_error
    )


def model_inputs(
    ds: ImageSet, pre: Preprocessing, batch_size: int = 256, on_error: str = "raise"
) -> Iterator[torch.Tensor]:
    """`ds`'s images in order as normalised model input at `pre`'s size (a task model's own
    preprocessing, `Preprocessing.for_task`), in batches; `on_error` as the task's `data.on_error`."""
    return transformed_batches(ds, pre.input_size(), pre.in_chans, pre.transform(), batch_size, on_error=on_error)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def make_predict(
    model: nn.Module,
    task: str,
    cfg: Config,
    batch_size: int = 256,
    cache: dict[int, tuple[ImageSet, torch.Tensor]] | None = None,
) -> Predict:
    """images -> `model(x, task)` (on the CPU), in eval mode, batched, without gradients; the batches
    go to the model's device. `model` is any module called as `model(x, task)`: a UFOModel at its
    active arch, a task model, a distilled student.

    With `cache`, each image set's model input is computed once and kept in it (keyed by the set,
    which it keeps alive), so that evaluating many subnets on the same split only runs the model
    again. The batches, and so the outputs, are the same either way."""

    def inputs(ds: ImageSet) -> Iterator[torch.Tensor]:
        if cache is None:
            yield from eval_batches(ds, cfg, task, batch_size)
            return
        if id(ds) not in cache:
            cache[id(ds)] = (ds, torch.cat(list(eval_batches(ds, cfg, task, batch_size))))
        x = cache[id(ds)][1]
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size]

    @torch.inference_mode()
    def predict(ds: ImageSet) -> torch.Tensor:
        was_training = model.training
        model.eval()
        dev = model_device(model)
        outs = [model(x.to(dev, non_blocking=True), task).float().cpu() for x in inputs(ds)]
        model.train(was_training)
        return torch.cat(outs)

    return predict


def make_array_predict(
    run: Callable[[torch.Tensor], Any], pre: Preprocessing, batch_size: int = 256, on_error: str = "raise"
) -> Predict:
    """images -> outputs of `run` (a normalised batch -> an array, e.g. an ONNX Runtime session),
    batched like `make_predict`. `pre` is the task's own preprocessing (`Preprocessing.for_task`)."""

    def predict(ds: ImageSet) -> torch.Tensor:
        return torch.cat([torch.as_tensor(run(x)) for x in model_inputs(ds, pre, batch_size, on_error)]).float()

    return predict
