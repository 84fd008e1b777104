"""Error types. Every error a user can cause is a `UFOError` whose message names the file, field
or value at fault, so the CLI can print it without a traceback."""

from __future__ import annotations


class UFOError(ValueError):
    """Base class for errors caused by user input (configs, archs, checkpoints, data)."""


class ArchError(UFOError):
    """An arch that lies outside its search space, or is malformed."""


class CheckpointError(UFOError):
    """A checkpoint that is corrupt, of the wrong kind, or does not match the model."""


class ConfigError(UFOError):
    """An experiment config that does not validate."""


class DataError(UFOError):
    """A dataset, file or sample that cannot be read or does not fit the task."""


class TaskError(UFOError):
    """An unknown task name or task kind."""


class SearchError(UFOError):
    """A latency measurement, predictor or search that cannot run as asked (unknown backend,
    predictor fitted for another search space, unfitted predictor)."""


class InfeasibleBudget(SearchError):
    """A latency budget that no subnet met when timed: the smallest subnet before the search, or
    every measured candidate after it. `fastest_ms` is the fastest one's median latency (the
    caller of a relative budget can time the budget again)."""

    def __init__(self, message: str, fastest_ms: float) -> None:
        super().__init__(message)
        self.fastest_ms = fastest_ms


class StorageError(UFOError):
    """A file that cannot be written (disk full, permission denied, read-only file system); the
    message names the file and the system's reason."""


class RunLockedError(UFOError):
    """A run folder that another ufo process is writing into (it holds FOLDER/.ufo.lock)."""
