"""Batches of images for training and evaluation, from in-memory and streamed sets alike.

`MixedLoader` turns the `MixedTaskSampler`'s plans into model input, one step at a time:
- a task held in memory is indexed and augmented as a whole batch in the main process
  (`BatchTransform`), on the training device: on a GPU the augmentation runs there;
- a streamed task is read by a torch `DataLoader`: its workers decode each file at the task's
  input size and augment it (`SampleTransform`), pinned memory and prefetching keep the next
  batches ready, and the main process only normalises them (on the GPU when there is one).
Each rank reads only its own slice of every task's share (`sampler.rank_rows`: rows rank, rank +
world, ..., or whole P x K identity groups for a grouped task); no rank decodes or holds a whole
set. Tasks of different input sizes come back as one chunk per size.

Resumption stays exact: the loader's own sampler advances only when a batch is consumed, so
`state_dict()` is the sampler position of the last batch the model saw, however far the workers
have read ahead. A streamed sample's random augmentation is drawn from (seed, task, step, slot),
so it is the same whatever the number of workers, ranks or restarts.

`iter_batches(ds, ...)` yields a set's images in order, in uint8 batches at the task's input
size (evaluation, BatchNorm re-calibration, ONNX calibration).
"""

from __future__ import annotations

import copy
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ufo.arch import as_hw
from ufo.data.dataset import ImageSet, some
from ufo.data.sampler import MixedTaskSampler, rank_rows
from ufo.data.store import ImageStore
from ufo.data.transforms import BatchTransform, SampleTransform, build_transform, post_transform, random_erasing
from ufo.errors import DataError

MAX_TRIES = 8  # unreadable images in a row replaced before a streamed batch gives up
_SHOW = 3  # files named in a skip warning
_AUG_KEY = 7919  # separates the augmentation streams from the sampler's (same seed)
Chunk = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images, task ids, labels


def default_workers(requested: int | None = None) -> int:
    """DataLoader workers per process: `requested`, else the CPU cores of this machine divided among
    the ranks torchrun started on it, at most 8."""
    if requested is not None:
        return int(requested)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(8, (os.cpu_count() or 1) // max(1, local)))


@dataclass
class Feed:
    """One task's training input: its training split and how to turn it into model input."""

    name: str
    index: int  # the task's id in the model
    data: ImageSet
    size: tuple[int, int]
    in_chans: int = 3
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    augment: dict[str, Any] = field(default_factory=dict)
    on_error: str = "raise"


# ----- what the workers run -----


class _Samples(Dataset):
    """(feed, sample index, step, slot) -> (feed, uint8 image, label, skipped problems, error)."""

    def __init__(self, feeds: Sequence[Feed], seed: int, normalize: bool = False) -> None:
        self.seed = seed
        # on CPU the workers also convert to float and normalise (as a torchvision pipeline does),
        # leaving the training process's cores to the model; for a GPU they send uint8 (4x less to
        # copy) and the GPU normalises
        self.norm = [build_transform(f.size, f.mean, f.std, in_chans=f.in_chans) if normalize else None for f in feeds]
        self.ids = [f.index for f in feeds]
        self.stores: list[ImageStore] = [f.data.store for f in feeds]
        self.labels = [f.data.labels.numpy() for f in feeds]
        self.on_error = [f.on_error for f in feeds]
        self.tf = [SampleTransform(f.size, f.in_chans, f.augment, train=True) for f in feeds]
        # same-label members, for replacing an unreadable image by one that keeps the batch's P x K shape
        self.members = [_by_label(lab) if oe == "skip" else None for lab, oe in zip(self.labels, self.on_error)]

    def __len__(self) -> int:
        return sum(len(s) for s in self.stores)

    def __getitem__(self, key: tuple[int, int, int, int]) -> tuple:
        f, i, step, slot = key
        if f < 0:  # a step with nothing to stream: the marker that carries its step number
            return -1, None, -1, [], None, step
        rng = np.random.default_rng([self.seed, _AUG_KEY, self.ids[f], step, slot])
        skipped: list[str] = []
        label = int(self.labels[f][i])
        for _ in range(MAX_TRIES):
            try:
                return f, self.tf[f](self.stores[f], i, rng), label, skipped, None, step
            except Exception as e:  # PIL and the OS raise many kinds for a bad file
                problem = f"cannot read image {self.stores[f].origin(i)}: {type(e).__name__}: {e}"
                if self.on_error[f] == "raise":
                    return f, None, label, skipped, problem, step
                skipped.append(problem)
                members = self.members[f]
                assert members is not None  # built for every feed that skips
                same = members.get(label)
                i = (
                    int(rng.choice(same))
                    if same is not None and len(same) > 1
                    else int(rng.integers(len(self.labels[f])))
                )
                label = int(self.labels[f][i])
        return f, None, label, skipped, f"{MAX_TRIES} unreadable images in a row (last: {skipped[-1]})", step


def _by_label(labels: np.ndarray) -> dict[int, np.ndarray]:
    order = np.argsort(labels, kind="stable")
    uniq, starts = np.unique(labels[order], return_index=True)
    return {int(u): m for u, m in zip(uniq, np.split(order, starts[1:]))}


def _collate(items: list[tuple], norm: Sequence[BatchTransform | None] = ()) -> dict[str, Any]:
    """Group a step's samples by feed: {feed: (uint8 images, or float ones normalised by `norm[feed]`,
    int64 labels)}, plus problems."""
    out: dict[str, Any] = {"step": items[0][5] if items else -1, "skipped": [], "error": None, "tasks": {}}
    groups: dict[int, tuple[list, list]] = {}
    for f, x, y, skipped, error, _ in items:
        out["skipped"] += [(f, p) for p in skipped]
        if error is not None and out["error"] is None:
            out["error"] = error
        if f >= 0 and x is not None:
            xs, ys = groups.setdefault(f, ([], []))
            xs.append(x)
            ys.append(y)
    for f, (xs, ys) in groups.items():
        x = torch.stack(xs)
        tf = norm[f] if norm else None
        out["tasks"][f] = (tf(x) if tf is not None else x, torch.tensor(ys, dtype=torch.int64))
    return out


class _PlanBatches(Sampler):
    """The DataLoader's batch sampler: this rank's streamed samples of each step, read ahead from a
    copy of the loader's sampler started at `state`."""

    def __init__(self, sampler: MixedTaskSampler, state: dict, streamed: dict[str, int], rank: int, world: int):
        self.sampler, self.state, self.streamed, self.rank, self.world = sampler, state, streamed, rank, world

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        s = copy.deepcopy(self.sampler)
        s.load_state_dict(self.state)
        while True:
            step = s.step
            keys = []
            for name, idx in s.next().items():
                f = self.streamed.get(name)
                if f is None:
                    continue
                # slot = the sample's place in the global share, so ranks agree with a single process
                mine = rank_rows(len(idx), s.unit(name), self.rank, self.world)
                keys += [(f, int(idx[j]), step, j) for j in mine]
            yield keys or [(-1, -1, step, -1)]


# ----- the training loader -----


class MixedLoader:
    """Model input for each step of a `MixedTaskSampler` (see the module docstring).

    `next()` returns (images, task ids, labels) for this rank: images is one float tensor when
    every task in the step has the same input size, else a list with one tensor per size (task ids
    and labels follow the list's order). `step_tasks` then names the tasks of that step's global
    batch (every rank's slices together) and `step_rows` their rows in it, which every rank knows
    without communication.

    With `every_size` (FSDP, where every rank must run the same passes through the blocks), the
    chunks are those of the global batch: one per input size of its tasks, in the same order on
    every rank, empty (0 rows) where this rank has no rows of that size."""

    def __init__(
        self,
        feeds: Sequence[Feed],
        sampler: MixedTaskSampler,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        device: torch.device | str = "cpu",
        workers: int | None = None,
        prefetch: int = 4,
        every_size: bool = False,
    ) -> None:
        by_name = {f.name: f for f in feeds}
        missing = [n for n in sampler.names if n not in by_name]
        if missing:
            raise DataError(f"MixedLoader: the sampler draws task(s) {missing} that have no feed")
        self.sampler, self.seed, self.rank, self.world = sampler, seed, rank, world
        self.device = torch.device(device)
        self.feeds = [by_name[n] for n in sampler.names]
        self.by_name = {f.name: f for f in self.feeds}
        self.workers, self.prefetch = default_workers(workers), prefetch
        self.memory: dict[str, BatchTransform] = {}
        self.post: dict[str, BatchTransform] = {}
        self.erasing: dict[str, float] = {}
        streamed = []
        for f in self.feeds:
            if f.data.in_memory:
                self.memory[f.name] = build_transform(
                    f.size, f.mean, f.std, train=True, augment=f.augment, in_chans=f.in_chans
                )
            else:
                self.post[f.name] = post_transform(
                    f.size, f.mean, f.std, train=True, augment=f.augment, in_chans=f.in_chans
                )
                self.erasing[f.name] = self.post[f.name].aug["erasing"]
                streamed.append(f)
        self.streamed = {f.name: k for k, f in enumerate(streamed)}
        self._samples = _Samples(streamed, seed, normalize=self.device.type != "cuda") if streamed else None
        self._names = [f.name for f in streamed]
        self._loader: DataLoader | None = None
        self._it: Iterator | None = None
        self.skipped: Counter[str] = Counter()
        self._warned = 0
        self.every_size = every_size
        self.step_tasks: frozenset[str] = frozenset()  # the tasks of the last step's global batch
        self.step_rows: dict[str, int] = {}  # and their rows in it

    def local_rows(self) -> dict[str, int]:
        """This rank's rows of each task of the last step's global batch (`rank_rows`; 0 for a task
        with fewer rows, or identity groups, than ranks)."""
        return {
            n: len(rank_rows(rows, self.sampler.unit(n), self.rank, self.world)) for n, rows in self.step_rows.items()
        }

    # ----- state -----
    def state_dict(self) -> dict:
        """The sampler position after the last batch returned by `next()`."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; batches the workers had read ahead are dropped."""
        self.sampler.load_state_dict(state)
        self.close()

    def close(self) -> None:
        """Stop the workers (the next `next()` starts them again at the current position)."""
        self._it = None
        self._loader = None

    # ----- batches -----
    def _stream(self) -> Iterator[dict[str, Any]]:
        if self._it is None:
            assert self._samples is not None  # next() streams only when some feed is streamed
            batches = _PlanBatches(self.sampler, self.sampler.state_dict(), self.streamed, self.rank, self.world)
            w = self.workers
            self._loader = DataLoader(
                self._samples,
                batch_sampler=batches,
                num_workers=w,
                collate_fn=partial(_collate, norm=self._samples.norm),
                pin_memory=self.device.type == "cuda",
                persistent_workers=w > 0,
                prefetch_factor=self.prefetch if w > 0 else None,
            )
            self._it = iter(self._loader)
        return self._it

    def _note_skips(self, skipped: list[tuple[int, str]]) -> None:
        for f, problem in skipped:
            self.skipped[self._names[f]] += 1
            if self._warned < _SHOW:
                self._warned += 1
                warnings.warn(
                    f"task {self._names[f]!r}: {problem}; replaced by another image of the same label (on_error: skip)",
                    stacklevel=3,
                )

    def next(self) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor, torch.Tensor]:
        stream = self._stream() if self.streamed else None  # started at the position before this step
        step = self.sampler.step
        plan = self.sampler.next()
        self.step_tasks = frozenset(plan)
        self.step_rows = {name: len(idx) for name, idx in plan.items()}
        parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, tf in self.memory.items():
            idx = plan.get(name)
            mine = [] if idx is None else rank_rows(len(idx), self.sampler.unit(name), self.rank, self.world)
            if idx is None or not mine:
                continue
            ds = self.by_name[name].data
            sel = torch.from_numpy(np.asarray(idx, dtype=np.int64)[mine])
            # uint8 to the device, then augmented there: on a GPU the batch transform runs on the GPU
            # (its random draws stay on the CPU generator, so the draws are the same on any device)
            x = tf(ds.images[sel].to(self.device, non_blocking=True))
            parts[name] = (x, ds.labels[sel].to(self.device, non_blocking=True))
        if stream is not None:  # every step has a (possibly empty) streamed batch
            b = next(stream)
            if b["step"] != step:
                raise RuntimeError(f"streamed batch of step {b['step']} arrived at step {step}")
            self._note_skips(b["skipped"])
            if b["error"] is not None:
                raise DataError(f"{b['error']} (set data.on_error: skip to replace unreadable images)")
            for f, (x, y) in b["tasks"].items():
                name = self._names[f]
                x = x.to(self.device, non_blocking=True)
                if not x.is_floating_point():  # uint8 from the workers: normalise here (on the GPU)
                    x = self.post[name](x)
                elif self.erasing[name] > 0:  # normalised by the workers: only random erasing is left
                    x = random_erasing(x, self.erasing[name], None)
                parts[name] = (x, y.to(self.device, non_blocking=True))
        return self._assemble(parts)

    def _assemble(
        self, parts: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Tasks in model order, grouped into one chunk per input size (with `every_size`, one per
        size of the global batch's tasks)."""
        if not parts:
            raise DataError(f"step {self.sampler.step - 1}: this rank drew no samples (batch smaller than the ranks?)")
        chunks: dict[tuple[int, int], list[tuple[Feed, torch.Tensor, torch.Tensor]]] = {}
        for f in self.feeds:
            if f.name in parts:
                x, y = parts[f.name]
                chunks.setdefault((x.shape[-2], x.shape[-1]), []).append((f, x, y))
            elif self.every_size and f.name in self.step_tasks:
                chunks.setdefault((f.size[0], f.size[1]), [])
        xs, ids, ys = [], [], []
        for size, members in chunks.items():
            if not members:  # a size of the global batch without rows here
                xs.append(torch.zeros(0, self.feeds[0].in_chans, *size, device=self.device))
                continue
            xs.append(members[0][1] if len(members) == 1 else torch.cat([x for _, x, _ in members]))
            ids += [torch.full((len(y),), f.index, dtype=torch.long, device=y.device) for f, _, y in members]
            ys += [y for _, _, y in members]
        return (xs[0] if len(xs) == 1 else xs), torch.cat(ids), torch.cat(ys)


# ----- evaluation -----


class _EvalSamples(Dataset):
    def __init__(self, store: ImageStore, size: tuple[int, int], in_chans: int) -> None:
        self.store, self.tf = store, SampleTransform(size, in_chans, train=False)
        self.size, self.in_chans = size, in_chans

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, str | None]:
        try:
            return self.tf(self.store, i, np.random.default_rng(0)), None
        except Exception as e:
            return None, f"cannot read image {self.store.origin(i)}: {type(e).__name__}: {e}"


def _stack_eval(items: list[tuple], size: tuple[int, int], in_chans: int) -> tuple[torch.Tensor, list[str]]:
    blank = torch.zeros(in_chans, *size, dtype=torch.uint8)
    return torch.stack([x if x is not None else blank for x, _ in items]), [p for _, p in items if p is not None]


class _Collate:
    def __init__(self, size: tuple[int, int], in_chans: int) -> None:
        self.size, self.in_chans = size, in_chans

    def __call__(self, items: list[tuple]) -> tuple[torch.Tensor, list[str]]:
        return _stack_eval(items, self.size, self.in_chans)


def iter_batches(
    ds: ImageSet,
    image_size: int | tuple[int, int],
    in_chans: int = 3,
    batch_size: int = 256,
    workers: int | None = None,
    on_error: str = "raise",
) -> Iterator[torch.Tensor]:
    """`ds`'s images in order, as uint8 (B, C, H, W) batches.

    An in-memory set yields slices of its tensor (already at the size it was decoded at; the eval
    transform resizes if needed). A streamed set is decoded at `image_size` with `in_chans`
    channels by DataLoader workers (none for sets of under 512 images). An unreadable file raises a
    DataError naming it; with on_error="skip" it is scored as a black image, counted in one warning.
    """
    n = len(ds)
    if ds.in_memory:
        for i in range(0, n, batch_size):
            yield ds.images[i : i + batch_size]
        return
    size = as_hw(image_size)
    w = default_workers(workers) if n >= 512 else 0
    loader = DataLoader(
        _EvalSamples(ds.store, size, in_chans),
        batch_size=batch_size,
        num_workers=w,
        collate_fn=_Collate(size, in_chans),
    )
    problems: list[str] = []
    for x, bad in loader:
        if bad and on_error == "raise":
            raise DataError(f"{bad[0]} (set data.on_error: skip to score unreadable images as black)")
        problems += bad
        yield x
    if problems:
        warnings.warn(
            f"{ds.name}: {len(problems)} unreadable image(s) scored as black images: {some(problems)}", stacklevel=2
        )
