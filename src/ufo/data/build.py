"""From a task's config to its data: read (recipe or reader), split by the kind's protocol,
subsample, place each part in memory or on disk, and check that the task can be served before
any training starts.

File readers only list the files; splitting needs labels alone, so the images of a part are
decoded (`data.cache: memory`, or `auto` for a task whose images fit in `cache_max_mb` at its
input size) only after the split, or never (`stream`: DataLoader workers decode each image when a
batch needs it). Recipes over image files (orl-faces, omniglot-small, gtsrb, gtsrb-tracks) follow
the same rule; array-based ones (digits, mnist5k, alphadigits) are always in memory.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ufo.config import Config, DataConfig, TaskConfig
from ufo.data.dataset import ImageSet
from ufo.data.recipes import load_oneshot_runs, load_recipe
from ufo.errors import DataError
from ufo.tasks import TaskData, task_class

# reader name -> "module:function"; those in STREAMING accept lazy=True (list now, decode later)
READERS = {
    "image_folder": "ufo.data.readers:read_image_folder",
    "imagenet": "ufo.data.layouts:read_imagenet",
    "csv": "ufo.data.readers:read_csv_manifest",
    "market1501": "ufo.data.layouts:read_market1501",
    "lfw": "ufo.data.layouts:read_lfw",
    "sop": "ufo.data.layouts:read_sop",
    "webdataset": "ufo.data.shards:read_webdataset",
    "gtsrb": "ufo.data.readers:read_gtsrb",
    "npz": "ufo.data.readers:read_npz",
    "zip": "ufo.data.readers:read_zip_images",
    "alphadigits_mat": "ufo.data.readers:read_alphadigits_mat",
}
STREAMING = {"image_folder", "imagenet", "csv", "market1501", "lfw", "sop", "webdataset", "gtsrb", "zip"}


def reader(name: str) -> Callable[..., ImageSet]:
    """The reader function registered as `name`."""
    module, fn = READERS[name].split(":")
    return getattr(importlib.import_module(module), fn)


def load_images(d: DataConfig, data_root: str | None, image_size: tuple[int, int]) -> ImageSet:
    """One task's whole data set: the listing of a file reader or file-based recipe (decoded later,
    part by part, see `place`), or the images of an array-based one decoded at the task's size."""
    if d.recipe is not None:
        return load_recipe(d.recipe, root=d.root or data_root, image_size=image_size, lazy=d.cache != "memory")
    assert d.reader is not None and d.path is not None  # DataConfig requires both without a recipe
    path = Path(d.path)
    if not path.exists():
        raise DataError(
            f"data path {path} does not exist; set `path:` of this task's data to your "
            f"{d.reader} data (relative paths are read from {Path.cwd()})"
        )
    if d.reader in STREAMING:
        return reader(d.reader)(path, on_error=d.on_error, lazy=True)
    return reader(d.reader)(path, image_size=image_size, on_error=d.on_error)


def place(data: TaskData, d: DataConfig, image_size: tuple[int, int], in_chans: int) -> TaskData:
    """Decode the task's parts into memory (uint8 at `image_size`) or leave them streaming, by
    `d.cache`; `auto` decodes when all parts together fit in `d.cache_max_mb`."""
    parts = [data.train, *data.eval.values()]
    if all(p.in_memory for p in parts):
        return data
    n = sum(len(p) for p in parts)
    mb = n * in_chans * image_size[0] * image_size[1] / 2**20
    if d.cache == "stream" or (d.cache == "auto" and mb > d.cache_max_mb):
        data.notes.append(
            f"streamed from disk ({n:,} images, {mb:,.0f} MB at {image_size[0]}x{image_size[1]} "
            f"> cache_max_mb {d.cache_max_mb:g})"
            if d.cache == "auto"
            else f"streamed from disk ({n:,} images)"
        )
        return data
    data.train = data.train.to_memory(image_size, None, d.on_error)
    data.eval = {k: v.to_memory(image_size, None, d.on_error) for k, v in data.eval.items()}
    data.notes.append(f"decoded into memory ({n:,} images, {mb:,.0f} MB)")
    return data


def _subsample(ds: ImageSet, n: int, seed: int) -> ImageSet:
    if n >= len(ds):
        return ds
    idx = np.sort(np.random.default_rng(seed).choice(len(ds), n, replace=False))
    return ds.subset(idx)


def _oneshot_sets(root: str | None, image_size: tuple[int, int]) -> list[dict[str, ImageSet]]:
    runs = []
    for r in load_oneshot_runs(root, image_size=image_size):
        mk = lambda kind: ImageSet(
            images=r[f"{kind}_images"],
            labels=r[f"{kind}_labels"],
            class_names=[str(i) for i in range(20)],
            name=f"{r['run']}/{kind}",
        )
        runs.append({"support": mk("support"), "query": mk("query")})
    return runs


def build_task_data(name: str, t: TaskConfig, cfg: Config) -> TaskData:
    """Read and split one task's data; errors name the task."""
    size = cfg.input_size(name)
    try:
        ds = load_images(t.data, cfg.data_root, size)
        data = task_class(t.kind).split(ds, t.data.test_fraction, cfg.seed, t.data.use_official_split)
        if t.data.max_train is not None:
            data.train = _subsample(data.train, t.data.max_train, cfg.seed)
            data.notes.append(f"training subset of {len(data.train)}")
        data = place(data, t.data, size, cfg.model.in_chans)
    except DataError as e:
        raise DataError(f"task {name!r}: {e}") from None
    if task_class(t.kind).uses_groups:
        data.groups = data.train.labels.clone()
    if t.data.oneshot_runs:
        root = t.data.root or cfg.data_root
        data.extra["oneshot_runs"] = _oneshot_sets(root, size)
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
            raise DataError(
                f"task {name!r}: P x K sampling needs at least 2 identities with 2 or more images; "
                f"the training split has {len(counts)} identities, {ok} with >= 2 images (K={k})"
            )


def build_all(cfg: Config) -> dict[str, TaskData]:
    return {name: build_task_data(name, t, cfg) for name, t in cfg.tasks.items()}
