"""MixedTaskSampler: the batch planner of multi-task training.

Each step it decides which sample indices of which task go into the batch. It is iteration-based
(infinite: small tasks simply cycle), deterministic given the seed, and resumable: `state_dict()`
is a small JSON-serialisable dict, and a sampler restored from it continues the exact sequence.

Randomness is counter-based rather than a generator carried from step to step. Every random
decision draws from a fresh numpy Generator keyed by (seed, task index, stream, counter):
  plain task  : permutation of epoch e             <- (seed, i, PERM, e)
  grouped task: order of eligible groups, epoch e  <- (seed, i, ORDER, e)
                the K picks inside groups, draw d  <- (seed, i, PICK, d)
  proportional: the task of each sample at step s  <- (seed, MIX, s)
So a task's stream depends only on its own counters (not on other tasks' quotas), and the state is
a handful of ints per task instead of permutations and generator states: it stays a few hundred
bytes for ImageNet-sized tasks and restores exactly.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ufo.errors import DataError

MODES: tuple[str, ...] = ("hetero", "round_robin", "proportional")
STATE_VERSION = 1
_PERM, _ORDER, _PICK = 0, 1, 2  # per-task random streams
_MIX = 2**32 - 1  # spawn-key prefix of the task-mixing stream; no task index reaches it


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent Generator for one (seed, key...) counter."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


@dataclass
class TaskSource:
    """One task as the sampler sees it: a name, a sample count and optional group labels.

    `groups[j]` is the identity/class of sample j; with it the task is drawn P x K (P distinct
    groups, K samples each, P = share // k), which metric-learning losses need for positives.
    """

    name: str
    size: int
    groups: np.ndarray | None = None
    k: int = 4


class _PlainStream:
    """Walks a fresh random permutation per epoch; a draw longer than the rest wraps over."""

    def __init__(self, seed: int, index: int, size: int) -> None:
        self.seed, self.index, self.size = seed, index, size
        self.epoch = self.pos = 0
        self._cached: tuple[int, np.ndarray] | None = None

    def _perm(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, _rng(self.seed, self.index, _PERM, epoch).permutation(self.size))
        return self._cached[1]

    def draw(self, n: int) -> np.ndarray:
        out = []
        while n > 0:
            take = min(n, self.size - self.pos)
            out.append(self._perm(self.epoch)[self.pos : self.pos + take])
            self.pos, n = self.pos + take, n - take
            if self.pos == self.size:
                self.epoch, self.pos = self.epoch + 1, 0
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, s: dict) -> None:
        if not 0 <= s["pos"] < self.size or s["epoch"] < 0:
            raise DataError(f"sampler state: position {s} is out of range for task size {self.size}")
        self.epoch, self.pos = int(s["epoch"]), int(s["pos"])


class _GroupStream:
    """P x K sampling: P distinct groups from a per-epoch shuffled order, K samples from each.

    When a batch crosses an epoch boundary, groups of the new order that the batch already holds
    are deferred (kept for later in that epoch, not dropped), so the P groups stay distinct and
    every eligible group is still visited once per epoch. `ahead` lists groups of the current epoch
    that were taken out of order and must be skipped when the walk reaches them.
    """

    def __init__(self, seed: int, index: int, members: list[np.ndarray], k: int) -> None:
        self.seed, self.index, self.members, self.k = seed, index, members, k
        self.n = len(members)
        self.epoch = self.pos = self.draws = 0
        self.ahead: set[int] = set()
        self._cached: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, _rng(self.seed, self.index, _ORDER, epoch).permutation(self.n))
        return self._cached[1]

    def _advance(self) -> None:
        """Step past the current slot and any already-used ones; roll to the next epoch at the end."""
        self.pos += 1
        order = self._order(self.epoch)
        while self.pos < self.n and int(order[self.pos]) in self.ahead:
            self.ahead.discard(int(order[self.pos]))
            self.pos += 1
        if self.pos == self.n:
            self.epoch, self.pos, self.ahead = self.epoch + 1, 0, set()

    def _take(self, p: int) -> list[int]:
        chosen: list[int] = []
        while len(chosen) < p:
            order = self._order(self.epoch)
            j = self.pos
            while int(order[j]) in chosen or int(order[j]) in self.ahead:
                j += 1  # p <= n guarantees a free group before the end (see class docstring)
            g = int(order[j])
            chosen.append(g)
            if j == self.pos:
                self._advance()
            else:
                self.ahead.add(g)
        return chosen

    def draw(self, n: int) -> np.ndarray:
        """n samples: ceil(n / k) groups of k (a share that is not a multiple of k cuts the last)."""
        rng = _rng(self.seed, self.index, _PICK, self.draws)
        self.draws += 1
        out = []
        for g in self._take(math.ceil(n / self.k)):
            m = self.members[g]
            if len(m) >= self.k:
                out.append(rng.choice(m, self.k, replace=False))
            else:  # every member once, the rest repeated: a group always yields >= 2 distinct samples
                out.append(np.concatenate([rng.permutation(m), rng.choice(m, self.k - len(m))]))
        return np.concatenate(out)[:n].astype(np.int64)

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "draws": self.draws, "ahead": sorted(self.ahead)}

    def load(self, s: dict) -> None:
        if not 0 <= s["pos"] < self.n or s["epoch"] < 0 or s["draws"] < 0:
            raise DataError(f"sampler state: position {s} is out of range for {self.n} eligible groups")
        self.epoch, self.pos, self.draws = int(s["epoch"]), int(s["pos"]), int(s["draws"])
        self.ahead = {int(g) for g in s["ahead"]}


def _check_task(i: int, t: TaskSource) -> None:
    if not isinstance(t, TaskSource):
        raise DataError(f"tasks[{i}] must be a TaskSource, got {type(t).__name__}")
    if not isinstance(t.name, str) or not t.name:
        raise DataError(f"tasks[{i}]: name must be a non-empty string, got {t.name!r}")
    if not _is_int(t.size) or t.size <= 0:
        raise DataError(
            f"task {t.name!r}: size must be a positive int, got {t.size!r} (an empty task cannot be sampled)"
        )
    if t.groups is not None:
        if not _is_int(t.k) or t.k < 1:
            raise DataError(f"task {t.name!r}: k must be a positive int, got {t.k!r}")
        g = np.asarray(t.groups)
        if g.ndim != 1 or len(g) != t.size:
            raise DataError(
                f"task {t.name!r}: groups must be 1-D with one label per sample ({t.size}), got shape {g.shape}"
            )


def _group_members(groups: np.ndarray) -> tuple[int, list[np.ndarray], str]:
    """(number of groups, sample indices of each group with >= 2 samples, fingerprint of labels)."""
    _, codes = np.unique(np.asarray(groups), return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    counts = np.bincount(codes)
    by_group = np.split(np.argsort(codes, kind="stable"), np.cumsum(counts)[:-1])
    eligible = [m.astype(np.int64) for m, c in zip(by_group, counts) if c >= 2]
    return len(counts), eligible, hashlib.sha256(codes.astype("<i8").tobytes()).hexdigest()[:16]


def pk_capacity(groups: Any, k: int) -> int:
    """The largest P x K batch a grouped task can fill with distinct groups: (groups with >= 2
    samples) x K."""
    _, counts = np.unique(np.asarray(groups), return_counts=True)
    return int((counts >= 2).sum()) * k


def _check_groups(t: TaskSource, n_groups: int, n_eligible: int, p: int, share: int | None) -> None:
    """P x K needs P (and at least 2) distinct groups that have >= 2 samples each."""
    p = max(p, 2)
    if n_eligible < p:
        why = f", batch share {share}" if share is not None else ""
        raise DataError(
            f"task {t.name!r}: P x K sampling needs P={p} distinct groups with >= 2 samples "
            f"(K={t.k}{why}), but it has {n_groups} groups of which only {n_eligible} have "
            ">= 2 samples; lower its share, batch_size or k, or add data"
        )


def _fits(r: int, units: list[tuple[int, int]]) -> bool:
    """Whether r is a sum of at most c_i copies of g_i for (g_i, c_i) in units (bounded coins).

    A bitset DP on a Python int, with each count split into powers of two (0/1 items).
    """
    if any(g == 1 and c >= r for g, c in units):
        return True
    reach, mask = 1, (1 << (r + 1)) - 1
    for g, c in units:
        c, piece = min(c, r // g), 1
        while c > 0:
            take = min(piece, c)
            reach |= (reach << (take * g)) & mask
            c, piece = c - take, piece * 2
    return bool(reach >> r & 1)


def temperature_probs(sizes: list[int], temperature: float) -> np.ndarray:
    """p_t proportional to size_t ** (1 / temperature), computed in log space (no overflow)."""
    logits = np.log(np.asarray(sizes, float)) / temperature
    p = np.exp(logits - logits.max())
    return p / p.sum()


def allocate_quotas(
    targets: np.ndarray, batch_size: int, lo: list[int], unit: list[int], hi: list[int | None], names: list[str]
) -> list[int]:
    """Integer shares near `targets` that sum to batch_size, each in [lo, hi] and a multiple of unit.

    Starts from the minimums and adds one unit at a time where it most reduces |target - share|
    (largest remainder when every unit is 1), while keeping the rest of the batch fillable.
    """
    q = list(lo)
    rest = batch_size - sum(q)
    if rest < 0:
        need = ", ".join(f"{n}={m}" for n, m in zip(names, lo))
        raise DataError(
            f"hetero mode needs batch_size >= {sum(lo)} (every task at least 1 sample per batch, "
            f"grouped tasks at least 2*k: {need}); got batch_size={batch_size}"
        )

    def room(t: int) -> int:
        h = hi[t]
        return (batch_size if h is None else h - q[t]) // unit[t]

    caps = [h for h in hi if h is not None]
    if len(caps) == len(hi) and sum(caps) < batch_size:
        cap = ", ".join(f"{n}={h}" for n, h in zip(names, hi))
        raise DataError(
            f"batch_size={batch_size} is more than the grouped tasks can fill with distinct groups "
            f"(eligible groups * k: {cap}, {sum(caps)} in all); lower batch_size or add a plain task"
        )
    if not _fits(rest, [(unit[t], room(t)) for t in range(len(q))]):
        raise DataError(
            f"batch_size={batch_size} cannot be split into whole groups of k "
            f"({dict(zip(names, unit))}) within the available groups; pick another batch_size "
            "or give a plain (ungrouped) task a share"
        )
    while rest > 0:
        best, best_key = -1, None
        for t in range(len(q)):
            g = unit[t]
            if g > rest or room(t) < 1:
                continue
            q[t] += g  # tentatively, to test that the remainder still fits
            ok = _fits(rest - g, [(unit[u], room(u)) for u in range(len(q))])
            q[t] -= g
            if not ok:
                continue
            d = targets[t] - q[t]
            key = (abs(d) - abs(d - g), d)
            if best_key is None or key > best_key:
                best, best_key = t, key
        q[best] += unit[best]
        rest -= unit[best]
    return q


def rank_rows(n: int, unit: int, rank: int, world: int) -> list[int]:
    """The positions in a task's share of `n` rows that rank `rank` of `world` takes: blocks of
    `unit` rows, dealt round-robin (rank r takes blocks r, r + world, ...). With unit 1 that is
    rows r, r + world, ...; a grouped task's blocks are its P x K identity groups, which a rank
    then holds whole (dealt one row at a time, K = 4 over 4 ranks would leave no positive pair)."""
    blocks = -(-n // unit)
    return [j for b in range(rank, blocks, world) for j in range(b * unit, min((b + 1) * unit, n))]


class MixedTaskSampler:
    """Plans multi-task batches: each step, {task name: int64 sample indices of that task}.

    Modes:
      hetero       every task in every batch, with a fixed share (`quotas()`): explicit, or from
                   temperature sampling over sizes (temperature 1 proportional, large ~ uniform)
      round_robin  one task per step, in the given order; the whole batch from it
      proportional each sample picks its task with p ~ size ** (1 / temperature); tasks may be absent
    Within a task, plain tasks walk a permutation per epoch (no repeats within an epoch) and grouped
    tasks are drawn P x K. Tasks absent from a step are not keys of its dict.
    """

    def __init__(
        self,
        tasks: list[TaskSource],
        batch_size: int,
        mode: str = "hetero",
        quotas: dict[str, int] | None = None,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        if mode not in MODES:
            raise DataError(f"unknown sampler mode {mode!r}; choose one of {', '.join(MODES)}")
        if not _is_int(batch_size) or batch_size <= 0:
            raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
        if not _is_int(seed) or seed < 0:
            raise DataError(f"sampler seed must be a non-negative int, got {seed!r}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
            raise DataError(f"sampler temperature must be a positive finite number, got {temperature!r}")
        tasks = list(tasks)
        if not tasks:
            raise DataError("MixedTaskSampler needs at least one task")
        for i, t in enumerate(tasks):
            _check_task(i, t)
        names = [t.name for t in tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise DataError(f"duplicate task names in sampler: {dup}")
        if quotas is not None and mode != "hetero":
            raise DataError(f"quotas are only used in hetero mode, but mode is {mode!r}")

        self.tasks, self.names, self.mode = tasks, names, mode
        self.batch_size, self.temperature, self.seed = int(batch_size), float(temperature), int(seed)
        self._step = 0
        grouped = {i: _group_members(t.groups) for i, t in enumerate(tasks) if t.groups is not None}
        self._fingerprints = {i: fp for i, (_, _, fp) in grouped.items()}
        for i, (n_groups, members, _) in grouped.items():
            _check_groups(tasks[i], n_groups, len(members), 2, None)
        self._probs = temperature_probs([t.size for t in tasks], self.temperature)
        self._quotas = self._hetero_quotas(quotas, grouped) if mode == "hetero" else None

        self._streams: list[_PlainStream | _GroupStream] = []
        for i, t in enumerate(tasks):
            if t.groups is None:
                self._streams.append(_PlainStream(self.seed, i, t.size))
                continue
            n_groups, members, _ = grouped[i]
            # The largest share this task can get in one step, hence the most groups it needs.
            share = self._quotas[t.name] if self._quotas is not None else self.batch_size
            _check_groups(t, n_groups, len(members), math.ceil(share / t.k), share)
            self._streams.append(_GroupStream(self.seed, i, members, int(t.k)))

    def unit(self, name: str) -> int:
        """Rows of a task's share that go to one rank together (`rank_rows`): a grouped task's K
        (one identity's samples, so every rank keeps its positives), else 1."""
        t = self.tasks[self.names.index(name)]
        return int(t.k) if t.groups is not None else 1

    def _hetero_quotas(self, quotas: dict[str, int] | None, grouped: dict) -> dict[str, int]:
        if quotas is not None:
            return self._check_quotas(quotas)
        lo = [2 * t.k if t.groups is not None else 1 for t in self.tasks]
        unit = [t.k if t.groups is not None else 1 for t in self.tasks]
        # Derived shares never ask a grouped task for more groups than it has.
        hi = [len(grouped[i][1]) * t.k if t.groups is not None else None for i, t in enumerate(self.tasks)]
        q = allocate_quotas(self._probs * self.batch_size, self.batch_size, lo, unit, hi, self.names)
        return dict(zip(self.names, q))

    def _check_quotas(self, quotas: dict[str, int]) -> dict[str, int]:
        for name in quotas:
            if name not in self.names:
                raise DataError(f"quotas name unknown task {name!r}; tasks are {self.names}")
        missing = [n for n in self.names if n not in quotas]
        if missing:
            raise DataError(f"quotas must give every task a share in hetero mode; missing {missing}")
        for t in self.tasks:
            q = quotas[t.name]
            if not _is_int(q) or q <= 0:
                raise DataError(f"quotas[{t.name!r}] must be a positive int, got {q!r}")
            if t.groups is not None and (q < 2 * t.k or q % t.k):
                raise DataError(
                    f"quotas[{t.name!r}]={q}: a grouped task's share must be a multiple of k={t.k} "
                    f"and at least 2*k={2 * t.k}"
                )
        if sum(quotas.values()) != self.batch_size:
            raise DataError(f"quotas sum to {sum(quotas.values())} but batch_size is {self.batch_size}: {quotas}")
        return {n: int(quotas[n]) for n in self.names}

    # ---- sampling ----

    @property
    def step(self) -> int:
        """Number of batches drawn so far."""
        return self._step

    def quotas(self) -> dict[str, int]:
        """Each task's share of every batch (hetero mode only: other modes vary per step)."""
        if self._quotas is None:
            raise DataError(
                f"quotas() is defined for hetero mode only; in {self.mode!r} mode the "
                "per-task counts vary from step to step"
            )
        return dict(self._quotas)

    def _counts(self) -> list[int]:
        if self.mode == "hetero":
            quotas = self.quotas()
            return [quotas[n] for n in self.names]
        if self.mode == "round_robin":
            c = [0] * len(self.tasks)
            c[self._step % len(self.tasks)] = self.batch_size
            return c
        # Each sample picks its task independently: the counts are multinomial.
        return [int(x) for x in _rng(self.seed, _MIX, self._step).multinomial(self.batch_size, self._probs)]

    def next(self) -> dict[str, np.ndarray]:
        """The next batch plan: {task: int64 indices into that task's samples}."""
        plan = {}
        for name, stream, n in zip(self.names, self._streams, self._counts()):
            if n > 0:
                plan[name] = stream.draw(n)
        self._step += 1
        return plan

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            yield self.next()

    # ---- resumption ----

    def _signature(self) -> dict:
        """What a saved state must agree on: anything that changes the sequence."""
        sig: dict[str, Any] = {"mode": self.mode, "seed": self.seed, "batch_size": self.batch_size}
        if self.mode == "hetero":
            sig["quotas"] = self.quotas()
        if self.mode == "proportional":
            sig["temperature"] = self.temperature
        sig["tasks"] = [
            {
                "name": t.name,
                "size": int(t.size),
                "k": int(t.k) if t.groups is not None else None,
                "groups": self._fingerprints.get(i),
            }
            for i, t in enumerate(self.tasks)
        ]
        return sig

    def state_dict(self) -> dict:
        """Plain JSON-serialisable state (ints, strs, lists, dicts) from which the sequence resumes."""
        return {
            "version": STATE_VERSION,
            "signature": self._signature(),
            "step": self._step,
            "streams": [s.state() for s in self._streams],
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`; DataError naming the field when it is from another sampler."""
        try:
            version, sig, step, streams = state["version"], state["signature"], state["step"], state["streams"]
        except (KeyError, TypeError) as e:
            raise DataError(f"malformed sampler state: missing {e}") from None
        if version != STATE_VERSION:
            raise DataError(f"sampler state version {version!r} is not supported (expected {STATE_VERSION})")
        mine = self._signature()

        def mismatch(what: str, theirs: Any, ours: Any) -> DataError:
            return DataError(
                f"sampler state does not match this sampler: {what} is {theirs!r} in the state but {ours!r} here"
            )

        for key in ("mode", "seed", "batch_size"):
            if sig.get(key) != mine[key]:
                raise mismatch(key, sig.get(key), mine[key])
        theirs_t = sig.get("tasks", [])
        if [t.get("name") for t in theirs_t] != self.names:
            raise mismatch("the task list", [t.get("name") for t in theirs_t], self.names)
        for a, b in zip(theirs_t, mine["tasks"]):
            for key in ("size", "k", "groups"):
                if a.get(key) != b[key]:
                    what = "group labels" if key == "groups" else key
                    raise mismatch(f"task {b['name']!r} {what}", a.get(key), b[key])
        for key in ("quotas", "temperature"):
            if sig.get(key) != mine.get(key):
                raise mismatch(key, sig.get(key), mine.get(key))
        if not _is_int(step) or step < 0 or not isinstance(streams, list) or len(streams) != len(self._streams):
            raise DataError("malformed sampler state: step or streams do not fit this sampler")
        try:
            for s, st in zip(self._streams, streams):
                s.load(st)
        except (KeyError, TypeError) as e:
            raise DataError(f"malformed sampler state: bad stream entry ({e})") from None
        self._step = int(step)
