"""What a training run records besides its weights: the run log (RUN/train.log), the scalar log
(RUN/metrics.csv and TensorBoard under RUN/tb) and the validation history (RUN/metrics.json and
RUN/val_metrics.csv).

Every record is cut back to the step a resumed run starts from, so the files always describe the
weights in the checkpoint; train.log alone is appended to (it is the story of every attempt).
Under torchrun only rank 0 writes.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ufo.checkpoint import atomic_write_text

LOGGER = logging.getLogger("ufo.train")
LOGGER.addHandler(logging.NullHandler())  # a library logs; the application decides where it goes
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"

Metrics = dict[str, dict[str, float]]  # task -> metric -> value


@contextmanager
def run_log(path: Path, enabled: bool = True) -> Iterator[logging.Logger]:
    """Append every record of the `ufo.train` logger (dist.info and dist.warn lines, step and
    validation lines) to `path` while the block runs; an exception that escapes is logged first."""
    if not enabled:
        yield LOGGER
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    level = LOGGER.level
    LOGGER.addHandler(handler)
    if LOGGER.getEffectiveLevel() > logging.INFO:
        LOGGER.setLevel(logging.INFO)
    try:
        yield LOGGER
    except BaseException as e:
        LOGGER.error(f"stopped: {type(e).__name__}: {e}")
        raise
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)
        handler.close()


def format_metrics(metrics: Metrics) -> str:
    """`task metric=value ...; task ...` on one line."""
    return "; ".join(f"{t} " + " ".join(f"{k}={v:.4g}" for k, v in m.items()) for t, m in metrics.items())


class _Csv:
    """A CSV file rewritten at open with the rows up to `start_step` (all rows dropped on a fresh
    start), then appended to row by row."""

    def __init__(self, path: Path, fields: list[str], start_step: int) -> None:
        rows = []
        if path.exists() and start_step > 0:
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        self.file = open(path, "w", newline="")  # noqa: SIM115  (closed by close())
        self.writer = csv.DictWriter(self.file, fieldnames=fields, extrasaction="ignore")
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def write(self, rows: list[dict[str, Any]]) -> None:
        self.writer.writerows(rows)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class MetricLog:
    """metrics.csv (rows past a resumed step are dropped, so the log matches the weights),
    TensorBoard scalars and, with `validation`, val_metrics.csv (one row per step, task and
    metric) and TensorBoard's `val/TASK/METRIC`."""

    def __init__(
        self,
        out: Path,
        tasks: list[str],
        start_step: int,
        enabled: bool = True,
        extra_fields: list[str] | None = None,
        validation: bool = False,
    ) -> None:
        self.enabled = enabled
        if not enabled:
            return
        self.path = out / "metrics.csv"
        self.fields = [
            "step",
            "loss",
            *(f"loss/{t}" for t in tasks),
            "lr",
            "images_per_s",
            "skipped",
            *(extra_fields or []),
        ]
        self.csv = _Csv(self.path, self.fields, start_step)
        self.val = (
            _Csv(out / "val_metrics.csv", ["step", "task", "metric", "value"], start_step) if validation else None
        )
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step + 1 if start_step else None)

    def write(self, step: int, row: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.csv.write([{"step": step, **row}])
        for k, v in row.items():
            self.tb.add_scalar(k, v, step)

    def write_val(self, step: int, metrics: Metrics) -> None:
        if not self.enabled or self.val is None:
            return
        self.val.write(
            [{"step": step, "task": t, "metric": k, "value": v} for t, m in metrics.items() for k, v in m.items()]
        )
        for t, m in metrics.items():
            for k, v in m.items():
                self.tb.add_scalar(f"val/{t}/{k}", v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled and not self.csv.file.closed:
            self.csv.close()
            if self.val is not None:
                self.val.close()
            self.tb.close()

    def __enter__(self) -> MetricLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EvalHistory:
    """RUN/metrics.json: `history` (step -> task -> metrics) of every validation, then the final
    evaluation as `metrics` and `primary` (task -> its headline metric) with its step in
    `final_step`. Rewritten atomically after each validation; a resumed run keeps the history up
    to its step."""

    def __init__(self, path: Path, start_step: int, header: dict[str, Any], enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled
        self.data: dict[str, Any] = {**header, "history": {}}
        if not enabled:
            return
        if start_step > 0 and path.is_file():
            try:
                old = json.loads(path.read_text()).get("history") or {}
            except (json.JSONDecodeError, AttributeError):
                old = {}  # a damaged history is not worth stopping a resumed run for
            self.data["history"] = {s: m for s, m in old.items() if s.isdigit() and int(s) <= start_step}
        self.save()

    @property
    def history(self) -> dict[int, Metrics]:
        return {int(s): m for s, m in self.data["history"].items()}

    def add(self, step: int, metrics: Metrics) -> None:
        self.data["history"][str(step)] = metrics
        self.save()

    def final(self, step: int, metrics: Metrics, primary: dict[str, str]) -> None:
        self.data["history"][str(step)] = metrics
        self.data |= {
            "final_step": step,
            "metrics": metrics,
            "primary": {t: m[primary[t]] for t, m in metrics.items() if primary[t] in m},
        }
        self.save()

    def save(self) -> None:
        if self.enabled:
            atomic_write_text(self.path, json.dumps(self.data, indent=2))
