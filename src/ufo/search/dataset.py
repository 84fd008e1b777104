"""What the latency and metric datasets share: (arch, target) records of one task in one search
space, saved atomically as JSON and loaded with errors that name the file and the bad record."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict

from ufo.arch import Arch, SearchSpace
from ufo.checkpoint import atomic_write_text
from ufo.errors import ArchError, SearchError


class ArchRecord(Protocol):
    """What ArchDataset reads of a record."""

    @property
    def arch(self) -> Arch: ...


class ArchDataset(BaseModel):
    """Base of LatencyDataset and MetricDataset; subclasses declare `records` (each with `.arch`)."""

    model_config = ConfigDict(extra="forbid")
    what: ClassVar[str] = "arch dataset"  # named in error messages

    space: SearchSpace
    task: str
    if TYPE_CHECKING:  # a field of each subclass, with its record type (a field here would be one too)
        records: Sequence[ArchRecord]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def archs(self) -> list[Arch]:
        return [r.arch for r in self.records]

    def features(self) -> np.ndarray:
        """(N, d) predictor features of each arch for this dataset's task (`arch_features`)."""
        from ufo.search.features import arch_features

        return arch_features(self.space, self.archs, self.task)

    def save(self, path: str | Path) -> Path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.model_dump_json(indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path):
        """Read a dataset written by `save`, with errors that name the file."""
        from ufo.search.latency import task_arch

        path = Path(path)
        try:
            ds = cls.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise SearchError(f"{cls.what} not found: {path}") from None
        except ValueError as e:
            raise SearchError(f"{path} is not a valid {cls.what}: {e}") from None
        for i, a in enumerate(ds.archs):
            try:
                task_arch(ds.space, a, ds.task)
            except ArchError as e:
                raise SearchError(f"{path}: records[{i}].arch does not fit the dataset's space: {e}") from None
        return ds
