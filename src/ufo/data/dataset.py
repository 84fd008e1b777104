"""`ImageSet`: a whole labelled image set decoded once into memory as uint8, plus a small
per-process cache so the same reader call on the same files is decoded only once.

Keeping uint8 (N, C, H, W) tensors in memory means data loading never bounds training on the small
sets UFO is tested and benchmarked on: a batch is one index into a tensor, and augmentation runs on
the whole batch (see `ufo.data.transforms`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ufo.errors import DataError

Indices = Sequence[int] | np.ndarray | torch.Tensor


@dataclass
class ImageSet:
    """A labelled image set held in memory.

    images: uint8 (N, C, H, W), C in {1, 3}, one size for all samples.
    labels: int64 (N,), values in 0..num_classes-1 (`relabel()` makes the used ones contiguous).
    class_names: name of each label value.
    identities: int64 (N,) instance id (a face's subject, a sign's GTSRB track, an Omniglot drawer),
        or None. Negative values mean "unknown" (e.g. GTSRB test images, which have no track).
    cameras: int64 (N,) camera/view id, or None.
    split: the official split of each sample ("train", "test", ...), or None when there is none.
    origin: where each sample came from (a file path or "archive.zip:member"), for error messages.
    name: a short name of the set (recipe or folder name).
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    identities: torch.Tensor | None = None
    cameras: torch.Tensor | None = None
    split: list[str] | None = None
    origin: list[str] = field(default_factory=list)
    name: str = "images"

    def __post_init__(self) -> None:
        imgs = self.images
        if not isinstance(imgs, torch.Tensor) or imgs.dtype != torch.uint8 or imgs.ndim != 4:
            got = f"{imgs.dtype} {tuple(imgs.shape)}" if isinstance(imgs, torch.Tensor) else type(imgs).__name__
            raise DataError(f"ImageSet {self.name!r}: images must be a uint8 tensor (N, C, H, W), got {got}")
        if imgs.shape[1] not in (1, 3):
            raise DataError(f"ImageSet {self.name!r}: images must have 1 or 3 channels, got {imgs.shape[1]}")
        n = imgs.shape[0]
        if not self.origin:
            self.origin = [f"{self.name}[{i}]" for i in range(n)]
        self.class_names = [str(c) for c in self.class_names]
        for fname in ("labels", "identities", "cameras"):
            t = getattr(self, fname)
            if t is None and fname != "labels":
                continue
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.ndim != 1:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise DataError(f"ImageSet {self.name!r}: {fname} must be an int64 tensor (N,), got {got}")
            if t.shape[0] != n:
                raise DataError(f"ImageSet {self.name!r}: {fname} has {t.shape[0]} entries but there are {n} images")
        for fname in ("split", "origin"):
            v = getattr(self, fname)
            if v is not None and len(v) != n:
                raise DataError(f"ImageSet {self.name!r}: {fname} has {len(v)} entries but there are {n} images")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)):
            bad = int(self.labels.min()) if int(self.labels.min()) < 0 else int(self.labels.max())
            raise DataError(
                f"ImageSet {self.name!r}: label {bad} is outside 0..{len(self.class_names) - 1} "
                f"({len(self.class_names)} class names)"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        c, h, w = self.images.shape[1:]
        extra = "".join(
            f", {k}" for k, v in (("identities", self.identities), ("cameras", self.cameras), ("split", self.split))
            if v is not None
        )
        return f"ImageSet({self.name!r}, n={len(self)}, classes={self.num_classes}, {c}x{h}x{w}{extra})"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def counts(self) -> torch.Tensor:
        """Number of samples of each class, int64 (num_classes,)."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def subset(self, indices: Indices) -> "ImageSet":
        """The samples at `indices` (ints or a boolean mask), with every field kept consistent.

        Labels and class_names are unchanged; call `relabel()` to drop classes left empty.
        """
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise DataError(f"ImageSet {self.name!r}: mask has shape {tuple(idx.shape)}, expected ({len(self)},)")
            idx = idx.nonzero().flatten()
        idx = idx.to(torch.int64).flatten()
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise DataError(f"ImageSet {self.name!r}: index out of range for {len(self)} samples")
        il = idx.tolist()
        return ImageSet(
            images=self.images[idx],
            labels=self.labels[idx],
            class_names=list(self.class_names),
            identities=None if self.identities is None else self.identities[idx],
            cameras=None if self.cameras is None else self.cameras[idx],
            split=None if self.split is None else [self.split[i] for i in il],
            origin=[self.origin[i] for i in il],
            name=self.name,
        )

    def relabel(self) -> "ImageSet":
        """Same samples with the used labels renumbered 0..k-1 (in their old order) and class_names
        filtered to the used classes."""
        used = torch.unique(self.labels)  # sorted
        remap = torch.full((max(self.num_classes, 1),), -1, dtype=torch.int64)
        remap[used] = torch.arange(used.numel())
        return dataclasses.replace(
            self,
            labels=remap[self.labels] if len(self) else self.labels.clone(),
            class_names=[self.class_names[i] for i in used.tolist()],
        )

    def with_labels(self, labels: torch.Tensor, class_names: list[str]) -> "ImageSet":
        """Same images with other labels (e.g. identities used as classes for re-identification)."""
        return dataclasses.replace(self, labels=labels, class_names=list(class_names))


def concat(sets: Sequence[ImageSet], name: str | None = None) -> ImageSet:
    """Join image sets of the same image shape; classes are merged by name."""
    if not sets:
        raise DataError("concat needs at least one ImageSet")
    shapes = {s.image_shape for s in sets}
    if len(shapes) > 1:
        raise DataError(f"cannot concat image sets of different image shapes {sorted(shapes)}; set image_size")
    names = sorted({c for s in sets for c in s.class_names})
    index = {c: i for i, c in enumerate(names)}
    labels = [torch.tensor([index[c] for c in s.class_names], dtype=torch.int64)[s.labels] for s in sets]

    def opt(attr: str) -> torch.Tensor | None:
        vals = [getattr(s, attr) for s in sets]
        if all(v is None for v in vals):
            return None
        unknown = [torch.full((len(s),), -1, dtype=torch.int64) for s in sets]
        return torch.cat([v if v is not None else u for v, u in zip(vals, unknown)])

    split = None
    if any(s.split is not None for s in sets):
        split = [x for s in sets for x in (s.split if s.split is not None else [""] * len(s))]
    return ImageSet(
        images=torch.cat([s.images for s in sets]),
        labels=torch.cat(labels),
        class_names=names,
        identities=opt("identities"),
        cameras=opt("cameras"),
        split=split,
        origin=[o for s in sets for o in s.origin],
        name=name or "+".join(s.name for s in sets),
    )


def encode_values(values: Iterable[str], keep_ints: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Map string values to int64 codes and the name of each code.

    When every value is an integer they are ordered numerically ("2" before "10"); with
    `keep_ints` (identities, cameras) the integers are kept as they are, otherwise they are
    renumbered 0..k-1. Other strings are numbered in sorted order.
    """
    vals = [str(v).strip() for v in values]
    try:
        ints = [int(v) for v in vals]
    except ValueError:
        names = sorted(set(vals))
        index = {n: i for i, n in enumerate(names)}
        return torch.tensor([index[v] for v in vals], dtype=torch.int64), names
    uniq = sorted(set(ints))
    if keep_ints:
        return torch.tensor(ints, dtype=torch.int64), [str(u) for u in uniq]
    index = {u: i for i, u in enumerate(uniq)}
    return torch.tensor([index[v] for v in ints], dtype=torch.int64), [str(u) for u in uniq]


# ---------------------------------------------------------------------------------------------
# Per-process decode cache.
# ---------------------------------------------------------------------------------------------

_CACHE: "OrderedDict[tuple, tuple[ImageSet, list[str]]]" = OrderedDict()
_CACHE_MAX = 16
_CACHE_STATS = Counter()


def _stamp(path: Path) -> tuple:
    """A cheap fingerprint of a file or folder: mtime and size of it and its direct children (a
    class folder gaining or losing files changes its own mtime)."""
    try:
        st = path.stat()
    except OSError:
        return (str(path), None)
    stamp: list = [str(path.resolve()), st.st_mtime_ns, st.st_size]
    if path.is_dir():
        with os.scandir(path) as it:
            for e in sorted(it, key=lambda e: e.name):
                if e.is_dir():
                    stamp.append((e.name, e.stat().st_mtime_ns))
    return tuple(stamp)


def cached(reader: str, paths: Sequence[Path], params: dict, load: Callable[[], ImageSet]) -> ImageSet:
    """Return `load()`, decoded at most once per process for the same reader, paths (with their
    mtimes), image_size and other params. Warnings raised while loading are replayed on a hit.

    The returned ImageSet shares its tensors with the cache: treat them as read-only (`subset()`
    and transforms copy). A folder's fingerprint covers files added or removed, not a file
    rewritten in place: call `clear_cache()` after editing images.
    """
    key = (reader, tuple(_stamp(Path(p)) for p in paths), tuple(sorted((k, repr(v)) for k, v in params.items())))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        _CACHE_STATS["hits"] += 1
        ds, msgs = _CACHE[key]
        for m in msgs:
            warnings.warn(m, stacklevel=3)
        return dataclasses.replace(ds)
    _CACHE_STATS["misses"] += 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load()
    msgs = [str(w.message) for w in caught]
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    _CACHE[key] = (ds, msgs)
    while len(_CACHE) > _CACHE_MAX:
        _CACHE.popitem(last=False)
    return dataclasses.replace(ds)


def clear_cache() -> None:
    """Forget every decoded set (frees their memory)."""
    _CACHE.clear()
    _CACHE_STATS.clear()


def cache_info() -> dict[str, int]:
    """Hits, misses and current size of the decode cache."""
    return {"hits": _CACHE_STATS["hits"], "misses": _CACHE_STATS["misses"], "size": len(_CACHE)}
