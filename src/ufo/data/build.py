"""From a task's config to its data: read (recipe or reader), split by the kind's protocol,
subsample, and check that the task can be served before any training starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ufo.config import Config, DataConfig, TaskConfig
from ufo.data.dataset import ImageSet
from ufo.data.readers import (read_alphadigits_mat, read_csv_manifest, read_gtsrb, read_image_folder, read_npz,
                              read_zip_images)
from ufo.data.recipes import load_oneshot_runs, load_recipe
from ufo.errors import DataError
from ufo.tasks import TaskData, task_class

READERS = {
    "image_folder": read_image_folder,
    "csv": read_csv_manifest,
    "npz": read_npz,
    "zip": read_zip_images,
    "gtsrb": read_gtsrb,
    "alphadigits_mat": read_alphadigits_mat,
}


def load_images(d: DataConfig, data_root: str | None, image_size: int) -> ImageSet:
    """The whole data set of one task, decoded once at the model's input size."""
    if d.recipe is not None:
        return load_recipe(d.recipe, root=d.root or data_root, image_size=image_size)
    path = Path(d.path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist; set `path:` of this task's data to your "
                        f"{d.reader} data (relative paths are read from {Path.cwd()})")
    return READERS[d.reader](path, image_size=image_size, on_error=d.on_error)


def _subsample(ds: ImageSet, n: int, seed: int) -> ImageSet:
    if n >= len(ds):
        return ds
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), n, replace=False))
    return ds.subset(idx)


def _oneshot_sets(root: str | None, image_size: int) -> list[dict[str, ImageSet]]:
    runs = []
    for r in load_oneshot_runs(root, image_size=image_size):
        mk = lambda kind: ImageSet(images=r[f"{kind}_images"], labels=r[f"{kind}_labels"],  # noqa: E731
                                   class_names=[str(i) for i in range(20)], name=f"{r['run']}/{kind}")
        runs.append({"support": mk("support"), "query": mk("query")})
    return runs


def build_task_data(name: str, t: TaskConfig, cfg: Config) -> TaskData:
    """Read and split one task's data; errors name the task."""
    try:
        ds = load_images(t.data, cfg.data_root, cfg.model.img_size)
        data = task_class(t.kind).split(ds, t.data.test_fraction, cfg.seed, t.data.use_official_split)
    except DataError as e:
        raise DataError(f"task {name!r}: {e}") from None
    if t.data.max_train is not None:
        data.train = _subsample(data.train, t.data.max_train, cfg.seed)
        data.notes.append(f"training subset of {len(data.train)}")
    if task_class(t.kind).uses_groups:
        data.groups = data.train.labels.clone()
    if t.data.oneshot_runs:
        root = t.data.root or cfg.data_root
        data.extra["oneshot_runs"] = _oneshot_sets(root, cfg.model.img_size)
    check_task_data(name, t, data)
    return data


def check_task_data(name: str, t: TaskConfig, data: TaskData) -> None:
    """Fail before training when the data cannot serve the task."""
    if len(data.train) == 0:
        raise DataError(f"task {name!r}: the training split is empty")
    for part, ds in data.eval.items():
        if len(ds) == 0:
            raise DataError(f"task {name!r}: the {part} split is empty (test_fraction={t.data.test_fraction})")
    if task_class(t.kind).uses_groups:
        counts = torch.bincount(data.train.labels)
        k = int(t.options.get("k", 4))
        ok = int((counts >= 2).sum())
        if ok < 2:
            raise DataError(f"task {name!r}: P x K sampling needs at least 2 identities with 2 or more images; "
                            f"the training split has {len(counts)} identities, {ok} with >= 2 images (K={k})")


def build_all(cfg: Config) -> dict[str, TaskData]:
    return {name: build_task_data(name, t, cfg) for name, t in cfg.tasks.items()}
