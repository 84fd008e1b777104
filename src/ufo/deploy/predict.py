"""Predictions from Python (`TaskModel.predict`), and the one reading of a task's output that the
HTTP server shares (`read_output`), so both answer the same for the same image.

Images are PIL images (any mode: RGBA, palette and 16-bit ones are converted as files are), file
paths, uint8 numpy arrays (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), or uint8 torch tensors in
torch's layout, (C, H, W) with C in 1, 3 or 4, or a batch (N, C, H, W). Alpha is dropped. Each image
is decoded as the server decodes uploads (`ufo.data.decode`: resized to the task's input size),
then goes through the model's own eval transform (channels, mean, std) and the model, in batches,
under `torch.inference_mode`. Float tensors are refused: the model normalises its inputs itself,
so it takes the pixels as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from ufo.data.decode import adapt, decode, from_pil
from ufo.taskmodel import DeployError, HeadInfo, TaskModel


@dataclass
class Prediction:
    """One image's answer for one task.

    `top_k`: classification, the k most likely classes as (label, probability), most likely first
    (label None when the model has no class names; `indices` are the class indices). `embedding`:
    identity tasks, the L2-normalised embedding; `threshold`: a verification task's calibrated
    cosine-similarity threshold (two images are the same identity above it), when it has one."""

    task: str
    output: Literal["logits", "embedding"]
    top_k: list[tuple[str | None, float]] | None = None
    indices: list[int] | None = None
    embedding: np.ndarray | None = None
    threshold: float | None = None


def read_output(task: str, out: np.ndarray, head: HeadInfo, k: int = 5) -> Prediction:
    """One image's raw output (logits or embedding) of `task` as a Prediction: softmax top-k with the
    class names, or the embedding with the task's threshold."""
    if head.output == "embedding":
        return Prediction(task, "embedding", embedding=out, threshold=head.threshold)
    p = torch.softmax(torch.as_tensor(out).double(), -1)
    vals, idx = p.topk(min(k, p.numel()))
    names = head.class_names
    return Prediction(
        task,
        "logits",
        top_k=[(names[int(i)] if names else None, float(v)) for v, i in zip(vals, idx)],
        indices=[int(i) for i in idx],
    )


def to_uint8(image: Any, size_hw: tuple[int, int], where: str) -> torch.Tensor:
    """A PIL image, file path or uint8 array -> uint8 (C, H, W) at `size_hw`, as the server decodes."""
    try:
        if isinstance(image, (str, Path)):
            return torch.from_numpy(np.array(decode(Path(image), size_hw, None)))
        if isinstance(image, Image.Image):
            return torch.from_numpy(np.array(from_pil(image, size_hw, None)))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        what = f"{where} ({image})" if isinstance(image, (str, Path)) else where
        raise DeployError(f"{what} cannot be read as an image: {e}") from None
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3, 4):
            raise DeployError(
                f"{where}: expected a uint8 tensor of shape (C, H, W) with C in 1, 3 or 4 (the model "
                f"normalises its inputs itself), got {image.dtype} {tuple(image.shape)}"
            )
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        shape_ok = image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))
        if image.dtype != np.uint8 or not shape_ok or min(image.shape[:2]) < 1:
            raise DeployError(
                f"{where}: expected a uint8 array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
                f"got {image.dtype} {image.shape}"
            )
        if image.ndim == 3 and image.shape[2] == 4:  # RGBA: alpha dropped, as files are read
            image = image[..., :3]
        return torch.from_numpy(
            np.array(adapt(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image, size_hw, None))
        )
    raise DeployError(
        f"{where}: expected a PIL image, a file path, a uint8 numpy array or a uint8 tensor, got {type(image).__name__}"
    )


def predict(
    tm: TaskModel, images: Any, task: str | None = None, k: int = 5, batch_size: int = 32
) -> Prediction | list[Prediction]:
    """`task`'s Prediction for each image (a list for a list, one for one image). `task` may be left
    out when the model serves one task."""
    if task is None:
        if not tm.single:
            raise DeployError(f"this model serves several tasks {tm.tasks}: name one with task=...")
        task = tm.tasks[0]
    tm.check_task(task)
    if k < 1 or batch_size < 1:
        raise DeployError(f"k ({k}) and batch_size ({batch_size}) must be at least 1")
    single = not isinstance(images, (list, tuple)) and not (isinstance(images, torch.Tensor) and images.ndim == 4)
    items: Sequence[Any] = [images] if single else list(images)
    pre = tm.info.preprocessing.for_task(task)
    transform, head = pre.transform(), tm.info.heads[task]
    param = next(tm.parameters())
    out: list[Prediction] = []
    was_training = tm.training
    tm.eval()
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            x = torch.stack(
                [transform(to_uint8(im, pre.input_size(), f"image {start + i}")) for i, im in enumerate(chunk)]
            )
            with torch.inference_mode():
                y = tm(x.to(param.device, param.dtype), task).float().cpu().numpy()
            bad = [start + i for i in range(len(chunk)) if not np.isfinite(y[i]).all()]
            if bad:
                raise DeployError(f"task {task!r}: the model gave NaN or inf for image(s) {bad}")
            out += [read_output(task, y[i], head, k) for i in range(len(chunk))]
    finally:
        tm.train(was_training)
    return out[0] if single else out
