"""Latency of extracted subnets on a named backend, and datasets of measured archs for predictors.

`measure(space, arch, task, backend)` builds the plain timm ViT that `extract` would return for
`task`'s path through `arch` and times its forward pass at the task's input size: a fixed batch
size and thread count, `warmup` untimed calls, then the median of `repeats` timed calls with the
interquartile range as the spread. Backends: `torch-cpu` (eager torch), `ort-cpu` (ONNX Runtime on CPU, exported through
`ufo.deploy.onnx_export`) and `cuda` (eager torch on the GPU). `collect` measures N sampled archs
(the largest and smallest included) into a `LatencyDataset` that saves to JSON with its space.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ufo.arch import Arch, SearchSpace
from ufo.errors import ArchError, SearchError
from ufo.nn.extract import build_vit
from ufo.search.dataset import ArchDataset

BACKENDS: tuple[str, ...] = ("torch-cpu", "ort-cpu", "cuda")
DEFAULT_THREADS = 1


class Latency(BaseModel):
    """Milliseconds per forward pass: median and quartiles of `n` timed calls."""

    model_config = ConfigDict(extra="forbid")

    median_ms: float
    q1_ms: float
    q3_ms: float
    n: int

    @classmethod
    def of(cls, times_ms: list[float]) -> Latency:
        q1, med, q3 = np.percentile(np.asarray(times_ms, dtype=np.float64), [25, 50, 75])
        return cls(median_ms=float(med), q1_ms=float(q1), q3_ms=float(q3), n=len(times_ms))


def check_backend(backend: str) -> None:
    """Raise SearchError for an unknown backend (naming the available ones) or `cuda` without a GPU."""
    if backend not in BACKENDS:
        raise SearchError(f"unknown latency backend {backend!r}; available backends: {', '.join(BACKENDS)}")
    if backend == "cuda" and not torch.cuda.is_available():
        raise SearchError(
            "latency backend 'cuda' needs a CUDA GPU, and torch sees none on this machine "
            f"(torch {torch.__version__}); use torch-cpu or ort-cpu"
        )


def task_arch(space: SearchSpace, arch: Arch, task: str) -> Arch:
    """`arch` checked against `space`, with only `task`'s paths kept (they decide the FFN widths)."""
    space.check(arch)
    space.check_task(task)
    if task not in arch.paths:
        raise ArchError(
            f"arch has no paths for task {task!r}; latency needs the task's path through every block "
            f"(the arch has paths for {sorted(arch.paths)})"
        )
    return arch.model_copy(update={"paths": {task: list(arch.paths[task])}})


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with exactly `threads` intra-op torch threads, restoring the previous count afterwards."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int, sync: Callable[[], None] | None = None) -> Latency:
    """`warmup` untimed calls, then `repeats` calls timed one by one (`sync` waits for async devices)."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return Latency.of(times)


Runner = tuple[Callable[[], Any], Callable[[], None] | None]  # (one forward pass, wait for the device)


def _ort_runner(
    model: torch.nn.Module, space: SearchSpace, arch: Arch, task: str, x: torch.Tensor, threads: int, out: Path
) -> Callable[[], Any]:
    """Export `model` with the deployment exporter (wrapped as a TaskModel without a head) to `out`
    and return a call of an ONNX Runtime session with `threads` intra-op threads on `x`."""
    from ufo.deploy.onnx_export import INPUT, export_onnx, make_session
    from ufo.taskmodel import HeadInfo, Preprocessing, TaskModel, TaskModelInfo

    c = space.in_chans
    info = TaskModelInfo(
        tasks=[task],
        arch=arch,
        space=space,
        heads={task: HeadInfo(kind="backbone", output="embedding", num_classes=0, embedding_dim=arch.embed_dim)},
        preprocessing=Preprocessing(img_size=space.input_size(task), in_chans=c, mean=[0.0] * c, std=[1.0] * c),
    )
    tm = TaskModel(model, {task: torch.nn.Identity()}, info).eval()
    sess = make_session(export_onnx(tm, task, out), threads)
    feed = {INPUT: np.ascontiguousarray(x.numpy(), dtype=np.float32)}
    return lambda: sess.run(None, feed)


def make_runner(
    space: SearchSpace, arch: Arch, task: str, backend: str, batch: int, threads: int, workdir: Path, seed: int = 0
) -> Runner:
    """A no-argument forward pass of `task`'s path through `arch` on `backend` (ONNX files go to `workdir`).

    The model is `build_vit(space, arch, task)`, the exact layer shapes `extract` produces, with
    default-initialised weights rather than trained ones: latency does not depend on the weight
    values, so no checkpoint is needed. The input is a seeded random batch of `batch` images at the
    task's input size.
    Call it inside `torch_threads(threads)`.
    """
    arch = task_arch(space, arch, task)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, space.in_chans, *space.input_size(task), generator=g)
    model = build_vit(space, arch, task).eval()
    if backend == "ort-cpu":
        name = f"subnet-{len(list(workdir.glob('*.onnx')))}.onnx"
        return _ort_runner(model, space, arch, task, x, threads, workdir / name), None
    if backend == "cuda":
        model, x = model.cuda(), x.cuda()

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return run, (torch.cuda.synchronize if backend == "cuda" else None)


def _check_settings(batch: int, threads: int, repeats: int, warmup: int) -> None:
    if batch < 1 or threads < 1 or repeats < 1 or warmup < 0:
        raise SearchError(
            f"batch={batch}, threads={threads}, repeats={repeats}, warmup={warmup}: batch, threads and "
            "repeats must be at least 1 and warmup at least 0"
        )


def measure(
    space: SearchSpace,
    arch: Arch,
    task: str,
    backend: str = "torch-cpu",
    batch: int = 1,
    threads: int = DEFAULT_THREADS,
    repeats: int = 30,
    warmup: int = 5,
    seed: int = 0,
) -> Latency:
    """Latency of one forward pass of `task`'s path through `arch` (backbone only, no task head).

    The subnet is built with default-initialised weights (see `make_runner`): latency does not
    depend on weight values, so no trained model is needed. `threads` sets torch's intra-op
    threads (torch-cpu) or ORT's intra_op_num_threads (ort-cpu); it is ignored on cuda.
    """
    check_backend(backend)
    _check_settings(batch, threads, repeats, warmup)
    with torch_threads(threads), tempfile.TemporaryDirectory(prefix="ufo-latency-") as tmp:
        run, sync = make_runner(space, arch, task, backend, batch, threads, Path(tmp), seed)
        return time_calls(run, repeats, warmup, sync)


# ----- datasets of measured archs -----


class LatencyRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arch: Arch
    latency: Latency


class LatencyDataset(ArchDataset):
    """Measured archs of one task on one backend, with the space and settings they were measured in."""

    what = "latency dataset"

    kind: str = "ufo-latency-dataset"
    backend: str
    batch: int
    threads: int
    repeats: int
    warmup: int
    seed: int
    machine: dict[str, Any] = Field(default_factory=dict)
    records: list[LatencyRecord] = Field(default_factory=list)

    def targets(self) -> np.ndarray:
        """(N,) median latencies in milliseconds."""
        return np.array([r.latency.median_ms for r in self.records], dtype=np.float64)


def space_from(source: str | Path) -> SearchSpace:
    """The search space of a run folder or checkpoint (its manifest), an experiment YAML, a latency
    dataset JSON or a search-space JSON."""
    path = Path(source)
    if path.is_dir() or path.suffix == ".safetensors":
        from ufo.checkpoint import read_manifest

        f = path / "model.safetensors" if path.is_dir() else path
        manifest = read_manifest(f)
        if "space" not in manifest:
            raise SearchError(f"{f} ({manifest.get('kind')!r} checkpoint) has no search space in its manifest")
        return SearchSpace.model_validate(manifest["space"])
    if path.suffix in (".yaml", ".yml"):
        from ufo.config import load_config

        return load_config(path).space()
    if not path.is_file():
        raise SearchError(f"{path} not found: give a run folder, a checkpoint, a config YAML or a space JSON")
    try:
        doc = json.loads(path.read_text())
        return SearchSpace.model_validate(doc["space"] if isinstance(doc, dict) and "space" in doc else doc)
    except (ValueError, TypeError) as e:
        raise SearchError(f"{path} holds neither a search space nor a latency dataset: {e}") from None


def machine_info() -> dict[str, Any]:
    """Where latencies were measured: CPU, core count, torch and ONNX Runtime versions, GPU."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with contextlib.suppress(ImportError):
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def sample_archs(
    space: SearchSpace,
    task: str,
    n: int,
    seed: int = 0,
    routes: dict[str, list[str]] | None = None,
    exclude: list[Arch] | None = None,
    extremes: bool = True,
) -> list[Arch]:
    """The largest and smallest arch (with `extremes`) plus distinct seeded samples, `n` in all,
    each with `task`'s paths only: `routes` (a trained run's frozen routes) when given, else
    sampled. Archs in `exclude` are not drawn (held-out sets disjoint from training sets)."""
    if n < (2 if extremes else 1):
        raise SearchError(f"n={n}: collect at least {2 if extremes else 1} archs")
    space.check_task(task)
    rng = np.random.default_rng(seed)
    out = [task_arch(space, space.largest(routes), task), task_arch(space, space.smallest(routes), task)]
    seen = {a.model_dump_json() for a in [*out, *(exclude or [])]}
    if not extremes:
        out = []
    elif exclude:
        out = [a for a in out if a not in exclude]
    for _ in range(100 * n):
        if len(out) == n:
            break
        a = task_arch(space, space.sample(rng, routes), task)
        if a.model_dump_json() not in seen:
            seen.add(a.model_dump_json())
            out.append(a)
    if len(out) < n:
        raise SearchError(
            f"n={n}: the search space has only {len(out)} distinct archs for task {task!r} "
            f"that sampling found; ask for fewer"
        )
    return out


def measure_many(
    space: SearchSpace,
    archs: list[Arch],
    task: str,
    backend: str = "torch-cpu",
    seed: int = 0,
    batch: int = 1,
    threads: int = DEFAULT_THREADS,
    repeats: int = 30,
    warmup: int = 5,
    progress: bool = True,
) -> list[Latency]:
    """Latency of each of `archs`, timed in interleaved rounds (see `collect`), with a progress bar."""
    check_backend(backend)
    _check_settings(batch, threads, repeats, warmup)
    rng = np.random.default_rng(seed)
    n = len(archs)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not progress,
    )
    times: list[list[float]] = [[] for _ in archs]
    with bar, torch_threads(threads), tempfile.TemporaryDirectory(prefix="ufo-latency-") as tmp:
        build = bar.add_task(f"build {n} subnets ({backend})", total=n)
        runners = []
        for a in archs:
            runners.append(make_runner(space, a, task, backend, batch, threads, Path(tmp), seed))
            for _ in range(warmup):
                runners[-1][0]()
            bar.advance(build)
        rounds = bar.add_task(f"time {task} on {backend}", total=repeats)
        for _ in range(repeats):
            for i in rng.permutation(n):
                run, sync = runners[i]
                if sync is not None:
                    sync()
                t0 = time.perf_counter()
                run()
                if sync is not None:
                    sync()
                times[i].append((time.perf_counter() - t0) * 1e3)
            bar.advance(rounds)
    return [Latency.of(t) for t in times]


def collect(
    space: SearchSpace,
    task: str,
    n: int,
    backend: str = "torch-cpu",
    seed: int = 0,
    batch: int = 1,
    threads: int = DEFAULT_THREADS,
    repeats: int = 30,
    warmup: int = 5,
    progress: bool = True,
    routes: dict[str, list[str]] | None = None,
    archs: list[Arch] | None = None,
) -> LatencyDataset:
    """Measure `n` archs of `space` for `task` (see `sample_archs`; `archs` to give them) on
    `backend`, with a progress bar.

    All `n` subnets are built first; then every round times each of them once, in a fresh seeded
    order. On a shared machine a burst of load from other processes thus hits all archs alike
    instead of inflating whichever arch happened to be measured during it; each arch's latency is
    the median (and IQR) of its `repeats` rounds, as in `measure`.
    """
    check_backend(backend)
    _check_settings(batch, threads, repeats, warmup)
    archs = (
        [task_arch(space, a, task) for a in archs] if archs is not None else sample_archs(space, task, n, seed, routes)
    )
    ds = LatencyDataset(
        space=space,
        task=task,
        backend=backend,
        batch=batch,
        threads=threads,
        repeats=repeats,
        warmup=warmup,
        seed=seed,
        machine={**machine_info(), "threads": threads},
    )
    lats = measure_many(space, archs, task, backend, seed, batch, threads, repeats, warmup, progress)
    ds.records = [LatencyRecord(arch=a, latency=lat) for a, lat in zip(archs, lats)]
    return ds


def latency_at_fraction(
    space: SearchSpace,
    small: Arch,
    large: Arch,
    task: str,
    fraction: float,
    backend: str = "torch-cpu",
    seed: int = 0,
    batch: int = 1,
    threads: int = DEFAULT_THREADS,
    repeats: int = 30,
) -> tuple[float, Latency, Latency]:
    """A latency budget `fraction` of the way from the smallest subnet `small` to the largest
    `large`, both timed now, together (interleaved rounds, as a search measures its candidates).

    Returns (budget_ms, small's latency, large's latency). The floor is `small`'s upper quartile
    plus 5%: a search accepts a subnet by its re-measured median, and a floor one spread above the
    smallest's median keeps fraction 0 feasible for the smallest subnet when it is timed again
    (tiny subnets at batch 1 differ by less than a shared machine's noise).
    """
    if not 0 <= fraction <= 1:
        raise SearchError(f"latency fraction must lie in [0, 1], got {fraction}")
    lo, hi = measure_many(space, [small, large], task, backend, seed, batch, threads, repeats, progress=False)
    return fraction_budget(lo, hi, fraction), lo, hi


def fraction_budget(small: Latency, large: Latency, fraction: float) -> float:
    """The latency `fraction` of the way from the smallest subnet's to the largest's, both timed
    together: from a floor of the smallest's upper quartile + 5% (see `latency_at_fraction`) to the
    largest's median."""
    floor = 1.05 * small.q3_ms
    return floor + fraction * max(0.0, large.median_ms - floor)
