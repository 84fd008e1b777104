"""`ImageSet`: a labelled image set whose metadata (labels, identities, cameras, split) is in
memory and whose pixels live in an `ImageStore` (`ufo.data.store`): decoded in memory as uint8,
or in files read when a batch needs them.

Small sets are decoded once (`to_memory`) and kept as uint8 (N, C, H, W), so a batch is one index
into a tensor and augmentation runs on the whole batch (`ufo.data.transforms`). Large sets stream:
DataLoader workers decode and augment each image when its batch is drawn (`ufo.data.loader`).
A small per-process cache means the same reader call on the same files is decoded only once.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ufo.arch import as_hw
from ufo.data.decode import adapt, decode
from ufo.data.store import ImageStore, TensorStore
from ufo.errors import DataError

Indices = Sequence[int] | np.ndarray | torch.Tensor
_SHOW = 3  # files named in a skip warning
_FIELDS = ("labels", "class_names", "identities", "cameras", "split", "name", "pairs")


class ImageSet:
    """A labelled image set.

    images: a uint8 (N, C, H, W) tensor (C in {1, 3}, one size for all samples), or an ImageStore
        whose images are decoded when read (`in_memory` tells which; `to_memory()` decodes a store).
    labels: int64 (N,), values in 0..num_classes-1 (`relabel()` makes the used ones contiguous).
    class_names: name of each label value.
    identities: int64 (N,) instance id (a face's subject, a sign's GTSRB track, an Omniglot drawer),
        or None. Negative values mean "unknown" (e.g. GTSRB test images, which have no track).
    cameras: int64 (N,) camera/view id, or None.
    split: the official split of each sample ("train", "test", "query", "gallery", ...), or None.
    origin: where each sample came from (a file path or "archive.zip:member"), for error messages;
        a tensor set may pass its own, a store names its files itself.
    name: a short name of the set (recipe or folder name).
    pairs: int64 (M, 4) official verification pairs (index a, index b, same 0/1, fold), or None.
    """

    def __init__(
        self,
        images: torch.Tensor | ImageStore,
        labels: torch.Tensor,
        class_names: Sequence[str],
        identities: torch.Tensor | None = None,
        cameras: torch.Tensor | None = None,
        split: Sequence[str] | None = None,
        origin: Sequence[str] | None = None,
        name: str = "images",
        pairs: np.ndarray | None = None,
    ) -> None:
        self.name = name
        if isinstance(images, ImageStore):
            if origin:
                raise DataError(f"ImageSet {name!r}: a store names its own files; do not pass origin")
            self.store = images
        else:
            self.store = TensorStore(images, origin, name)
        self.labels, self.identities, self.cameras = labels, identities, cameras
        self.class_names = [str(c) for c in class_names]
        self.split = None if split is None else list(split)
        self.pairs = None if pairs is None else np.asarray(pairs, dtype=np.int64).reshape(-1, 4)
        self._check()

    def _check(self) -> None:
        n = len(self.store)
        for fname in ("labels", "identities", "cameras"):
            t = getattr(self, fname)
            if t is None and fname != "labels":
                continue
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.ndim != 1:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise DataError(f"ImageSet {self.name!r}: {fname} must be an int64 tensor (N,), got {got}")
            if t.shape[0] != n:
                raise DataError(f"ImageSet {self.name!r}: {fname} has {t.shape[0]} entries but there are {n} images")
        if self.split is not None and len(self.split) != n:
            raise DataError(f"ImageSet {self.name!r}: split has {len(self.split)} entries but there are {n} images")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)):
            bad = int(self.labels.min()) if int(self.labels.min()) < 0 else int(self.labels.max())
            raise DataError(
                f"ImageSet {self.name!r}: label {bad} is outside 0..{len(self.class_names) - 1} "
                f"({len(self.class_names)} class names)"
            )
        if self.pairs is not None and len(self.pairs) and (self.pairs[:, :2].min() < 0 or self.pairs[:, :2].max() >= n):
            raise DataError(f"ImageSet {self.name!r}: a pair names an image outside 0..{n - 1}")

    # ----- views -----
    def __len__(self) -> int:
        return len(self.store)

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.image_shape)) if self.in_memory else self.store.describe()
        extra = "".join(
            f", {k}"
            for k, v in (
                ("identities", self.identities),
                ("cameras", self.cameras),
                ("split", self.split),
                ("pairs", self.pairs),
            )
            if v is not None
        )
        return f"ImageSet({self.name!r}, n={len(self)}, classes={self.num_classes}, {shape}{extra})"

    @property
    def in_memory(self) -> bool:
        """True when every image is decoded in memory; False when they are read from files on demand."""
        return self.store.in_memory

    @property
    def images(self) -> torch.Tensor:
        """uint8 (N, C, H, W) of an in-memory set. A streamed set has no such tensor: read it in
        batches (`ufo.data.loader.iter_batches`) or decode it whole with `to_memory()`."""
        if not isinstance(self.store, TensorStore):  # the one in-memory store
            raise DataError(
                f"ImageSet {self.name!r} streams its images ({self.store.describe()}); read it with "
                "ufo.data.loader.iter_batches, or decode it whole with .to_memory(image_size)"
            )
        return self.store.images

    @property
    def origin(self) -> list[str]:
        """Where each sample came from."""
        return self.store.origins()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image (in-memory sets; a streamed set's files may differ in size)."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def counts(self) -> torch.Tensor:
        """Number of samples of each class, int64 (num_classes,)."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def replace(self, **changes: Any) -> ImageSet:
        """The same set with some of its fields changed (images/store are shared, never copied)."""
        unknown = sorted(set(changes) - set(_FIELDS) - {"images"})
        if unknown:
            raise TypeError(f"ImageSet.replace: unknown field(s) {unknown}")
        kw = {f: getattr(self, f) for f in _FIELDS}
        kw.update(changes)
        images = kw.pop("images", self.store)
        return ImageSet(images, **kw)

    def subset(self, indices: Indices) -> ImageSet:
        """The samples at `indices` (ints or a boolean mask), with every field kept consistent.

        Labels and class_names are unchanged; call `relabel()` to drop classes left empty. Pairs
        whose two images are both kept are renumbered; the others are dropped.
        """
        idx = torch.as_tensor(np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices)
        if idx.dtype == torch.bool:
            if idx.shape != (len(self),):
                raise DataError(f"ImageSet {self.name!r}: mask has shape {tuple(idx.shape)}, expected ({len(self)},)")
            idx = idx.nonzero().flatten()
        idx = idx.to(torch.int64).flatten()
        if idx.numel() and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise DataError(f"ImageSet {self.name!r}: index out of range for {len(self)} samples")
        idx = torch.where(idx < 0, idx + len(self), idx)
        il = idx.tolist()
        pairs = None
        if self.pairs is not None:
            new = np.full(len(self), -1, dtype=np.int64)
            new[idx.numpy()] = np.arange(len(il))
            a, b = new[self.pairs[:, 0]], new[self.pairs[:, 1]]
            keep = (a >= 0) & (b >= 0)
            pairs = np.stack([a[keep], b[keep], self.pairs[keep, 2], self.pairs[keep, 3]], 1)
        return ImageSet(
            self.store.take(idx.numpy()),
            labels=self.labels[idx],
            class_names=list(self.class_names),
            identities=None if self.identities is None else self.identities[idx],
            cameras=None if self.cameras is None else self.cameras[idx],
            split=None if self.split is None else [self.split[i] for i in il],
            name=self.name,
            pairs=pairs,
        )

    def relabel(self) -> ImageSet:
        """Same samples with the used labels renumbered 0..k-1 (in their old order) and class_names
        filtered to the used classes."""
        used = torch.unique(self.labels)  # sorted
        remap = torch.full((max(self.num_classes, 1),), -1, dtype=torch.int64)
        remap[used] = torch.arange(used.numel())
        return self.replace(
            labels=remap[self.labels] if len(self) else self.labels.clone(),
            class_names=[self.class_names[i] for i in used.tolist()],
        )

    def with_labels(self, labels: torch.Tensor, class_names: list[str]) -> ImageSet:
        """Same images with other labels (e.g. identities used as classes for re-identification)."""
        return self.replace(labels=labels, class_names=list(class_names))

    # ----- decoding -----
    def to_memory(
        self,
        image_size: int | tuple[int, int] | None = None,
        channels: int | None = None,
        on_error: str = "raise",
        threads: int | None = None,
    ) -> ImageSet:
        """Every image decoded into memory (uint8) at `image_size` (None: the files' own size, which
        must then agree). Unreadable images raise a DataError naming them, or with on_error="skip"
        are dropped with one counted warning. Decoding runs on `threads` threads (PIL releases the
        GIL; default: the CPU count, up to 8)."""
        if self.in_memory and image_size is None and channels is None:
            return self
        size_hw = None if image_size is None else as_hw(image_size)
        col = Collector(self.name if self.in_memory else self.store.describe(), size_hw, channels, on_error)
        store = self.store

        def read(i: int) -> np.ndarray | Exception:
            try:
                return store.read(i, size_hw, channels)
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib errors...
                return e

        n = len(self)
        threads = min(8, os.cpu_count() or 1) if threads is None else threads
        if threads > 1 and n >= 256:
            with ThreadPoolExecutor(threads) as pool:
                results: Iterable = pool.map(read, range(n), chunksize=64)
                for i, r in enumerate(results):
                    col.add_result(store.origin(i), r)
        else:
            for i in range(n):
                col.add_result(store.origin(i), read(i))
        images = col.finish()
        kept = np.asarray(col.kept, dtype=np.int64)
        part = self if len(kept) == n else self.subset(kept)
        return part.replace(images=TensorStore(images, [store.origin(int(i)) for i in kept], self.name))


def some(items: Sequence[str]) -> str:
    """The first few of `items` for a warning: "a; b; c and 4 more"."""
    more = f" and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return "; ".join(items[:_SHOW]) + more


class Collector:
    """Takes decoded images one by one under the on_error policy and stacks them at the end.

    `where` names the set in messages. With `size_hw` None every image must have the first one's
    size (the error names two files that differ); channels None lifts the whole set to 3 channels
    as soon as one image is in colour."""

    def __init__(self, where: str, size_hw: tuple[int, int] | None, channels: int | None, on_error: str):
        check_options(channels, on_error)
        self.where, self.size_hw, self.channels, self.on_error = where, size_hw, channels, on_error
        self.arrays: list[np.ndarray] = []
        self.kept: list[int] = []
        self.skipped: list[str] = []
        self._first: tuple[str, tuple[int, int]] | None = None
        self._n = 0

    def _reject(self, problem: str) -> None:
        if self.on_error == "raise":
            raise DataError(f"{problem} (pass on_error='skip' to drop unreadable images)")
        self.skipped.append(problem)

    def fail(self, problem: str) -> None:
        """Take the next sample position for a sample that cannot be read (e.g. a missing file):
        raise a DataError with `problem`, or count it as skipped."""
        self._n += 1
        self._reject(problem)

    def add(self, origin: str, src: Callable[[], Any] | np.ndarray) -> None:
        """Decode `src()` (a path, bytes or file object) or adapt an (H, W[, 3]) array, as the next sample."""
        arr: np.ndarray | Exception
        try:
            if isinstance(src, np.ndarray):
                arr = adapt(src, self.size_hw, self.channels)
            else:
                arr = decode(src(), self.size_hw, self.channels)
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib errors...
            arr = e
        self.add_result(origin, arr)

    def add_result(self, origin: str, arr: np.ndarray | Exception) -> None:
        """The next sample, already decoded to (C, H, W), or the exception its decoding raised."""
        i, self._n = self._n, self._n + 1
        if isinstance(arr, Exception):
            self._reject(f"cannot read image {origin}: {type(arr).__name__}: {arr}")
            return
        hw = (int(arr.shape[1]), int(arr.shape[2]))
        if self._first is None:
            self._first = (origin, hw)
        elif hw != self._first[1] and self.size_hw is None:
            (o0, (h0, w0)), (h, w) = self._first, hw
            raise DataError(
                f"images in {self.where} differ in size: {o0} is {h0}x{w0} (HxW) but {origin} is {h}x{w}; "
                f"set image_size (e.g. image_size: 32) to resize them when they are read"
            )
        self.arrays.append(arr)
        self.kept.append(i)

    def finish(self) -> torch.Tensor:
        """uint8 (N, C, H, W) of the kept images; warns about the skipped ones."""
        if self.skipped:
            warnings.warn(
                f"skipped {len(self.skipped)} unreadable image(s) in {self.where}: {some(self.skipped)}",
                stacklevel=3,
            )
        if not self.arrays:
            raise DataError(f"no readable images in {self.where}")
        if self.channels is None and len({a.shape[0] for a in self.arrays}) > 1:
            self.arrays = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in self.arrays]
        return torch.from_numpy(np.stack(self.arrays))


def check_options(channels: int | None, on_error: str) -> None:
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1, 3 or None, got {channels!r}")
    if on_error not in ("raise", "skip"):
        raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


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
    )  # in-memory sets only: `images` raises a clear error for a streamed one


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
    number = {u: i for i, u in enumerate(uniq)}
    return torch.tensor([number[v] for v in ints], dtype=torch.int64), [str(u) for u in uniq]


# ---------------------------------------------------------------------------------------------
# Per-process decode cache.
# ---------------------------------------------------------------------------------------------

_CACHE: OrderedDict[tuple, tuple[ImageSet, list[str]]] = OrderedDict()
_CACHE_MAX = 16
_CACHE_STATS: Counter[str] = Counter()


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
        return ds.replace()
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
    return ds.replace()


def clear_cache() -> None:
    """Forget every decoded set (frees their memory)."""
    _CACHE.clear()
    _CACHE_STATS.clear()


def cache_info() -> dict[str, int]:
    """Hits, misses and current size of the decode cache."""
    return {"hits": _CACHE_STATS["hits"], "misses": _CACHE_STATS["misses"], "size": len(_CACHE)}
