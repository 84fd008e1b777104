"""Where a set's pixels live: decoded in memory, or in files read when a batch needs them.

An `ImageStore` maps a sample index to one uint8 (C, H, W) image via
`read(i, size_hw, channels, box)` (see `ufo.data.decode.decode` for the arguments):

- `TensorStore`: a uint8 (N, C, H, W) tensor, every image at one size (small sets, arrays).
- `FileStore`: image files under a root, decoded on demand (folders, CSV manifests, Market-1501,
  LFW, Stanford Online Products, ImageNet layouts).
- `ZipStore`: members of zip files, read without extracting (Omniglot's archives).
- `TarStore`: samples inside webdataset tar shards, read by offset without unpacking (sets of
  millions of images in a few hundred files).

Lazy stores hold numpy arrays (relative paths as bytes, offsets as ints) rather than Python
objects, so their memory stays a few dozen bytes per sample and DataLoader workers forked from
the main process share it without copy-on-write growth.
"""

from __future__ import annotations

import contextlib
import os
import threading
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ufo.data.decode import BoxFn, adapt, decode
from ufo.errors import DataError


class ImageStore(ABC):
    """Index -> uint8 (C, H, W) image. `in_memory` stores hold every pixel already decoded."""

    in_memory: bool = False

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def take(self, idx: np.ndarray) -> ImageStore:
        """The store of the samples at int64 `idx` (in that order)."""

    @abstractmethod
    def origin(self, i: int) -> str:
        """Where sample i comes from (a file, "shard.tar:member", "set[i]"), for messages."""

    @abstractmethod
    def read(
        self, i: int, size_hw: tuple[int, int] | None = None, channels: int | None = None, box: BoxFn | None = None
    ) -> np.ndarray:
        """Sample i as uint8 (C, H, W); raises whatever the decoder raises for a bad file."""

    def origins(self) -> list[str]:
        return [self.origin(i) for i in range(len(self))]

    def describe(self) -> str:
        return f"{type(self).__name__}({len(self)} images)"


class TensorStore(ImageStore):
    """Images decoded once into a uint8 (N, C, H, W) tensor."""

    in_memory = True

    def __init__(self, images: torch.Tensor, origins: Sequence[str] | None = None, name: str = "images") -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise DataError(f"ImageSet {name!r}: images must be a uint8 tensor (N, C, H, W), got {got}")
        if images.shape[1] not in (1, 3):
            raise DataError(f"ImageSet {name!r}: images must have 1 or 3 channels, got {images.shape[1]}")
        self.images = images
        self._origins = list(origins) if origins else [f"{name}[{i}]" for i in range(images.shape[0])]
        if len(self._origins) != images.shape[0]:
            raise DataError(
                f"ImageSet {name!r}: origin has {len(self._origins)} entries but there are {images.shape[0]} images"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(self, idx: np.ndarray) -> TensorStore:
        t = torch.as_tensor(idx, dtype=torch.int64)
        return TensorStore(self.images[t], [self._origins[i] for i in t.tolist()])

    def origin(self, i: int) -> str:
        return self._origins[i]

    def origins(self) -> list[str]:
        return list(self._origins)

    def read(
        self, i: int, size_hw: tuple[int, int] | None = None, channels: int | None = None, box: BoxFn | None = None
    ) -> np.ndarray:
        img = self.images[i].numpy()
        return adapt(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0), size_hw, channels, box)


def _as_bytes_array(paths: Sequence[str | Path]) -> np.ndarray:
    return np.array([os.fsencode(str(p)) for p in paths], dtype=np.bytes_) if len(paths) else np.zeros(0, "S1")


class FileStore(ImageStore):
    """Image files `root / rel[i]`, decoded when read. `where` (optional) names each sample's
    record for messages, e.g. "manifest.csv row 12"."""

    def __init__(
        self, root: str | Path, rel: Sequence[str | Path] | np.ndarray, where: Sequence[str] | np.ndarray | None = None
    ) -> None:
        self.root = os.fsencode(str(root))
        self.rel = rel if isinstance(rel, np.ndarray) else _as_bytes_array(rel)
        self.where = None if where is None else (where if isinstance(where, np.ndarray) else _as_bytes_array(where))
        if self.where is not None and len(self.where) != len(self.rel):
            raise DataError(f"FileStore: {len(self.where)} record names for {len(self.rel)} files")

    def __len__(self) -> int:
        return len(self.rel)

    def take(self, idx: np.ndarray) -> FileStore:
        idx = np.asarray(idx, dtype=np.int64)
        out = FileStore.__new__(FileStore)
        out.root, out.rel = self.root, self.rel[idx]
        out.where = None if self.where is None else self.where[idx]
        return out

    def path(self, i: int) -> str:
        return os.fsdecode(os.path.join(self.root, self.rel[i]))

    def origin(self, i: int) -> str:
        p = self.path(i)
        return p if self.where is None else f"{os.fsdecode(self.where[i])}: {p}"

    def read(
        self, i: int, size_hw: tuple[int, int] | None = None, channels: int | None = None, box: BoxFn | None = None
    ) -> np.ndarray:
        return decode(Path(self.path(i)), size_hw, channels, box)

    def describe(self) -> str:
        return f"{len(self)} image files under {os.fsdecode(self.root)}"


class TarStore(ImageStore):
    """Images inside uncompressed tar shards (webdataset layout), read by byte offset.

    `shards[s]` is a shard file; sample i is `size[i]` bytes at `offset[i]` of shard `shard[i]`,
    named `member[i]` inside it. Each process opens a shard once and reads with `os.pread`, so
    forked DataLoader workers never share a file position."""

    def __init__(
        self, shards: Sequence[str], shard: np.ndarray, offset: np.ndarray, size: np.ndarray, member: np.ndarray
    ) -> None:
        self.shards = [str(s) for s in shards]
        self.shard, self.offset, self.size, self.member = (
            np.asarray(shard, np.int32),
            np.asarray(offset, np.int64),
            np.asarray(size, np.int64),
            member,
        )
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.offset)

    def take(self, idx: np.ndarray) -> TarStore:
        idx = np.asarray(idx, dtype=np.int64)
        return TarStore(self.shards, self.shard[idx], self.offset[idx], self.size[idx], self.member[idx])

    def origin(self, i: int) -> str:
        return f"{self.shards[self.shard[i]]}:{os.fsdecode(self.member[i])}"

    def raw(self, i: int) -> bytes:
        if self._pid != os.getpid():  # a forked worker: open its own descriptors
            self._fds, self._pid = {}, os.getpid()
        s = int(self.shard[i])
        fd = self._fds.get(s)
        if fd is None:
            fd = self._fds[s] = os.open(self.shards[s], os.O_RDONLY)
        data = os.pread(fd, int(self.size[i]), int(self.offset[i]))
        if len(data) != int(self.size[i]):
            raise OSError(f"shard is truncated: read {len(data)} of {int(self.size[i])} bytes")
        return data

    def read(
        self, i: int, size_hw: tuple[int, int] | None = None, channels: int | None = None, box: BoxFn | None = None
    ) -> np.ndarray:
        return decode(self.raw(i), size_hw, channels, box)

    def describe(self) -> str:
        return f"{len(self)} images in {len(self.shards)} tar shard(s)"

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_fds"} | {"_fds": {}}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in getattr(self, "_fds", {}).values():
                with contextlib.suppress(OSError):
                    os.close(fd)


class ZipStore(ImageStore):
    """Members of zip archives: sample i is `member[i]` of `zips[zip[i]]`. Each process (and
    thread) opens an archive once."""

    def __init__(self, zips: Sequence[str], zip_index: np.ndarray, member: np.ndarray) -> None:
        self.zips = [str(z) for z in zips]
        self.zip_index, self.member = np.asarray(zip_index, np.int32), member
        self._local = threading.local()

    def __len__(self) -> int:
        return len(self.member)

    def take(self, idx: np.ndarray) -> ZipStore:
        idx = np.asarray(idx, dtype=np.int64)
        return ZipStore(self.zips, self.zip_index[idx], self.member[idx])

    def origin(self, i: int) -> str:
        return f"{self.zips[self.zip_index[i]]}:{os.fsdecode(self.member[i])}"

    def raw(self, i: int) -> bytes:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.pid, local.files = os.getpid(), {}
        z = int(self.zip_index[i])
        zf = local.files.get(z)
        if zf is None:
            zf = local.files[z] = zipfile.ZipFile(self.zips[z])
        return zf.read(os.fsdecode(self.member[i]))

    def read(
        self, i: int, size_hw: tuple[int, int] | None = None, channels: int | None = None, box: BoxFn | None = None
    ) -> np.ndarray:
        return decode(self.raw(i), size_hw, channels, box)

    def describe(self) -> str:
        return f"{len(self)} images in {len(self.zips)} zip file(s)"

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()
