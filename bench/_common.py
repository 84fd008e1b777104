"""Shared helpers for benchmarks: machine description, interleaved timing, statistics and result files.

Every benchmark writes `bench/results/<name>.json` (machine, date, command, results, targets) and a
markdown twin with a table of targets and a table of results. Timings on a shared, noisy CPU are
only meaningful as ratios measured in the same run, so `time_interleaved` alternates the
candidates round by round and `compare` reports medians, IQRs and the paired per-round ratio.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

RESULTS_DIR = Path(__file__).resolve().parent / "results"
Op = Literal["<=", "<", ">=", ">", "=="]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where the figures were measured: CPU model, core count, torch and Python versions, threads."""
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other processes skew timings on a shared machine)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def target(name: str, value: float, op: Op, target: float) -> dict[str, Any]:
    """One target row: whether `value op target` holds."""
    checks: dict[str, Callable[[float, float], bool]] = {
        "<=": lambda a, b: a <= b,
        "<": lambda a, b: a < b,
        ">=": lambda a, b: a >= b,
        ">": lambda a, b: a > b,
        "==": lambda a, b: a == b,
    }
    return {"name": name, "value": value, "op": op, "target": target, "met": bool(checks[op](value, target))}


def progress() -> Progress:
    """A rich progress bar with the columns every benchmark uses."""
    return Progress(
        TextColumn("{task.description:<34}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 3, on_round: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """Milliseconds per call of each function, measured in alternating rounds.

    Each round calls every function once; the order is reversed on odd rounds so neither side
    systematically runs first (cache state, CPU frequency). Warm-up rounds are not recorded.
    `on_round` is called after every recorded round (for a progress bar).
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[n]()
            out[n].append((time.perf_counter() - t0) * 1e3)
        if on_round is not None:
            on_round()
    return out


def quantiles(xs: Sequence[float]) -> dict[str, float]:
    """Median, quartiles and minimum of a sample."""
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
    return {"median": med, "q1": q1, "q3": q3, "min": min(xs)}


def compare(times: Mapping[str, Sequence[float]], num: str, den: str) -> dict[str, Any]:
    """`num` against `den`: each side's ms statistics and their ratio.

    `ratio` is the median of the per-round ratios (the two sides ran back to back, so a burst of
    load from other processes hits both and cancels); `ratio_q1`/`ratio_q3` are their quartiles.
    `ratio_of_medians` is the plain ratio of the two medians, which such bursts can skew.
    """
    a, b = times[num], times[den]
    paired = quantiles([x / y for x, y in zip(a, b)])
    return {
        f"{num}_ms": quantiles(a),
        f"{den}_ms": quantiles(b),
        "ratio": paired["median"],
        "ratio_q1": paired["q1"],
        "ratio_q3": paired["q3"],
        "ratio_of_medians": statistics.median(a) / statistics.median(b),
        "n": len(a),
    }


def _flatten(d: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and {"median", "q1", "q3"} <= v.keys():
            yield key, f"{v['median']:.4g} (IQR {v['q1']:.4g} to {v['q3']:.4g})"
        elif isinstance(v, Mapping):
            yield from _flatten(v, key)
        else:
            yield key, v


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v) if len(v) <= 8 else f"[{len(v)} values]"
    return str(v).replace("|", "\\|")


def markdown(
    name: str,
    machine: Mapping[str, Any],
    date: str,
    command: str,
    results: Mapping[str, Any],
    targets: list[dict[str, Any]],
) -> str:
    """The markdown report: header, targets table, then every result leaf as `key | value`."""
    lines = [f"# Benchmark: {name}", "", f"- date: {date}", f"- command: `{command}`"]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    lines += ["", "## Targets", "", "| target | value | op | goal | met |", "|---|---|---|---|---|"]
    lines += [
        f"| {t['name']} | {_fmt(t['value'])} | {t['op']} | {_fmt(t['target'])} | {_fmt(t['met'])} |" for t in targets
    ]
    lines += ["", "## Results", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in _flatten(results)]
    return "\n".join(lines) + "\n"


def write_results(
    name: str, results: Mapping[str, Any], targets: list[dict[str, Any]], command: str | None = None
) -> tuple[Path, Path]:
    """Write bench/results/<name>.json and <name>.md; return their paths."""
    command = command or " ".join([Path(sys.executable).name, *sys.argv])
    machine = machine_info()
    date = datetime.now(UTC).isoformat(timespec="seconds")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    doc = {"machine": machine, "date": date, "command": command, "results": results, "targets": targets}
    jpath, mpath = RESULTS_DIR / f"{name}.json", RESULTS_DIR / f"{name}.md"
    jpath.write_text(json.dumps(doc, indent=2) + "\n")
    mpath.write_text(markdown(name, machine, date, command, results, targets))
    return jpath, mpath
